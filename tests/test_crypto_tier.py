"""One crypto tier (issue 10 item 4): raw primitives live in ``sealed/_primitives.py`` and
only the recipes import it; nothing loads the system libcrypto through ctypes.

The rule is checked on the import statements of every module of the product packages
(``ast``, so a string or a comment does not count and an import inside a function does)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("sealed", "kms_broker", "attest", "trainer", "compose", "deploy")

PRIMITIVES = "sealed._primitives"
RECIPES = {"sealed.streaming", "sealed.keys", "kms_broker.sealing", "kms_broker.hsm.fake"}
RAW = (
    "cryptography.hazmat.primitives.ciphers",
    "cryptography.hazmat.primitives.keywrap",
    "cryptography.hazmat.primitives.kdf",
    "cryptography.hazmat.decrepit.ciphers",
)
# The TPM 2.0 credential protocol's own AES-CFB (MakeCredential), not one of our formats.
RAW_ALLOWED = {PRIMITIVES, "attest.tpm2.credential"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every module an import statement in ``path`` names (``from a import b`` gives a and
    a.b, since b may be a module)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _modules() -> dict[str, set[str]]:
    found = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            if "_proto" not in path.parts:
                found[_module_name(path)] = _imports(path)
    return found


def test_only_recipes_import_the_primitives():
    modules = _modules()
    assert PRIMITIVES in modules and set(modules) >= RECIPES
    importers = {name for name, imports in modules.items() if PRIMITIVES in imports}
    assert importers <= RECIPES, sorted(importers - RECIPES)
    assert importers, "the recipes use the primitives module"


def test_raw_primitives_are_called_only_from_the_primitives_module():
    offenders = {
        name: sorted(i for i in imports if i.startswith(RAW))
        for name, imports in _modules().items()
        if name not in RAW_ALLOWED and any(i.startswith(RAW) for i in imports)
    }
    assert offenders == {}


def test_no_ctypes_over_libcrypto():
    """ctypes stays for libc (mlock, memset in sealed/secrets.py); no module that imports it
    loads libcrypto or libssl."""
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            if "ctypes" in _imports(path):
                text = path.read_text()
                for needle in ('find_library("crypto")', "libcrypto", "libssl", "EVP_", "HMAC("):
                    assert needle not in text, (path, needle)


def test_the_rule_catches_a_violation(tmp_path):
    """The scanner sees an import inside a function and a ``from`` import of the module."""
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from sealed import _primitives\n"
                     "    from cryptography.hazmat.primitives.ciphers.aead import AESGCM\n")
    imports = _imports(probe)
    assert PRIMITIVES in imports
    assert any(i.startswith(RAW) for i in imports)
