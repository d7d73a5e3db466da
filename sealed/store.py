"""Object stores: where ciphertext lives. Names and sizes are all a store ever learns.

:class:`ObjectStore` is the interface: flat names such as ``shards/3f2a...``, whole-object
atomic ``put`` (a reader sees the complete object or none), ranged reads, ``size``,
``exists``, ``delete`` and ``list``. It maps one to one onto S3 (PutObject or a multipart
upload completed at the end, GetObject with ``Range``, HeadObject, DeleteObject,
ListObjectsV2 with a prefix), so an S3 backend plugs in later without touching callers.
Nothing in the interface exposes a local path.
:func:`open_store` turns a store address into a store: a local directory (or ``file://``
URI), or ``s3://bucket/prefix`` (:class:`sealed.s3store.S3Store`).

Object names: 1-512 characters, ``/``-separated components of ``[A-Za-z0-9._-]`` that start
with a letter or digit (so no ``.``/``..`` traversal, no hidden names, no absolute paths), at
most 8 components.

Backends here: :class:`LocalDirStore` (a directory; atomic writes with a temporary file in
the same directory, fsync, link into place, fsync of the directory), :class:`MappedDirStore`
(the same directory layout, with zero-copy reads through ``mmap``), :class:`MemoryStore`
(the fake, for tests of other components, and the zero-copy source of the benchmarks) and
:class:`CountingStore` (a wrapper that counts bytes and calls of reads, used to prove that
random access reads only what it needs). A store that already holds ciphertext in memory (or
maps it) may also offer :class:`RangeViewStore`'s ``view_range``; the reader then decrypts
straight from it instead of copying into its read buffer. A store may also offer
:class:`FetchStore`'s ``fetch``: an object opened for reads into the caller's buffers on a
background I/O thread, with a probe that says whether a range is in memory already; the
reader then decrypts a shard cached whole in place (``view_range``) and has the others read
into reused buffers ahead of the chunk it decrypts, so I/O overlaps decryption. A remote store may
offer :class:`WillNeedStore`'s ``will_need``: the reader names the start of the next shard
with it while it reads the end of the current one (:class:`sealed.s3store.S3Store`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import queue
import re
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Protocol, runtime_checkable

from sealed.errors import StoreError

__all__ = [
    "MAX_NAME_LENGTH",
    "CountingStore",
    "DeferredSyncStore",
    "Fetch",
    "FetchStore",
    "LocalDirStore",
    "MappedDirStore",
    "MemoryStore",
    "ObjectStore",
    "RangeViewStore",
    "ReadTicket",
    "WillNeedStore",
    "open_store",
    "validate_object_name",
]

MAX_NAME_LENGTH = 512
MAX_NAME_DEPTH = 8
MAX_RANGE = 1 << 31  # one ranged read returns at most 2 GiB
_COMPONENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_TMP_PREFIX = ".tmp-"
_WRITEBACK_BYTES = 8 << 20  # a put starts writeback after every 8 MiB it has written
_MAX_MAPPINGS = 4096  # objects a MappedDirStore keeps mapped between reads
SYNC_WAIT_S = 600.0  # LocalDirStore.sync gives up on an fsync that takes longer
_FETCH_PIECE = 8 << 20  # the I/O thread reads at most 8 MiB per system call
FETCH_WAIT_S = 600.0  # a background read that takes longer is reported as an error

Chunks = bytes | bytearray | memoryview | Iterable[bytes | bytearray | memoryview]
_Read = tuple["Fetch", int, memoryview, "ReadTicket"]


class _Unsynced:
    """An object put unsynced: ``flushed`` is set once its background fsync ran (``error``
    if it failed)."""

    __slots__ = ("error", "flushed", "path")

    def __init__(self, path: Path) -> None:
        self.path = path
        self.flushed = threading.Event()
        self.error: str | None = None


def validate_object_name(name: str) -> str:
    """Return ``name`` if it is a valid object name, else raise :class:`StoreError`."""
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_LENGTH:
        raise StoreError(f"object name must be 1-{MAX_NAME_LENGTH} characters")
    parts = name.split("/")
    if len(parts) > MAX_NAME_DEPTH or not all(_COMPONENT.fullmatch(p) for p in parts):
        raise StoreError(
            f"invalid object name {name!r:.80}: use '/'-separated components of letters, "
            "digits, '.', '_' or '-' that start with a letter or digit"
        )
    return name


def _check_prefix(prefix: str) -> str:
    if prefix and not prefix.endswith("/"):
        validate_object_name(prefix)
    elif prefix:
        validate_object_name(prefix[:-1])
    return prefix


def _iter_chunks(data: Chunks) -> Iterator[memoryview]:
    if isinstance(data, bytes | bytearray | memoryview):
        yield memoryview(data).cast("B")
        return
    for chunk in data:
        yield memoryview(chunk).cast("B")


@runtime_checkable
class ObjectStore(Protocol):
    """Flat object storage with atomic whole-object writes and ranged reads."""

    def put(self, name: str, data: Chunks) -> int:
        """Store ``data`` (bytes or an iterable of chunks, consumed once) as a new object.

        Atomic: on any error (including one raised by the chunk iterator) no object named
        ``name`` appears. Refuses to replace an existing object. Returns the size written.
        """
        ...

    def readinto(self, name: str, offset: int, buf: memoryview | bytearray) -> None:
        """Fill ``buf`` with the object's bytes ``[offset, offset + len(buf))`` exactly."""
        ...

    def get_range(self, name: str, offset: int, length: int) -> bytes: ...

    def size(self, name: str) -> int: ...

    def exists(self, name: str) -> bool: ...

    def delete(self, name: str) -> None:
        """Remove an object; removing a missing object is not an error."""
        ...

    def list(self, prefix: str = "") -> list[str]:
        """Names starting with ``prefix``, sorted."""
        ...


@runtime_checkable
class DeferredSyncStore(Protocol):
    """Optional capability: many puts made durable together (one wait instead of one each)."""

    def put_unsynced(self, name: str, data: Chunks) -> int:
        """:meth:`ObjectStore.put`, except that the object is durable only once :meth:`sync`
        has returned (readers see it complete at once; a crash before ``sync`` may leave it
        short). For objects that nothing refers to until ``sync`` returned."""
        ...

    def sync(self) -> None:
        """Make every object put with :meth:`put_unsynced` so far durable."""
        ...


@runtime_checkable
class FetchStore(Protocol):
    """Optional capability: background reads into the caller's buffers (see :class:`Fetch`)."""

    def fetch(self, name: str) -> Fetch | None:
        """Open object ``name`` for :meth:`Fetch.cached` probes and :meth:`Fetch.read_into`
        (None: this store has no background reads after all, e.g. a wrapper's inner store)."""
        ...


@runtime_checkable
class WillNeedStore(Protocol):
    """Optional capability: a hint that a range will be read soon (its fetch may start now)."""

    def will_need(self, name: str, offset: int, length: int) -> object:
        """Start fetching ``[offset, offset + length)`` of object ``name`` in the background;
        a later read of it is served from what was fetched. Only a hint: a failure shows
        in the read that wants the range."""
        ...


@runtime_checkable
class RangeViewStore(Protocol):
    """Optional capability: ranged reads without a copy (ciphertext already in memory)."""

    def view_range(self, name: str, offset: int, length: int) -> memoryview:
        """A read-only view of bytes ``[offset, offset + length)``; valid while referenced."""
        ...


def _check_range(offset: int, length: int) -> None:
    if not isinstance(offset, int) or not isinstance(length, int):
        raise StoreError("offset and length must be integers")
    if offset < 0 or not 0 <= length <= MAX_RANGE:
        raise StoreError(f"invalid range: offset {offset}, length {length}")


class LocalDirStore:
    """Objects as files under one directory (created if missing).

    A write goes to ``<dir>/.tmp-<random>`` in the object's directory (writeback started
    after every 8 MiB, so the disk writes while the caller produces more), is fsynced, then
    hard-linked to its final name (which fails if the name exists: objects are immutable),
    the temporary name is removed and the directory is fsynced. Readers never see a partial
    object; a crash leaves at most a ``.tmp-`` file, which :meth:`list` ignores.

    :meth:`put_unsynced` does the same without waiting: the file is fsynced by a background
    thread while the caller goes on, and :meth:`sync` waits for those fsyncs and fsyncs the
    directories (the dataset writer puts its shards like this and syncs once before it puts
    the manifest that names them, so no shard's flush holds up the encryption of the next).
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self._root = Path(root)
        self._root.mkdir(parents=True, exist_ok=True)
        self._root = self._root.resolve()
        self._paths: dict[str, Path] = {}  # validated names: the reader asks for each often
        self._unsynced: list[_Unsynced] = []
        self._flusher: queue.SimpleQueue[_Unsynced | None] | None = None
        self._unsynced_lock = threading.Lock()

    def __repr__(self) -> str:
        return "LocalDirStore(...)"

    def _path(self, name: str) -> Path:
        path = self._paths.get(name)
        if path is None:
            path = self._root.joinpath(*validate_object_name(name).split("/"))
            if len(self._paths) >= _MAX_MAPPINGS:
                self._paths.clear()
            self._paths[name] = path
        return path

    def put(self, name: str, data: Chunks) -> int:
        return self._put(name, data, durable=True)

    def put_unsynced(self, name: str, data: Chunks) -> int:
        return self._put(name, data, durable=False)

    def sync(self) -> None:
        with self._unsynced_lock:
            files, self._unsynced = self._unsynced, []
            flusher, self._flusher = self._flusher, None
        if flusher is not None:
            flusher.put(None)
        for f in files:
            if not f.flushed.wait(SYNC_WAIT_S):
                raise StoreError(f"cannot sync {f.path.name}: took over {SYNC_WAIT_S:.0f} s")
            if f.error is not None:
                raise StoreError(f"cannot sync {f.path.name}: {f.error}")
        for d in sorted({f.path.parent for f in files}):
            with self._os_errors(d.name):
                self._fsync_dir(d)

    @staticmethod
    def _flush_loop(paths: queue.SimpleQueue[_Unsynced | None]) -> None:
        """fsync each object put unsynced, in the background (its pages are written back
        while the caller produces the next one; :meth:`sync` waits for the last)."""
        while (item := paths.get()) is not None:
            try:
                fd = os.open(item.path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except FileNotFoundError:
                pass  # deleted since: nothing to make durable
            except OSError as exc:
                item.error = exc.strerror or str(exc)
            finally:
                item.flushed.set()

    def _put(self, name: str, data: Chunks, *, durable: bool) -> int:
        path = self._path(name)
        if path.exists():
            raise StoreError(f"object {name} already exists")
        tmp = path.parent / f"{_TMP_PREFIX}{os.urandom(8).hex()}"
        size = 0
        try:
            with self._os_errors(name):
                path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                f = open(fd, "wb", buffering=0)  # noqa: SIM115 - closed in the finally below
            try:
                kicked = 0
                # errors raised by the chunk iterator (the caller's source) pass unchanged
                for chunk in _iter_chunks(data):
                    with self._os_errors(name):
                        while chunk:
                            n = f.write(chunk)
                            chunk = chunk[n:]
                            size += n
                        if durable and size - kicked >= _WRITEBACK_BYTES:
                            # start writing back what is written so far (Linux: DONTNEED on
                            # dirty pages starts asynchronous writeback), so the fsync below
                            # waits for the last few MiB, not the whole object
                            with contextlib.suppress(OSError):
                                os.posix_fadvise(fd, kicked, size - kicked,
                                                 os.POSIX_FADV_DONTNEED)
                            kicked = size
                if durable:
                    with self._os_errors(name):
                        os.fsync(f.fileno())
            finally:
                f.close()
            with self._os_errors(name):
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    raise StoreError(f"object {name} already exists") from None
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        if not durable:
            unsynced = _Unsynced(path)
            with self._unsynced_lock:
                self._unsynced.append(unsynced)
                if self._flusher is None:
                    self._flusher = queue.SimpleQueue()
                    threading.Thread(target=self._flush_loop, args=(self._flusher,),
                                     name="store-flush", daemon=True).start()
                self._flusher.put(unsynced)
            return size
        with self._os_errors(name):
            self._fsync_dir(path.parent)
        return size

    @staticmethod
    @contextlib.contextmanager
    def _os_errors(name: str) -> Iterator[None]:
        try:
            yield
        except OSError as exc:
            raise StoreError(f"cannot write object {name}: {exc.strerror or exc}") from None

    @staticmethod
    def _fsync_dir(path: Path) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def readinto(self, name: str, offset: int, buf: memoryview | bytearray) -> None:
        view = memoryview(buf).cast("B")
        _check_range(offset, len(view))
        try:
            fd = os.open(self._path(name), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise StoreError(f"object {name} not found") from None
        except OSError as exc:
            raise StoreError(f"cannot read object {name}: {exc.strerror}") from None
        try:
            done = 0
            while done < len(view):
                n = os.preadv(fd, [view[done:]], offset + done)
                if n == 0:
                    raise StoreError(f"object {name} is shorter than {offset + len(view)} bytes")
                done += n
        except OSError as exc:
            raise StoreError(f"cannot read object {name}: {exc.strerror}") from None
        finally:
            os.close(fd)

    def get_range(self, name: str, offset: int, length: int) -> bytes:
        _check_range(offset, length)
        buf = bytearray(length)
        self.readinto(name, offset, buf)
        return bytes(buf)

    def size(self, name: str) -> int:
        try:
            return self._path(name).stat().st_size
        except FileNotFoundError:
            raise StoreError(f"object {name} not found") from None

    def exists(self, name: str) -> bool:
        return self._path(name).is_file()

    def delete(self, name: str) -> None:
        path = self._path(name)
        try:
            path.unlink()
        except FileNotFoundError:
            return
        except OSError as exc:
            raise StoreError(f"cannot delete object {name}: {exc.strerror}") from None
        self._fsync_dir(path.parent)

    def list(self, prefix: str = "") -> list[str]:
        _check_prefix(prefix)
        names = []
        for dirpath, dirnames, filenames in os.walk(self._root):
            dirnames[:] = [d for d in dirnames if _COMPONENT.fullmatch(d)]
            rel = Path(dirpath).relative_to(self._root)
            for f in filenames:
                if not _COMPONENT.fullmatch(f):
                    continue  # temporary files and anything not written through this store
                name = (rel / f).as_posix() if rel.parts else f
                if name.startswith(prefix):
                    names.append(name)
        return sorted(names)


class ReadTicket:
    """One background read: ``wait`` returns once the buffer is filled, or raises its error."""

    __slots__ = ("_done", "_error")

    def __init__(self) -> None:
        self._done = threading.Event()
        self._error: StoreError | None = None

    def _finish(self, error: StoreError | None) -> None:
        self._error = error
        self._done.set()

    def wait(self, timeout: float = FETCH_WAIT_S) -> None:
        if not self._done.wait(timeout):
            raise StoreError(f"a background read took longer than {timeout:.0f} s")
        if self._error is not None:
            raise self._error


class Fetch:
    """One object opened for probes and background reads; from :meth:`MappedDirStore.fetch`.

    :meth:`cached` says whether a range is in the page cache, from sampled pages (its first,
    its last and one every 8 MiB between): with ``cachestat`` (Linux 6.5 and later: no side
    effect; a call walks every page of its range, so each sample asks for one page); where that
    is missing, by a non-blocking ``preadv(RWF_NOWAIT)`` of the first and last byte (which may
    start reading around a byte that is not cached). :meth:`read_into` queues a read of
    ``[offset, offset + len(buf))`` into ``buf`` to the store's I/O thread and returns a
    ticket whose ``wait()`` returns once ``buf`` holds exactly those bytes (a short object is
    a :class:`StoreError`, never a partial buffer taken as complete). The caller must not
    touch ``buf`` until then. :meth:`close` waits for the reads still queued, then closes the
    file.
    """

    __slots__ = ("_fd", "_last", "_name", "_queue_read")

    def __init__(self, name: str, fd: int,
                 queue_read: Callable[[Fetch, int, memoryview, ReadTicket], None]) -> None:
        self._name, self._fd, self._queue_read = name, fd, queue_read
        self._last: ReadTicket | None = None

    def cached(self, offset: int, length: int) -> bool:
        """Whether ``[offset, offset + length)`` is in memory (False where unknown)."""
        if length <= 0:
            return True
        if self._fd < 0:
            return False
        # sampled pages: the first, the last and one per _PROBE_SPACING between (cachestat
        # walks every page of its range, about 0.2 us each: a whole 64 MiB shard costs ms)
        last = offset + length - 1
        points = range(offset, last, _PROBE_SPACING)[1:]
        for at in (offset, last, *points):
            pages = _cached_pages(self._fd, at, 1)
            if pages is None:
                break  # no cachestat here: the fallback below
            if not pages:
                return False
        else:
            return True
        if not _RWF_NOWAIT:
            return False
        try:
            return all(os.preadv(self._fd, [bytearray(1)], at, _RWF_NOWAIT) == 1
                       for at in (offset, last))
        except OSError:  # BlockingIOError: not cached (or unsupported: read it then)
            return False

    def read_into(self, offset: int, buf: memoryview) -> ReadTicket:
        if self._fd < 0:
            raise StoreError(f"object {self._name} is closed for fetching")
        _check_range(offset, len(buf))
        ticket = ReadTicket()
        self._last = ticket
        self._queue_read(self, offset, buf, ticket)
        return ticket

    def _read(self, offset: int, buf: memoryview) -> StoreError | None:
        """Run by the I/O thread: fill ``buf`` from ``offset`` (an error is returned)."""
        done, size = 0, len(buf)
        try:
            while done < size:
                n = os.preadv(self._fd, [buf[done : done + _FETCH_PIECE]], offset + done)
                if n == 0:
                    return StoreError(f"object {self._name} is shorter than {offset + size} bytes")
                done += n
        except OSError as exc:
            return StoreError(f"cannot read object {self._name}: {exc.strerror or exc}")
        return None

    def close(self) -> None:
        if self._fd < 0:
            return
        if self._last is not None:  # the I/O thread still reads into the caller's buffers
            with contextlib.suppress(StoreError):
                self._last.wait()
        os.close(self._fd)
        self._fd = -1

    def __enter__(self) -> Fetch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_RWF_NOWAIT = getattr(os, "RWF_NOWAIT", 0)
_FADV_SEQUENTIAL = getattr(os, "POSIX_FADV_SEQUENTIAL", None)  # None: no posix_fadvise here
_PROBE_SPACING = 8 << 20  # Fetch.cached samples a page every 8 MiB of a long range
_SYS_CACHESTAT = 451  # Linux >= 6.5; one number on every architecture


class _CacheRange(ctypes.Structure):
    _fields_ = (("off", ctypes.c_uint64), ("len", ctypes.c_uint64))


class _CacheStat(ctypes.Structure):
    _fields_ = tuple((f, ctypes.c_uint64) for f in (
        "nr_cache", "nr_dirty", "nr_writeback", "nr_evicted", "nr_recently_evicted"))


_cachestat: list[object] = []  # [libc.syscall] once it worked; [None] once it failed


def _cached_pages(fd: int, offset: int, length: int) -> int | None:
    """Pages of ``[offset, offset + length)`` in the page cache (``cachestat(2)``), or None
    where the kernel (or a sandbox) does not offer it."""
    if not _cachestat:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            _cachestat.append(libc.syscall)
        except (OSError, AttributeError):
            _cachestat.append(None)
    syscall = _cachestat[0]
    if syscall is None:
        return None
    span, stat = _CacheRange(offset, length), _CacheStat()
    if syscall(_SYS_CACHESTAT, fd, ctypes.byref(span), ctypes.byref(stat), 0) != 0:
        if ctypes.get_errno() in (errno.ENOSYS, errno.EPERM):
            _cachestat[0] = None  # not this kernel: the fallback from now on
        return None
    return int(stat.nr_cache)


class MappedDirStore(LocalDirStore):
    """A :class:`LocalDirStore` with zero-copy reads of cached data: the trainer's store.

    Two ways in, chosen by the reader per shard:

    * ``view_range`` maps the object read-only and keeps the mapping for the next read, so data
      in the page cache is decrypted in place (no copy into a read buffer, no page faults on a
      re-read: with the data cached this runs at the speed of AES-GCM on memory). No
      ``MADV_SEQUENTIAL``: its drop-behind would evict pages the next epoch re-reads.
    * ``fetch`` opens the object for background reads (:class:`Fetch`), advised
      ``POSIX_FADV_SEQUENTIAL`` (on Linux: twice the device's read-ahead window for that open
      file, so the disk keeps reading ahead while the I/O thread waits for the GIL or a core
      between two reads; nothing is dropped behind): ``cached`` probes whether a range is in
      memory; ``read_into`` has this store's I/O thread read a range through the kernel's
      read path (large sequential reads, as a plain ``read`` of the file) into the caller's
      buffer. A shard not cached whole is read this way, all of it in order,
      ahead of the chunk being decrypted, into reused buffers, and decrypted from them: a
      mapping would fault it in a few pages at a time, several times slower than the disk.

    Objects written through a store are never modified in place (a replacement is a new
    file), and the size is checked when the object is mapped, so a mapping stays valid; but
    if someone truncates an object file in place *while* it is mapped and read, the process
    receives SIGBUS and dies (the trainer is not dumpable and has no core limit, so its
    plaintext dies with its memory; nothing reaches disk). Reads through ``fetch`` report
    such a file as short. A store whose directory others may write should be read with
    :class:`LocalDirStore`, which reports such a file as short too.
    """

    def __repr__(self) -> str:
        return "MappedDirStore(...)"

    def fetch(self, name: str) -> Fetch:
        try:
            fd = os.open(self._path(name), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise StoreError(f"object {name} not found") from None
        except OSError as exc:
            raise StoreError(f"cannot read object {name}: {exc.strerror}") from None
        if _FADV_SEQUENTIAL is not None:
            # the I/O thread reads this object front to back: Linux doubles the kernel's
            # read-ahead window on this open file (no drop-behind), so the disk keeps reading
            # while the I/O thread waits for the GIL or a core between two reads
            with contextlib.suppress(OSError):
                os.posix_fadvise(fd, 0, 0, _FADV_SEQUENTIAL)
        return Fetch(name, fd, self._queue_read)

    def _queue_read(self, fetch: Fetch, offset: int, buf: memoryview, ticket: ReadTicket) -> None:
        with self._maps_lock:
            if self._reads is None:
                self._reads = queue.SimpleQueue()
                threading.Thread(target=self._io_loop, args=(self._reads,),
                                 name="store-io", daemon=True).start()
            self._reads.put((fetch, offset, buf, ticket))

    @staticmethod
    def _io_loop(reads: queue.SimpleQueue[_Read | None]) -> None:
        while (item := reads.get()) is not None:
            fetch, offset, buf, ticket = item
            error: StoreError | None = StoreError("background read failed")
            try:
                error = fetch._read(offset, buf)
            finally:
                ticket._finish(error)

    def __init__(self, root: str | os.PathLike[str]) -> None:
        super().__init__(root)
        # mappings kept between reads (the trainer reads every shard once per epoch): their
        # page tables stay filled, so a warm re-read costs no page faults. Keyed by the
        # file's identity, so a replaced object is mapped afresh.
        self._maps: dict[str, tuple[tuple[int, int, int], mmap.mmap]] = {}
        self._maps_lock = threading.Lock()
        self._reads: queue.SimpleQueue[_Read | None] | None = None

    def _mapping(self, name: str, need: int) -> mmap.mmap | None:
        try:
            fd = os.open(self._path(name), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise StoreError(f"object {name} not found") from None
        except OSError as exc:
            raise StoreError(f"cannot read object {name}: {exc.strerror}") from None
        try:
            st = os.fstat(fd)
            if need > st.st_size:
                raise StoreError(f"object {name} is shorter than {need} bytes")
            if st.st_size == 0:
                return None
            ident = (st.st_dev, st.st_ino, st.st_size)
            with self._maps_lock:
                cached = self._maps.get(name)
                if cached is not None and cached[0] == ident:
                    return cached[1]
            mapping = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
        except OSError as exc:
            raise StoreError(f"cannot map object {name}: {exc.strerror}") from None
        finally:
            os.close(fd)
        with self._maps_lock:
            if len(self._maps) >= _MAX_MAPPINGS:
                # dropped, not closed: views still in use keep their mapping alive
                self._maps.pop(next(iter(self._maps)))
            self._maps[name] = (ident, mapping)
        return mapping

    def view_range(self, name: str, offset: int, length: int) -> memoryview:
        _check_range(offset, length)
        mapping = self._mapping(name, offset + length)
        if mapping is None or length == 0:
            return memoryview(b"")
        # the view keeps the mapping alive; it is unmapped when no view and no cache holds it
        return memoryview(mapping)[offset : offset + length]

    def delete(self, name: str) -> None:
        with self._maps_lock:
            self._maps.pop(name, None)
        super().delete(name)

    def close(self) -> None:
        """Drop the kept mappings (views still in use keep theirs until released) and stop
        the I/O thread once it has done the reads queued before."""
        with self._maps_lock:
            self._maps.clear()
            if self._reads is not None:
                self._reads.put(None)
                self._reads = None


class MemoryStore:
    """An in-memory :class:`ObjectStore` with the same semantics (the fake for tests)."""

    def __init__(self) -> None:
        self._objects: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def put(self, name: str, data: Chunks) -> int:
        validate_object_name(name)
        if name in self._objects:
            raise StoreError(f"object {name} already exists")
        blob = b"".join(bytes(c) for c in _iter_chunks(data))
        with self._lock:
            if name in self._objects:
                raise StoreError(f"object {name} already exists")
            self._objects[name] = blob
        return len(blob)

    def _get(self, name: str) -> bytes:
        validate_object_name(name)
        try:
            return self._objects[name]
        except KeyError:
            raise StoreError(f"object {name} not found") from None

    def readinto(self, name: str, offset: int, buf: memoryview | bytearray) -> None:
        view = memoryview(buf).cast("B")
        _check_range(offset, len(view))
        blob = self._get(name)
        if offset + len(view) > len(blob):
            raise StoreError(f"object {name} is shorter than {offset + len(view)} bytes")
        view[:] = memoryview(blob)[offset : offset + len(view)]

    def view_range(self, name: str, offset: int, length: int) -> memoryview:
        _check_range(offset, length)
        blob = self._get(name)
        if offset + length > len(blob):
            raise StoreError(f"object {name} is shorter than {offset + length} bytes")
        return memoryview(blob)[offset : offset + length]

    def get_range(self, name: str, offset: int, length: int) -> bytes:
        _check_range(offset, length)
        blob = self._get(name)
        if offset + length > len(blob):
            raise StoreError(f"object {name} is shorter than {offset + length} bytes")
        return blob[offset : offset + length]

    def size(self, name: str) -> int:
        return len(self._get(name))

    def exists(self, name: str) -> bool:
        validate_object_name(name)
        return name in self._objects

    def delete(self, name: str) -> None:
        validate_object_name(name)
        with self._lock:
            self._objects.pop(name, None)

    def list(self, prefix: str = "") -> list[str]:
        _check_prefix(prefix)
        return sorted(n for n in self._objects if n.startswith(prefix))


class CountingStore:
    """Wraps a store and counts what is read: ``bytes_read``, ``reads`` (ranged reads)."""

    def __init__(self, inner: ObjectStore) -> None:
        self.inner = inner
        self.bytes_read = 0
        self.reads = 0
        self.ranges: list[tuple[str, int, int]] = []

    def reset(self) -> None:
        self.bytes_read = 0
        self.reads = 0
        self.ranges.clear()

    def _count(self, name: str, offset: int, length: int) -> None:
        self.bytes_read += length
        self.reads += 1
        self.ranges.append((name, offset, length))

    def put(self, name: str, data: Chunks) -> int:
        return self.inner.put(name, data)

    def readinto(self, name: str, offset: int, buf: memoryview | bytearray) -> None:
        self.inner.readinto(name, offset, buf)
        self._count(name, offset, len(memoryview(buf)))

    def get_range(self, name: str, offset: int, length: int) -> bytes:
        data = self.inner.get_range(name, offset, length)
        self._count(name, offset, len(data))
        return data

    def view_range(self, name: str, offset: int, length: int) -> memoryview:
        """Zero-copy where the inner store can; otherwise a copy. Counted either way."""
        if isinstance(self.inner, RangeViewStore):
            view = self.inner.view_range(name, offset, length)
        else:
            view = memoryview(self.inner.get_range(name, offset, length))
        self._count(name, offset, len(view))
        return view

    def fetch(self, name: str) -> Fetch | None:
        """The inner store's :class:`Fetch` with its reads counted when queued; None where the
        inner store has no background reads."""
        if not isinstance(self.inner, FetchStore):
            return None
        inner = self.inner.fetch(name)
        if inner is None:
            return None
        return _CountedFetch(inner, lambda offset, n: self._count(name, offset, n))

    def size(self, name: str) -> int:
        return self.inner.size(name)

    def exists(self, name: str) -> bool:
        return self.inner.exists(name)

    def delete(self, name: str) -> None:
        self.inner.delete(name)

    def list(self, prefix: str = "") -> list[str]:
        return self.inner.list(prefix)


class _CountedFetch(Fetch):
    """A :class:`Fetch` whose queued reads a :class:`CountingStore` counts."""

    __slots__ = ("_count", "_inner")

    def __init__(self, inner: Fetch, count: Callable[[int, int], None]) -> None:
        self._inner, self._count = inner, count

    def cached(self, offset: int, length: int) -> bool:
        return self._inner.cached(offset, length)

    def read_into(self, offset: int, buf: memoryview) -> ReadTicket:
        ticket = self._inner.read_into(offset, buf)
        self._count(offset, len(buf))
        return ticket

    def close(self) -> None:
        self._inner.close()


def open_store(address: str | os.PathLike[str], *, mapped: bool = False) -> ObjectStore:
    """The store at ``address``: ``s3://bucket[/prefix]`` (configured by the standard AWS
    environment and profile files, see :mod:`sealed.s3store`), else a local directory (a path
    or ``file://`` URI; a :class:`MappedDirStore` with ``mapped``, for reading)."""
    text = os.fspath(address)
    if text.startswith("s3://"):
        from sealed.s3store import S3Store  # botocore is loaded only for S3 stores

        return S3Store.from_url(text)
    if "://" in text and not text.startswith("file://"):
        raise StoreError(f"unsupported store address {text!r:.80}: use a directory, "
                         "file://PATH or s3://BUCKET/PREFIX")
    path = text.removeprefix("file://")
    return MappedDirStore(path) if mapped else LocalDirStore(path)
