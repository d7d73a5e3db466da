"""Canonical digest of the code that will receive keys.

Covers every installed file (``.py`` and data files alike) of each project package the trainer
process imports, excluding ``__pycache__`` directories and ``*.pyc``/``*.pyo`` files, plus the
interpreter version and the torch version. A one-byte change anywhere gives another digest.

Canonical encoding hashed with SHA-256 (all lengths big-endian)::

    b"ct-code-digest/v1\\x00"
    for each package, in the order given (default: sealed, kms_broker, attest, trainer):
        BE16 len(name) | name | BE32 number of files (0 when the package is not installed)
        for each file, sorted by its POSIX path relative to the package directory:
            BE16 len(path) | path (UTF-8) | BE64 len(content) | content
    BE16 len(python) | python ("3.11.2")  |  BE16 len(torch) | torch ("2.13.0" or "none")

A symbolic link is hashed as ``b"symlink:" || target path`` in place of content: retargeting
it changes the digest, and the file it points to is hashed in its own right when it lies in a
package. (Installed packages hold no links; an editable checkout may.)
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import platform
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = ["PROJECT_PACKAGES", "CodeDigest", "code_digest", "installed_package_dirs"]

PROJECT_PACKAGES = ("sealed", "kms_broker", "attest", "trainer")
DOMAIN = b"ct-code-digest/v1\x00"
_EXCLUDED_SUFFIXES = (".pyc", ".pyo")
_CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class CodeDigest:
    digest: str  # hex SHA-256
    python_version: str
    torch_version: str
    files: int

    def claims(self) -> dict[str, str]:
        return {
            "code_digest": self.digest,
            "python_version": self.python_version,
            "torch_version": self.torch_version,
        }


def installed_package_dirs(packages: Iterable[str] = PROJECT_PACKAGES) -> dict[str, Path | None]:
    """Where each package is installed (without importing it); None when absent."""
    out: dict[str, Path | None] = {}
    for name in packages:
        spec = importlib.util.find_spec(name)
        locations = list(spec.submodule_search_locations or []) if spec else []
        out[name] = Path(locations[0]) if locations else None
    return out


def _torch_version() -> str:
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return "none"


def _files(directory: Path) -> list[tuple[str, Path]]:
    root = directory.resolve()
    found = []
    for path in root.rglob("*"):
        rel = path.relative_to(root)
        if "__pycache__" in rel.parts or path.suffix in _EXCLUDED_SUFFIXES:
            continue
        if path.is_file() or path.is_symlink():
            found.append((rel.as_posix(), path))
    found.sort(key=lambda item: item[0].encode())
    return found


def _hash_file(h: hashlib._Hash, rel: str, path: Path) -> None:
    name = rel.encode()
    h.update(struct.pack(">H", len(name)) + name)
    if path.is_symlink():
        target = b"symlink:" + str(path.readlink()).encode()
        h.update(struct.pack(">Q", len(target)) + target)
        return
    size = path.stat().st_size
    h.update(struct.pack(">Q", size))
    with open(path, "rb") as f:
        read = 0
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            read += len(chunk)
    if read != size:
        raise OSError(f"{rel} changed while it was hashed")


def code_digest(
    package_dirs: Mapping[str, Path | None] | None = None,
    *,
    python_version: str | None = None,
    torch_version: str | None = None,
) -> CodeDigest:
    """Digest of the installed project packages (or of ``package_dirs``, name -> directory)."""
    dirs = installed_package_dirs() if package_dirs is None else package_dirs
    py = python_version or platform.python_version()
    torch = torch_version or _torch_version()
    h = hashlib.sha256(DOMAIN)
    total = 0
    for name, directory in dirs.items():
        encoded = name.encode()
        files = _files(Path(directory)) if directory is not None else []
        h.update(struct.pack(">H", len(encoded)) + encoded + struct.pack(">I", len(files)))
        for rel, path in files:
            _hash_file(h, rel, path)
        total += len(files)
    for value in (py, torch):
        v = value.encode()
        h.update(struct.pack(">H", len(v)) + v)
    return CodeDigest(h.hexdigest(), py, torch, total)
