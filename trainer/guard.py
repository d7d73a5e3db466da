"""Code identity guard: only measured code runs in a ``trainer --attest`` process.

The environment carries its measured code set as ``ENV/ct-code-manifest`` (written when the
image is built: ``attest code-digest --write``; format and digest in ``attest.code_digest``).
The trainer attests the SHA-256 of that manifest as ``code_digest``, so a tenant who approved
the digest of a reference image (computed offline with ``attest code-digest``) approved every
byte the manifest lists. This module makes the process keep to the manifest:

1. **Environment** (:func:`enter`, first thing in ``trainer/__main__`` and in ``cli.main``
   under ``--attest``): refuse when a loader or interpreter variable that changes what code
   runs is set (every ``LD_*``, ``GCONV_PATH``, ``PYTHONPATH``, ``PYTHONHOME``,
   ``PYTHONSTARTUP``, ``PYTHONUSERBASE``, ... see :data:`REFUSED_VARIABLES`), naming it.
2. **Isolated interpreter**: unless ``sys.flags`` says isolated (``-I``: no ``PYTHON*``
   variables, no user site, no script or current directory on ``sys.path``) and writing no
   bytecode (``-B``: under ``-I`` PYTHONDONTWRITEBYTECODE is ignored, and a ``.pyc`` written
   before the guard would change the measured image), re-execute
   ``sys.executable -I -B -m trainer ARGS`` (same pid, so torchrun and schedulers keep their
   handle). No marker decides this: the new process reads its own ``sys.flags``. torchrun's
   workers (``python -u -m trainer ...``) take the same path, so every process that receives
   a key is guarded; the torchrun agent holds no key.
3. **Install** (:func:`install`): read and parse the manifest (absent or malformed: refuse),
   check the interpreter binary, every module already imported (its source and its cached
   bytecode), every ``.pth`` file in a ``sys.path`` directory (a ``.pth`` not in the set is
   refused by name; its ``import`` line has already run by then, but the process stops before
   any key is requested), then put a finder first on ``sys.meta_path`` and set
   ``sys.dont_write_bytecode``.
4. **Each import**: the finder asks the other finders for the spec and checks the module's
   file against the manifest before anything of it executes. Python source and bytecode are
   read once, hashed, and the loader executes exactly those bytes (no second read an
   attacker could race). Bytecode is used only when the ``.pyc`` file itself is in the set
   (the image is compiled when it is built), so a planted or replaced ``.pyc`` is refused;
   a missing one means compiling from the verified source, and nothing is written. Extension
   modules are hashed right before they are loaded.
5. **Before keys** (:func:`code_claims`, called by the attested key source before it contacts
   a broker, and again before every renewal): every executable mapping in
   ``/proc/self/maps`` (the shared libraries extension modules pulled in) must be a file of
   the set, except the system library directories :data:`SYSTEM_LIBRARY_DIRS`.

Any refusal raises :class:`CodeIdentityRefused` naming the file or variable; the trainer
exits with :data:`EXIT_CODE_IDENTITY` (5) before it asks any broker for anything.

Out of reach (README "Known limits"): system libraries under :data:`SYSTEM_LIBRARY_DIRS`
(covered by the image digest or IMA, not by the code digest); code that runs before this
module (an unmeasured ``.pth`` ``import`` line runs during interpreter start-up and is refused
afterwards, so it never sees a key but could act on the node); extension modules and
libraries are checked by path right before ``dlopen`` (a same-user attacker racing that
window is not excluded); on a TPM-only node root can reset PCR 23 and so forge any claim.
"""

from __future__ import annotations

import hashlib
import importlib.machinery as machinery
import os
import sys
from collections.abc import Iterable
from typing import Any

from attest.code_digest import (
    MANIFEST_NAME,
    CodeSetError,
    Entry,
    hash_bytes_of,
    hash_file,
    parse_manifest,
)

__all__ = [
    "EXIT_CODE_IDENTITY",
    "REFUSED_VARIABLES",
    "CodeIdentityRefused",
    "active",
    "code_claims",
    "enter",
    "install",
    "require_measured_module",
]

EXIT_CODE_IDENTITY = 5
REFUSED_VARIABLES = (
    "PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONUSERBASE", "PYTHONPLATLIBDIR",
    "PYTHONEXECUTABLE", "PYTHONINSPECT", "PYTHONBREAKPOINT", "PYTHONPYCACHEPREFIX",
    "PYTHONSAFEPATH", "PYTHONNOUSERSITE", "GCONV_PATH",
)
REFUSED_PREFIXES = ("LD_",)
SYSTEM_LIBRARY_DIRS = ("/lib/", "/lib64/", "/usr/lib/", "/usr/lib64/")


class CodeIdentityRefused(Exception):
    """Something outside the measured code set would run (the message names it)."""

    def __init__(self, problems: Iterable[str]) -> None:
        self.problems = tuple(problems)
        super().__init__("; ".join(self.problems))


def refused_variables(environ: Any = None) -> list[str]:
    env = os.environ if environ is None else environ
    return sorted(name for name in env
                  if name in REFUSED_VARIABLES or name.startswith(REFUSED_PREFIXES))


def _isolated() -> bool:
    f = sys.flags
    return bool(f.isolated and f.ignore_environment and f.no_user_site and not f.inspect
                and f.dont_write_bytecode)


class _Guard:
    def __init__(self, manifest_path: str) -> None:
        try:
            with open(manifest_path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise CodeIdentityRefused([
                f"no code manifest at {manifest_path}: this environment was not measured "
                f"(build it with `attest code-digest --write {os.path.dirname(manifest_path)}`)"
            ]) from None
        try:
            self.entries = parse_manifest(data)
        except CodeSetError as exc:
            raise CodeIdentityRefused([f"{manifest_path}: {exc}"]) from None
        self.digest = hashlib.sha256(data).hexdigest()
        self.manifest_path = manifest_path
        # sticky: a refusal that some library swallows (``except Exception`` around an
        # optional import) still stops the process before any key is requested
        self.refusals: list[str] = []

    def _entry(self, path: str, what: str) -> Entry:
        real = os.path.realpath(path)
        entry = self.entries.get(real)
        if entry is None or entry.kind != "F":
            raise CodeIdentityRefused([f"{what} {path} is not in the measured code set"])
        return entry

    def check_file(self, path: str, what: str) -> None:
        entry = self._entry(path, what)
        digest, size = hash_file(os.path.realpath(path))
        if (digest, size) != (entry.sha256, entry.size):
            raise CodeIdentityRefused([f"{what} {path} differs from the measured code set"])

    def verified_bytes(self, path: str, what: str) -> bytes:
        entry = self._entry(path, what)
        data, digest = hash_bytes_of(os.path.realpath(path))
        if (digest, len(data)) != (entry.sha256, entry.size):
            raise CodeIdentityRefused([f"{what} {path} differs from the measured code set"])
        return data

    # start-up checks ------------------------------------------------------------------------
    def check_started(self) -> None:
        problems: list[str] = []

        def collect(check: Any, *args: str) -> None:
            try:
                check(*args)
            except CodeIdentityRefused as exc:
                problems.extend(exc.problems)

        collect(self.check_file, sys.executable, "interpreter")
        for name, module in list(sys.modules.items()):
            spec = getattr(module, "__spec__", None)
            origin = getattr(spec, "origin", None) or getattr(module, "__file__", None)
            if not origin or not getattr(spec, "has_location", True) or not os.path.isabs(origin):
                continue
            collect(self.check_file, origin, f"module {name}:")
            cached = getattr(module, "__cached__", None)
            if cached and os.path.exists(cached):
                collect(self.check_file, cached, f"bytecode of {name}:")
        for directory in sys.path:
            if not os.path.isdir(directory):
                continue
            for name in sorted(os.listdir(directory)):
                if name.endswith(".pth"):
                    collect(self.check_file, os.path.join(directory, name), ".pth file")
        if problems:
            raise CodeIdentityRefused(problems)

    def check_mapped(self) -> None:
        problems = []
        with open("/proc/self/maps") as maps:
            lines = maps.read().splitlines()
        seen = set()
        for line in lines:
            fields = line.split(None, 5)
            if len(fields) < 6 or "x" not in fields[1] or not fields[5].startswith("/"):
                continue
            path = fields[5]
            if path in seen:
                continue
            seen.add(path)
            if path.endswith(" (deleted)"):
                problems.append(f"mapped code {path} (a file replaced after it was loaded)")
                continue
            real = os.path.realpath(path)
            if real.startswith(SYSTEM_LIBRARY_DIRS) and real not in self.entries:
                continue
            try:
                self.check_file(path, "shared library")
            except CodeIdentityRefused as exc:
                problems.extend(exc.problems)
        if problems:
            raise CodeIdentityRefused(problems)

    # imports --------------------------------------------------------------------------------
    def checked(self, spec: machinery.ModuleSpec) -> machinery.ModuleSpec:
        try:
            return self._checked(spec)
        except CodeIdentityRefused as exc:
            self.refusals.extend(exc.problems)
            raise

    def _checked(self, spec: machinery.ModuleSpec) -> machinery.ModuleSpec:
        origin = spec.origin
        if not spec.has_location or not origin or not os.path.isabs(origin):
            return spec  # built-in, frozen, namespace package: no file of its own
        loader = spec.loader
        what = f"module {spec.name}:"
        if type(loader) is machinery.SourceFileLoader:
            verified = {origin: self.verified_bytes(origin, what)}
            cached = spec.cached
            if cached and os.path.exists(cached):
                verified[cached] = self.verified_bytes(cached, f"bytecode of {spec.name}:")
            spec.loader = _VerifiedSourceLoader(spec.name, origin, verified)
        elif type(loader) is machinery.SourcelessFileLoader:
            verified = {origin: self.verified_bytes(origin, f"bytecode of {spec.name}:")}
            spec.loader = _VerifiedSourcelessLoader(spec.name, origin, verified)
        else:  # extension modules and any other file loader: checked by path before loading
            self.check_file(origin, what)
        return spec


class _VerifiedSourceLoader(machinery.SourceFileLoader):
    """Executes the bytes that were checked; never writes bytecode."""

    def __init__(self, fullname: str, path: str, verified: dict[str, bytes]) -> None:
        super().__init__(fullname, path)
        self._verified = verified

    def get_data(self, path: str) -> bytes:
        try:
            return self._verified[path]
        except KeyError:
            raise OSError(f"{path}: not a verified file of {self.name}") from None

    def set_data(self, path: str, data: bytes, *, _mode: int = 0o666) -> None:
        return None


class _VerifiedSourcelessLoader(machinery.SourcelessFileLoader):
    def __init__(self, fullname: str, path: str, verified: dict[str, bytes]) -> None:
        super().__init__(fullname, path)
        self._verified = verified

    def get_data(self, path: str) -> bytes:
        try:
            return self._verified[path]
        except KeyError:
            raise OSError(f"{path}: not a verified file of {self.name}") from None


class _MeasuredFinder:
    """First on ``sys.meta_path``: finds through the others, then checks the file."""

    def __init__(self, guard: _Guard) -> None:
        self._guard = guard

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        for finder in list(sys.meta_path):
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec = find(fullname, path, target)
            if spec is not None:
                return self._guard.checked(spec)
        return None

    def invalidate_caches(self) -> None:
        return None


_active: _Guard | None = None


def active() -> bool:
    return _active is not None


def enter() -> None:
    """Refuse loader/interpreter variables, re-execute isolated, install the guard.
    Idempotent; raises :class:`CodeIdentityRefused`."""
    if _active is not None:
        return
    bad = refused_variables()
    if bad:
        raise CodeIdentityRefused([f"environment variable {name} is set (it changes what code "
                                   f"runs in the process that receives the key)" for name in bad])
    if not _isolated():
        sys.stdout.flush()
        sys.stderr.flush()
        argv = [sys.executable, "-I", "-B", "-m", "trainer", *sys.argv[1:]]
        os.execv(sys.executable, argv)  # noqa: S606 - our own interpreter, same arguments
    install()


def install() -> None:
    """Check what already runs against the manifest and guard every later import."""
    global _active
    if _active is not None:
        return
    if not _isolated():
        raise CodeIdentityRefused(["the interpreter is not isolated (run it with -I -B)"])
    guard = _Guard(os.path.join(os.path.realpath(sys.prefix), MANIFEST_NAME))
    guard.check_started()
    sys.dont_write_bytecode = True
    sys.meta_path.insert(0, _MeasuredFinder(guard))
    sys.path_importer_cache.clear()
    _active = guard


def require_measured_module(name: str) -> None:
    """Find (and so check) module ``name`` through the guard without executing it."""
    import importlib.util

    if _active is None:
        raise CodeIdentityRefused(["the code identity guard is not installed"])
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError) as exc:
        raise CodeIdentityRefused([f"module {name} cannot be found ({exc})"]) from None
    if spec is None:
        raise CodeIdentityRefused([f"module {name} is not installed"])


def code_claims() -> dict[str, str]:
    """``code_digest`` (the manifest's SHA-256) and versions, after checking every mapped
    library; without the guard (tests, tools), the environment is measured in full."""
    from attest.code_digest import code_digest

    if _active is None:
        return code_digest().claims()
    if _active.refusals:
        raise CodeIdentityRefused(_active.refusals)
    _active.check_mapped()
    torch = sys.modules.get("torch")
    return {
        "code_digest": _active.digest,
        "python_version": ".".join(map(str, sys.version_info[:3])),
        "torch_version": str(getattr(torch, "__version__", "none")),
    }
