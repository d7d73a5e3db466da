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
4. **Each import**: the finder asks the other finders for the spec and gives it a loader
   that checks the module's files against the manifest before anything of them executes.
   Python source and bytecode are read only through the guard, which hashes the bytes and
   hands the loader exactly those (no second read an attacker could race); only the file
   the loader needs is read (the ``.pyc`` when it is current, else the source). Bytecode is
   used only when the ``.pyc`` file itself is in the set (the image is compiled when it is
   built), so a planted or replaced ``.pyc`` is refused; a missing one means compiling from
   the verified source, and nothing is written. Extension modules are hashed right before
   they are loaded. When one had to be hashed (a first start, a changed module) or there is
   no trusted digest cache, a background thread (started with every signal blocked) then
   reads ``/proc/self/maps`` and hashes the libraries it mapped on the second core, in blocks
   of 16 MiB (the GIL is released for each block), so step 5 mostly finds them hashed; when
   the cache knew it, so does step 5 for its libraries, and no scan competes with the imports
   for the GIL. The same thread first computes the manifest's digest.
5. **Before keys** (:func:`code_claims`, called by the attested key source before it contacts
   a broker, and again before every renewal): every executable mapping in
   ``/proc/self/maps`` (the shared libraries extension modules pulled in) must be a file of
   the set, except the system library directories :data:`SYSTEM_LIBRARY_DIRS`.

A manifest line is looked up by the path as given, then by its resolved path; the bytes are
compared either way. Hashes of whole files (libraries, extension modules, the interpreter)
are remembered (``attest.code_digest.hash_file``) under device, inode, size, mtime and ctime,
so an edited file is always hashed again; a trainer running as root keeps them across starts
in ``ENV/ct-code-cache``, read back only where no one but root can have written it
(``attest.digest_cache``). Python source and bytecode are always read and hashed: those bytes
are what runs, and a remembered digest would stand for a read made later. Look-ups go through
``attest.code_digest.ManifestIndex`` (a directory's block of lines is found once; a small
block becomes a table).

What the checks cost is logged once, before the first key (:class:`CheckCost`, logger
``trainer.guard``).

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

import contextlib
import hashlib
import importlib.machinery as machinery
import importlib.util
import logging
import os
import queue
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from attest import digest_cache
from attest.code_digest import (
    CACHE_NAME,
    MANIFEST_NAME,
    CodeSetError,
    hash_bytes_of,
    hash_file_counted,
    index_manifest,
    line_matches,
)

__all__ = [
    "EXIT_CODE_IDENTITY",
    "REFUSED_VARIABLES",
    "CheckCost",
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
# an executable mapping of a file in /proc/self/maps: address perms offset dev inode path
_EXECUTABLE_MAPPING = re.compile(r"^\S+ ..x. \S+ \S+ \S+ +(/[^\n]*)$", re.MULTILINE)
log = logging.getLogger("trainer.guard")


@dataclass
class CheckCost:
    """What the checks cost this process until the first key: files and bytes hashed by the
    importing thread and by the background thread, the CPU seconds of the start-up check, of
    the check before keys and of the background thread, the seconds the importing thread
    spent in the guard's import hooks (``perf_counter``: a thread's CPU clock costs a system
    call, about 5 us here, and thousands of imports would pay it; on a busy machine these
    seconds include waits for a core), how long the check before keys waited for the
    background thread, and how many scans of the mappings that thread made. Logged once,
    before the first key."""

    cached: int = 0
    files: int = 0
    bytes: int = 0
    startup_cpu_s: float = 0.0
    imports_s: float = 0.0
    before_keys_cpu_s: float = 0.0
    background_files: int = 0
    background_bytes: int = 0
    background_cpu_s: float = 0.0
    waited_s: float = 0.0
    scans: int = 0

    def line(self) -> str:
        return (f"code identity checked: {self.files} files ({self.bytes / 1e6:.1f} MB) hashed "
                f"while importing, {self.background_files} libraries "
                f"({self.background_bytes / 1e6:.1f} MB) in the background; CPU s: start-up "
                f"{self.startup_cpu_s:.3f}, before keys {self.before_keys_cpu_s:.3f}, "
                f"background {self.background_cpu_s:.3f}; s in checked imports "
                f"{self.imports_s:.3f}; "
                f"waited {self.waited_s:.3f} s for the background; {self.cached} digests "
                f"from the trusted cache; {self.scans} scans of the mappings in the background")


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


class _Prefetcher:
    """Scans ``/proc/self/maps`` and hashes the newly mapped libraries on one background
    thread while the main thread goes on importing, so the check before keys mostly finds
    them hashed (``hash_file``'s in-process memo). The importing thread only asks for a scan
    (a queue put) after each extension module it loads; requests made while a scan runs are
    served by one more scan. The thread starts with every signal blocked: signals stay with
    the main thread. Nothing here decides anything: the check before keys reads the maps
    again and checks every library itself."""

    def __init__(self, cost: CheckCost, scan: Callable[[], list[str]],
                 first: Callable[[], object]) -> None:
        self._cost = cost
        self._scan = scan
        self._first = first  # run once when the thread starts, before any scan
        self._seen: set[str] = set()
        self._requests: queue.SimpleQueue[None] = queue.SimpleQueue()
        self._idle = threading.Condition()
        self._pending = 0
        self._thread: threading.Thread | None = None

    def request(self) -> None:
        with self._idle:
            self._pending += 1
        self._requests.put(None)
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="trainer-code-hash",
                                            daemon=True)
            old = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
            try:
                self._thread.start()
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, old)

    def drain(self) -> None:
        """Wait until every scan asked for so far is done."""
        with self._idle:
            self._idle.wait_for(lambda: self._pending == 0)

    def _run(self) -> None:
        with contextlib.suppress(Exception):  # whoever needs its result computes it again
            self._first()
        while True:
            self._requests.get()
            taken = 1
            while True:
                try:
                    self._requests.get_nowait()
                except queue.Empty:
                    break
                taken += 1
            try:
                self._cost.scans += 1
                self._hash_new()
            except Exception:  # noqa: S110 - the check before keys does it all again
                pass
            finally:
                self._cost.background_cpu_s = time.thread_time()
                with self._idle:
                    self._pending -= taken
                    self._idle.notify_all()

    def _hash_new(self) -> None:
        for path in self._scan():
            if path in self._seen:
                continue
            self._seen.add(path)
            try:
                _, _, read = hash_file_counted(path)
            except (OSError, CodeSetError):
                continue  # the check before keys hashes it again and reports
            if read:
                self._cost.background_files += 1
                self._cost.background_bytes += read


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
            self.lines = index_manifest(data)
        except CodeSetError as exc:
            raise CodeIdentityRefused([f"{manifest_path}: {exc}"]) from None
        self._manifest = data
        self._digest: str | None = None  # computed on the background thread (digest)
        self.manifest_path = manifest_path
        # sticky: a refusal that some library swallows (``except Exception`` around an
        # optional import) still stops the process before any key is requested
        self.refusals: list[str] = []
        self.cost = CheckCost()
        self.cost_logged = False
        self.prefetch = _Prefetcher(self.cost, self._hashable_mapped_code, lambda: self.digest)
        self._system_paths: dict[str, bool] = {}

    @property
    def digest(self) -> str:
        """The code digest: the SHA-256 of the manifest bytes read at install (the background
        thread computes it first thing, off the importing thread; they cannot change)."""
        if self._digest is None:
            self._digest = hashlib.sha256(self._manifest).hexdigest()
        return self._digest

    def refuse(self, problems: list[str]) -> CodeIdentityRefused:
        self.refusals.extend(problems)
        return CodeIdentityRefused(problems)

    def _line(self, path: str, what: str) -> bytes:
        # The path as given first: the bytes are what is compared, so a link on the way
        # cannot make other content pass; the resolved path where links make the difference.
        line = self.lines.get(path) or self.lines.get(os.path.realpath(path))
        if line is None or not line.startswith(b"F\t"):
            raise self.refuse([f"{what} {path} is not in the measured code set"])
        return line

    def check_file(self, path: str, what: str) -> int:
        """Check a whole file against its line; the bytes read (0: its digest was known)."""
        line = self._line(path, what)
        digest, size, read = hash_file_counted(path)
        if read:
            self.cost.files += 1
            self.cost.bytes += read
        if not line_matches(line, digest, size):
            raise self.refuse([f"{what} {path} differs from the measured code set"])
        return read

    def verified_bytes(self, path: str, what: str) -> bytes:
        """The bytes of ``path`` if they are the measured ones; OSError when it does not
        exist (a module without bytecode is compiled from its checked source)."""
        data, digest = hash_bytes_of(path)
        self.cost.files += 1
        self.cost.bytes += len(data)
        if not line_matches(self._line(path, what), digest, len(data)):
            raise self.refuse([f"{what} {path} differs from the measured code set"])
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

    def _mapped_code(self) -> list[str]:
        with open("/proc/self/maps") as maps:
            return list(dict.fromkeys(_EXECUTABLE_MAPPING.findall(maps.read())))

    def _system(self, path: str) -> bool:
        known = self._system_paths.get(path)
        if known is None:
            real = os.path.realpath(path)
            known = real.startswith(SYSTEM_LIBRARY_DIRS) and real not in self.lines
            self._system_paths[path] = known
        return known

    def _hashable_mapped_code(self) -> list[str]:
        return [path for path in self._mapped_code()
                if not path.endswith(" (deleted)") and not self._system(path)]

    def check_mapped(self) -> None:
        waited = time.perf_counter()
        self.prefetch.drain()
        self.cost.waited_s += time.perf_counter() - waited
        problems = []
        for path in self._mapped_code():
            if path.endswith(" (deleted)"):
                problems.append(f"mapped code {path} (a file replaced after it was loaded)")
                continue
            if self._system(path):
                continue
            try:
                self.check_file(path, "shared library")
            except CodeIdentityRefused as exc:
                problems.extend(exc.problems)
        if problems:
            raise self.refuse(problems)

    # imports --------------------------------------------------------------------------------
    def checked(self, spec: machinery.ModuleSpec) -> machinery.ModuleSpec:
        """Give the spec a loader that checks (see module doc, step 4)."""
        started = time.perf_counter()
        try:
            return self._checked(spec)
        finally:
            self.cost.imports_s += time.perf_counter() - started

    def _checked(self, spec: machinery.ModuleSpec) -> machinery.ModuleSpec:
        origin = spec.origin
        if not spec.has_location or not origin or not os.path.isabs(origin):
            return spec  # built-in, frozen, namespace package: no file of its own
        loader = spec.loader
        if type(loader) is machinery.SourceFileLoader:
            spec.loader = _VerifiedSourceLoader(spec.name, origin, self, spec.cached)
        elif type(loader) is machinery.SourcelessFileLoader:
            spec.loader = _VerifiedSourcelessLoader(spec.name, origin, self)
        elif type(loader) is machinery.ExtensionFileLoader:
            hashed = self.check_file(origin, f"module {spec.name}:")
            # its libraries are hashed ahead on the background thread when the module itself
            # had to be (a first start, a changed module) or there is no trusted cache
            ahead = hashed > 0 or not self.cost.cached
            spec.loader = _CheckedExtensionLoader(spec.name, origin, self, ahead)
        else:  # any other file loader: checked by path before it loads
            self.check_file(origin, f"module {spec.name}:")
        return spec

    def check_module(self, spec: machinery.ModuleSpec) -> None:
        """Check a module's file (and its bytecode) without loading it."""
        origin = spec.origin
        if spec.has_location and origin and os.path.isabs(origin):
            self.check_file(origin, f"module {spec.name}:")
            if spec.cached and os.path.exists(spec.cached):
                self.check_file(spec.cached, f"bytecode of {spec.name}:")


class _VerifiedSourceLoader(machinery.SourceFileLoader):
    """Reads source and bytecode only through the guard, which hashes the bytes it returns:
    what was checked is what runs. Never writes bytecode."""

    def __init__(self, fullname: str, path: str, guard: _Guard, bytecode: str | None) -> None:
        super().__init__(fullname, path)
        self._guard = guard
        # where the source's bytecode is (the spec's ``cached``, which the import system
        # computes anyway): the only other file this loader reads
        self._bytecode = bytecode

    def get_data(self, path: str) -> bytes:
        started = time.perf_counter()
        try:
            if path == self.path:
                return self._guard.verified_bytes(path, f"module {self.name}:")
            if path == self._bytecode:
                return self._guard.verified_bytes(path, f"bytecode of {self.name}:")
            raise OSError(f"{path}: not a file of module {self.name}")
        finally:
            self._guard.cost.imports_s += time.perf_counter() - started

    def set_data(self, path: str, data: bytes, *, _mode: int = 0o666) -> None:
        return None


class _VerifiedSourcelessLoader(machinery.SourcelessFileLoader):
    def __init__(self, fullname: str, path: str, guard: _Guard) -> None:
        super().__init__(fullname, path)
        self._guard = guard

    def get_data(self, path: str) -> bytes:
        if path != self.path:
            raise OSError(f"{path}: not a file of module {self.name}")
        started = time.perf_counter()
        try:
            return self._guard.verified_bytes(path, f"bytecode of {self.name}:")
        finally:
            self._guard.cost.imports_s += time.perf_counter() - started


class _CheckedExtensionLoader(machinery.ExtensionFileLoader):
    """Checked before ``dlopen`` (by :meth:`_Guard.checked`); with ``ahead``, the libraries it
    maps are queued for hashing straight after."""

    def __init__(self, fullname: str, path: str, guard: _Guard, ahead: bool) -> None:
        super().__init__(fullname, path)
        self._guard = guard
        self._ahead = ahead

    def create_module(self, spec: machinery.ModuleSpec) -> Any:
        module = super().create_module(spec)
        if self._ahead:
            started = time.perf_counter()
            self._guard.prefetch.request()
            self._guard.cost.imports_s += time.perf_counter() - started
        return module


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
    started = time.thread_time()
    prefix = os.path.realpath(sys.prefix)
    guard = _Guard(os.path.join(prefix, MANIFEST_NAME))
    guard.cost.cached = digest_cache.load(os.path.join(prefix, CACHE_NAME))
    guard.check_started()
    sys.dont_write_bytecode = True
    sys.meta_path.insert(0, _MeasuredFinder(guard))
    sys.path_importer_cache.clear()
    guard.prefetch.request()  # what is mapped already (libpython, ...), on the second core
    guard.cost.startup_cpu_s = time.thread_time() - started
    _active = guard


def require_measured_module(name: str) -> None:
    """Check module ``name`` (source and bytecode) against the manifest without executing
    it (its parent packages are imported, through the guard)."""
    if _active is None:
        raise CodeIdentityRefused(["the code identity guard is not installed"])
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError) as exc:
        raise CodeIdentityRefused([f"module {name} cannot be found ({exc})"]) from None
    if spec is None:
        raise CodeIdentityRefused([f"module {name} is not installed"])
    _active.check_module(spec)


def code_claims() -> dict[str, str]:
    """``code_digest`` (the manifest's SHA-256) and versions, after checking every mapped
    library; without the guard (tests, tools), the environment is measured in full."""
    from attest.code_digest import code_digest

    if _active is None:
        return code_digest().claims()
    if _active.refusals:
        raise CodeIdentityRefused(_active.refusals)
    started = time.thread_time()
    _active.check_mapped()
    _active.cost.before_keys_cpu_s += time.thread_time() - started
    if not _active.cost_logged:
        _active.cost_logged = True
        log.info("%s", _active.cost.line())
        digest_cache.save(os.path.join(os.path.dirname(_active.manifest_path), CACHE_NAME))
    torch = sys.modules.get("torch")
    return {
        "code_digest": _active.digest,
        "python_version": ".".join(map(str, sys.version_info[:3])),
        "torch_version": str(getattr(torch, "__version__", "none")),
    }
