"""A measured environment that stands in for the image where no Docker engine builds one.

What ``deploy/Dockerfile`` does, done locally for the harness and the tests: a virtual
environment (``python -m venv``, links to this interpreter) whose site directory holds a frozen
copy of the project's packages, compiled to bytecode, plus ``ct-deps.pth`` naming this
environment's site directory for the third-party distributions (torch, grpc, ...); console
scripts for ``kms-broker``, ``attest`` and ``trainer``; and, last, the code manifest
(``attest code-digest --write``) that ``trainer --attest`` enforces and attests.

The copy freezes the trainer code digest while the checkout changes under a running test. The
third-party site directory is compiled once (only missing bytecode is written) so that no
later import writes into the measured set; services run with PYTHONDONTWRITEBYTECODE=1 as in
the image.
"""

from __future__ import annotations

import compileall
import os
import shutil
import sysconfig
import venv
from pathlib import Path

from attest.code_digest import MANIFEST_NAME, environment_manifest

__all__ = ["PACKAGES", "build_image_environment", "image_environment_variables"]

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("sealed", "kms_broker", "attest", "trainer", "compose")
SCRIPTS = {"kms-broker": "kms_broker.cli", "attest": "attest.cli", "trainer": "trainer.cli"}
_compiled_deps: set[str] = set()


def _site(env: Path) -> Path:
    found = list((env / "lib").glob("python3*/site-packages"))
    if len(found) != 1:
        raise RuntimeError(f"{env}: expected one site-packages, found {found}")
    return found[0]


def build_image_environment(directory: Path, *, repo: Path = REPO) -> Path:
    """Create the measured environment at ``directory`` and return it."""
    venv.EnvBuilder(symlinks=True, with_pip=False, clear=True).create(directory)
    site = _site(directory)
    for package in PACKAGES:
        shutil.copytree(repo / package, site / package,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    deps = os.path.realpath(sysconfig.get_paths()["purelib"])
    if deps not in _compiled_deps:
        compileall.compile_dir(deps, quiet=2, workers=1)
        _compiled_deps.add(deps)
    (site / "ct-deps.pth").write_text(deps + "\n")
    compileall.compile_dir(str(site), quiet=2, workers=1)
    python = directory / "bin" / "python"
    for name, module in SCRIPTS.items():
        script = directory / "bin" / name
        script.write_text(f"#!{python}\nimport sys\nfrom {module} import main\n"
                          f"sys.exit(main())\n")
        script.chmod(0o755)
    manifest = environment_manifest(str(directory.resolve()))
    (directory / MANIFEST_NAME).write_bytes(manifest)
    return directory


def image_environment_variables(directory: Path) -> dict[str, str]:
    """What the image sets for every process: its ``bin`` first on PATH, no bytecode writes."""
    path = os.pathsep.join([str(directory / "bin"), os.environ.get("PATH", os.defpath)])
    return {"PATH": path, "PYTHONDONTWRITEBYTECODE": "1"}
