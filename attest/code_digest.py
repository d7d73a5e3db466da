"""Code identity: the canonical manifest of every file a trainer process can execute.

The **measured code set** of a Python environment (a virtual environment or an installation
prefix, optionally inside an image directory given as ``root``):

- the interpreter binary (``ENV/bin/python3`` with every link followed) and ``ENV/pyvenv.cfg``;
- the base installation's ``lib/libpython*`` and its standard library
  ``BASE/lib/pythonX.Y`` (``lib-dynload`` and bytecode included; its ``site-packages`` and
  ``dist-packages`` excluded: a virtual environment does not import them), where ``BASE`` is
  the parent of ``home`` in ``pyvenv.cfg`` (``ENV`` itself without one);
- every file of the environment's site directory ``ENV/lib/pythonX.Y/site-packages`` (pure
  Python, bytecode, extension modules, bundled shared libraries, ``.pth`` files, data);
- every directory a ``.pth`` file of that site directory adds to ``sys.path`` and every
  package directory an editable-install finder (``__editable___*_finder.py``, setuptools)
  maps, walked whole.

Walks do not follow directory links; a link is measured as its target text, and the file it
points to is measured in its own right where it lies in the set. Paths are the absolute paths
the trainer sees at run time (``root`` is stripped), every link inside them resolved.

**Manifest** (UTF-8 text, what ``attest code-digest --write`` stores as
``ENV/ct-code-manifest``)::

    b"ct-code-manifest/v1\\n"
    one line per entry, sorted by the UTF-8 bytes of PATH, each ending in b"\\n":
        b"F\\t" SHA256-HEX(64, lowercase) b"\\t" SIZE(decimal ASCII) b"\\t" PATH    a file
        b"L\\t" TARGET b"\\t" PATH                                                a link

A path or link target holding a tab, a newline or bytes that are not UTF-8 cannot be measured
(:class:`CodeSetError`). The manifest file itself is not an entry, nor the digest cache
beside it (``ENV/ct-code-cache``, ``attest.digest_cache``: data about the set, not code).

**Code digest** = SHA-256 over the manifest bytes, lowercase hex. Two environments that
differ in any byte of any file of the set (another torch build, one edited numpy file, a
planted ``.pyc``, an added ``.pth``) give different digests.

Cost: hashing is the cost (about 2 GB for a CPU torch environment with its standard library).
:func:`hash_file` reads in blocks of :data:`HASH_BLOCK` bytes (the GIL is released for each
whole block) and remembers, for the life of the process, a file's hash under its
``(st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns)``: any write changes ``st_ctime_ns``,
so a remembered hash never stands for edited bytes. The only hashes taken from disk are those
of ``attest.digest_cache`` (:func:`remember`), under the same key and only from a file that
no one but root can have written. The trainer does not walk the set at all: it attests the
stored manifest and checks, lazily, each file it executes against it (``trainer.guard``).
"""

from __future__ import annotations

import ast
import hashlib
import io
import os
import stat
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "CACHE_NAME",
    "MANIFEST_HEADER",
    "MANIFEST_NAME",
    "PROJECT_PACKAGES",
    "CodeDigest",
    "CodeSetError",
    "Entry",
    "ManifestIndex",
    "code_digest",
    "encode_manifest",
    "entry_of",
    "environment_manifest",
    "hash_file",
    "hash_file_counted",
    "index_manifest",
    "line_matches",
    "parse_manifest",
    "remember",
    "remembered",
]

PROJECT_PACKAGES = ("sealed", "kms_broker", "attest", "trainer")
MANIFEST_HEADER = b"ct-code-manifest/v1\n"
MANIFEST_NAME = "ct-code-manifest"
CACHE_NAME = "ct-code-cache"  # attest.digest_cache, beside the manifest
MAX_MANIFEST_BYTES = 64 << 20
HASH_BLOCK = 16 << 20
_MAX_LINKS = 40


class CodeSetError(ValueError):
    """An environment or manifest that cannot be measured or parsed (names the path)."""


@dataclass(frozen=True, slots=True)
class Entry:
    kind: str  # "F" file or "L" link
    path: str
    sha256: str = ""  # F
    size: int = 0  # F
    target: str = ""  # L

    def line(self) -> bytes:
        for text in (self.path, self.target):
            if "\t" in text or "\n" in text:
                raise CodeSetError(f"{text!r}: a tab or newline in a path cannot be measured")
        if self.kind == "F":
            return f"F\t{self.sha256}\t{self.size}\t{self.path}\n".encode()
        return f"L\t{self.target}\t{self.path}\n".encode()


@dataclass(frozen=True, slots=True)
class CodeDigest:
    digest: str  # hex SHA-256 of the manifest
    python_version: str
    torch_version: str
    files: int

    def claims(self) -> dict[str, str]:
        return {
            "code_digest": self.digest,
            "python_version": self.python_version,
            "torch_version": self.torch_version,
        }


# hashing -------------------------------------------------------------------------------------
StatKey = tuple[int, int, int, int, int]
# stat key -> (SHA-256 hex, when hashing began in ns since the epoch; 0: taken from a cache)
_memo: dict[StatKey, tuple[str, int]] = {}
_cached: dict[StatKey, str] = {}  # from a trusted cache (remember), not yet asked for
_memo_lock = threading.Lock()


def _stat_key(st: os.stat_result) -> StatKey:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def remember(key: StatKey, digest: str) -> None:
    """Take a digest from a trusted persistent cache (``attest.digest_cache``)."""
    with _memo_lock:
        _cached.setdefault(key, digest)


def remembered() -> dict[StatKey, tuple[str, int]]:
    """What :func:`hash_file` hashed or took from the cache in this process: stat key ->
    (SHA-256 hex, when hashing began in ns since the epoch, 0 for a digest of the cache)."""
    with _memo_lock:
        return dict(_memo)


def hash_file(path: str | os.PathLike[str]) -> tuple[str, int]:
    """(SHA-256 hex, size) of a regular file; remembered in-process under its stat key."""
    digest, size, _ = hash_file_counted(path)
    return digest, size


def hash_file_counted(path: str | os.PathLike[str]) -> tuple[str, int, int]:
    """:func:`hash_file` plus the number of bytes it read (0 when the memo knew the file)."""
    started_ns = time.time_ns()
    with open(path, "rb", buffering=0) as f:
        st = os.fstat(f.fileno())
        key = _stat_key(st)
        with _memo_lock:
            known = _memo.get(key)
            if known is None and key in _cached:
                known = _memo[key] = (_cached.pop(key), 0)
        if known is not None:
            return known[0], st.st_size, 0
        digest = _sha256_of(f, st.st_size)
        if _stat_key(os.fstat(f.fileno())) != key:
            raise CodeSetError(f"{path}: changed while it was hashed")
    with _memo_lock:
        _memo[key] = (digest, started_ns)
    return digest, st.st_size, st.st_size


def _sha256_of(f: io.RawIOBase, size: int) -> str:
    """SHA-256 of an open file, read in blocks of up to :data:`HASH_BLOCK` bytes. Both
    ``readinto`` and ``update`` release the GIL for the whole block, so a thread hashing a
    400 MB library needs the GIL a few dozen times, not thousands (``hashlib.file_digest``
    reads 256 KiB at a time, and each reacquisition waits out the importing thread's switch
    interval)."""
    h = hashlib.sha256()
    buffer = bytearray(max(1, min(size + 1, HASH_BLOCK)))
    view = memoryview(buffer)
    while n := f.readinto(view):
        h.update(view[:n])
    return h.hexdigest()


def hash_bytes_of(path: str) -> tuple[bytes, str]:
    """The bytes of ``path`` and their SHA-256: a caller that executes them uses these bytes,
    so what was checked is what runs."""
    with open(path, "rb") as f:
        data = f.read()
    return data, hashlib.sha256(data).hexdigest()


# the set ---------------------------------------------------------------------------------------
class _Image:
    """Paths inside an image directory ``root`` (``/`` for the running system)."""

    def __init__(self, root: str | os.PathLike[str] = "/") -> None:
        self.root = os.path.realpath(root)

    def host(self, path: str) -> str:
        return path if self.root == "/" else self.root + path

    def runtime(self, host_path: str) -> str:
        if self.root == "/":
            return host_path
        rel = os.path.relpath(host_path, self.root)
        return "/" + ("" if rel == "." else rel)

    def resolve(self, path: str) -> str:
        """The run-time path of ``path`` with every link followed inside the image."""
        if self.root == "/":
            return os.path.realpath(path)
        parts = [p for p in path.split("/") if p]
        done: list[str] = []
        hops = 0
        while parts:
            part = parts.pop(0)
            if part == "..":
                if done:
                    done.pop()
                continue
            if part == ".":
                continue
            candidate = self.host("/" + "/".join([*done, part]))
            if os.path.islink(candidate):
                hops += 1
                if hops > _MAX_LINKS:
                    raise CodeSetError(f"{path}: too many levels of links")
                target = os.readlink(candidate)
                parts = [p for p in target.split("/") if p] + parts
                if target.startswith("/"):
                    done = []
                continue
            done.append(part)
        return "/" + "/".join(done)


def _decode(raw: bytes) -> str:
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise CodeSetError(f"{raw!r}: a path that is not UTF-8 cannot be measured") from None


def _walk(image: _Image, runtime_dir: str, excluded: set[str], out: dict[str, Entry]) -> None:
    top = image.host(runtime_dir).encode()
    for directory, dirs, files in os.walk(top, followlinks=False):
        keep = []
        for d in dirs:
            full = os.path.join(directory, d)
            run = image.runtime(_decode(full))
            if run in excluded:
                continue
            if os.path.islink(full):
                files.append(d)
                continue
            keep.append(d)
        dirs[:] = sorted(keep)
        for name in files:
            full = os.path.join(directory, name)
            run = image.runtime(_decode(full))
            if run in excluded or run in out:
                continue
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                out[run] = Entry("L", run, target=_decode(os.readlink(full)))
            elif stat.S_ISREG(st.st_mode):
                digest, size = hash_file(full)
                out[run] = Entry("F", run, sha256=digest, size=size)


def _add_file(image: _Image, runtime_path: str, out: dict[str, Entry]) -> None:
    real = image.resolve(runtime_path)
    host = image.host(real)
    if real not in out and os.path.isfile(host):
        digest, size = hash_file(host)
        out[real] = Entry("F", real, sha256=digest, size=size)


def _pyvenv_home(image: _Image, env: str) -> str | None:
    cfg = image.host(env + "/pyvenv.cfg")
    if not os.path.isfile(cfg):
        return None
    for line in Path(cfg).read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() == "home":
            return value.strip()
    raise CodeSetError(f"{cfg}: no `home =` line")


def _stdlib(image: _Image, base: str) -> str:
    lib = image.host(base + "/lib")
    found = sorted(name for name in (os.listdir(lib) if os.path.isdir(lib) else [])
                   if name.startswith("python3") and os.path.isfile(f"{lib}/{name}/os.py"))
    if len(found) != 1:
        raise CodeSetError(f"{lib}: expected one standard library (pythonX.Y/os.py), "
                           f"found {found or 'none'}")
    return image.resolve(f"{base}/lib/{found[0]}")


def _site_dirs(image: _Image, env: str, stdlib: str, is_venv: bool) -> list[str]:
    name = os.path.basename(stdlib)
    if not is_venv:
        return [stdlib + "/site-packages"] if os.path.isdir(image.host(stdlib + "/site-packages")) \
            else []
    candidate = image.resolve(f"{env}/lib/{name}/site-packages")
    return [candidate] if os.path.isdir(image.host(candidate)) else []


def _pth_dirs(image: _Image, site: str) -> list[str]:
    """Directories the site directory's .pth files add (setuptools' editable finders too)."""
    out: list[str] = []
    host_site = image.host(site)
    for name in sorted(os.listdir(host_site)):
        path = os.path.join(host_site, name)
        if name.endswith(".pth") and os.path.isfile(path):
            for line in Path(path).read_text(errors="replace").splitlines():
                line = line.strip()
                if not line or line.startswith(("#", "import ", "import\t")):
                    continue
                target = image.resolve(os.path.join(site, line))
                if os.path.isdir(image.host(target)):
                    out.append(target)
        elif name.startswith("__editable__") and name.endswith("_finder.py"):
            out += _editable_mapping(image, path)
    return out


def _editable_mapping(image: _Image, finder: str) -> list[str]:
    tree = ast.parse(Path(finder).read_text())
    for node in tree.body:
        target = getattr(node, "target", None)
        if isinstance(node, ast.AnnAssign | ast.Assign) and node.value is not None:
            names = [target] if target is not None else getattr(node, "targets", [])
            if any(isinstance(n, ast.Name) and n.id == "MAPPING" for n in names):
                mapping = ast.literal_eval(node.value)
                return [image.resolve(str(v)) for v in mapping.values()]
    return []


def environment_manifest(
    env: str | os.PathLike[str] | None = None, *, root: str | os.PathLike[str] = "/"
) -> bytes:
    """The canonical manifest (see module doc) of the environment ``env`` (default: this
    interpreter's ``sys.prefix``), inside the image directory ``root``."""
    image = _Image(root)
    if env is None:
        env_path = image.runtime(os.path.realpath(sys.prefix)) if image.root == "/" else "/"
    else:
        env_path = str(env)
        if not env_path.startswith("/"):
            raise CodeSetError(f"{env}: the environment must be an absolute path")
    env_path = image.resolve(env_path)
    if not os.path.isdir(image.host(env_path)):
        raise CodeSetError(f"{image.host(env_path)}: no such environment directory")
    home = _pyvenv_home(image, env_path)
    base = os.path.dirname(image.resolve(home)) if home else env_path
    stdlib = _stdlib(image, base)
    out: dict[str, Entry] = {}
    manifest_path = env_path + "/" + MANIFEST_NAME
    cache_path = env_path + "/" + CACHE_NAME
    for exe in ("python3", "python"):
        if os.path.lexists(image.host(f"{env_path}/bin/{exe}")):
            _add_file(image, f"{env_path}/bin/{exe}", out)
            break
    else:
        raise CodeSetError(f"{image.host(env_path)}/bin: no python3 interpreter")
    _add_file(image, env_path + "/pyvenv.cfg", out)
    lib = image.host(base + "/lib")
    for name in sorted(os.listdir(lib)):
        if name.startswith("libpython"):
            full = os.path.join(lib, name)
            run = image.runtime(full)
            if os.path.islink(full):
                out[run] = Entry("L", run, target=os.readlink(full))
            elif os.path.isfile(full):
                _add_file(image, run, out)
    sites = _site_dirs(image, env_path, stdlib, home is not None)
    excluded = {stdlib + "/site-packages", stdlib + "/dist-packages", manifest_path, cache_path}
    _walk(image, stdlib, excluded, out)
    extra: list[str] = []
    for site in sites:
        _walk(image, site, {manifest_path, cache_path}, out)
        extra += _pth_dirs(image, site)
    for directory in extra:
        _walk(image, directory, {manifest_path, cache_path}, out)
    return encode_manifest(out.values())


def encode_manifest(entries: Iterable[Entry]) -> bytes:
    ordered = sorted(entries, key=lambda e: e.path.encode())
    return MANIFEST_HEADER + b"".join(e.line() for e in ordered)


def parse_manifest(data: bytes) -> dict[str, Entry]:
    """Entries by path; a manifest that is not canonical is refused (:class:`CodeSetError`)."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise CodeSetError(f"code manifest larger than {MAX_MANIFEST_BYTES} bytes")
    if not data.startswith(MANIFEST_HEADER):
        raise CodeSetError("code manifest: bad header (expected ct-code-manifest/v1)")
    entries: dict[str, Entry] = {}
    body = data[len(MANIFEST_HEADER):]
    if body and not body.endswith(b"\n"):
        raise CodeSetError("code manifest: the last line does not end in a newline")
    last = b""
    for number, raw in enumerate(body.split(b"\n")[:-1] if body else [], start=2):
        fields = raw.split(b"\t")
        try:
            if fields[0] == b"F" and len(fields) == 4 and len(fields[1]) == 64:
                if fields[1] != fields[1].lower():
                    raise ValueError
                int(fields[1], 16)
                entry = Entry("F", fields[3].decode(), sha256=fields[1].decode(),
                              size=int(fields[2]))
            elif fields[0] == b"L" and len(fields) == 3:
                entry = Entry("L", fields[2].decode(), target=fields[1].decode())
            else:
                raise ValueError
        except (ValueError, UnicodeDecodeError):
            raise CodeSetError(f"code manifest line {number}: malformed") from None
        key = entry.path.encode()
        if key <= last or entry.line() != raw + b"\n":
            raise CodeSetError(f"code manifest line {number}: not canonical (order or form)")
        last = key
        entries[entry.path] = entry
    return entries


class ManifestIndex:
    """Each path's manifest line, found without building a table of the whole manifest
    (some 47,000 lines, of which a start looks up about 1,300).

    The lines are sorted by the UTF-8 bytes of the path (which follows the last tab), so the
    lines of every file under a directory ``D`` lie together, from the first path ``>= D/`` to
    the first path ``>= D0`` (``0`` follows ``/``). A look-up finds its directory's block once
    by binary search over the manifest bytes and remembers it; a small block (a
    ``__pycache__`` directory, a package's modules: at most :data:`SMALL_BLOCK` bytes) becomes
    a table of its lines by path, so the next look-ups in that directory cost one dict access;
    a larger block is searched in place. The digest covers the bytes, so a manifest that is not
    canonical, which this may answer wrongly, only gives a digest that no tenant computed.
    :func:`line_matches` checks a line against bytes' digest and size."""

    __slots__ = ("_blocks", "_data", "_start")
    SMALL_BLOCK = 32 << 10

    def __init__(self, data: bytes) -> None:
        if len(data) > MAX_MANIFEST_BYTES or not data.startswith(MANIFEST_HEADER):
            raise CodeSetError("code manifest: bad header or too large")
        self._data = data
        self._start = len(MANIFEST_HEADER)
        # directory (UTF-8 bytes) -> its block: a table {path: line}, or (start, end) offsets
        self._blocks: dict[bytes, dict[bytes, bytes] | tuple[int, int]] = {}

    def _lower(self, key: bytes, lo: int, hi: int) -> int:
        """The offset of the first whole line in ``[lo, hi)`` whose path is ``>= key``."""
        data = self._data
        while lo < hi:
            mid = (lo + hi) // 2
            start = data.rfind(b"\n", lo, mid) + 1 or lo
            end = data.find(b"\n", mid, hi)
            if end < 0:
                end = hi
            line = data[start:end]
            if line[line.rfind(b"\t") + 1:] < key:
                lo = end + 1
            else:
                hi = start
        return lo

    def _block(self, directory: bytes) -> dict[bytes, bytes] | tuple[int, int]:
        block = self._blocks.get(directory)
        if block is None:
            lo = self._lower(directory + b"/", self._start, len(self._data))
            hi = self._lower(directory + b"0", lo, len(self._data))
            if hi - lo <= self.SMALL_BLOCK:
                block = {line[line.rfind(b"\t") + 1:]: line
                         for line in self._data[lo:hi].split(b"\n")[:-1]}
            else:
                block = (lo, hi)
            self._blocks[directory] = block
        return block

    def get(self, path: str) -> bytes | None:
        try:
            key = path.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            return None  # no file system path: not in any manifest
        slash = key.rfind(b"/")
        if slash < 0:
            return None  # every path of a manifest is absolute
        block = self._block(key[:slash])
        if type(block) is dict:
            return block.get(key)
        lo, hi = block
        at = self._lower(key, lo, hi)
        if at >= hi:
            return None
        end = self._data.find(b"\n", at, hi)
        line = self._data[at:end]
        return line if line[line.rfind(b"\t") + 1:] == key else None

    def __contains__(self, path: object) -> bool:
        return isinstance(path, str) and self.get(path) is not None


def index_manifest(data: bytes) -> ManifestIndex:
    """The manifest's lines by path, for looking entries up at run time without the cost of
    :func:`parse_manifest`'s checks (:class:`ManifestIndex`)."""
    return ManifestIndex(data)


def line_matches(line: bytes, sha256: str, size: int) -> bool:
    """Whether a manifest line is the file entry of bytes with this SHA-256 (lowercase hex)
    and size (a link's line never is)."""
    return line.startswith(b"F\t%s\t%d\t" % (sha256.encode(), size))


def entry_of(line: bytes) -> Entry | None:
    """The file entry of one manifest line (None for a link or a malformed line)."""
    fields = line.split(b"\t")
    if len(fields) != 4 or fields[0] != b"F" or not fields[2].isdigit():
        return None
    return Entry("F", fields[3].decode(errors="surrogateescape"), sha256=fields[1].decode(),
                 size=int(fields[2]))


def _torch_version(manifest: Mapping[str, Entry]) -> str:
    for path in manifest:
        if path.endswith("/torch/version.py"):
            for line in Path(path).read_text(errors="replace").splitlines():
                if line.startswith("__version__"):
                    return line.split("=", 1)[1].strip().strip("'\"")
    return "none"


def code_digest(
    env: str | os.PathLike[str] | None = None, *, root: str | os.PathLike[str] = "/"
) -> CodeDigest:
    """Measure the environment (default: this interpreter's) and digest its manifest."""
    manifest = environment_manifest(env, root=root)
    entries = parse_manifest(manifest)
    return CodeDigest(
        digest=hashlib.sha256(manifest).hexdigest(),
        python_version=".".join(map(str, sys.version_info[:3])),
        torch_version=_torch_version(entries) if root == "/" else "none",
        files=len(entries),
    )
