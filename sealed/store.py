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
straight from it instead of copying into its read buffer. A store may also take
:class:`ReadAheadStore`'s ``will_need`` hint, which the reader gives for the chunks after the
one it is decrypting.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import queue
import re
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Protocol, runtime_checkable

from sealed.errors import StoreError

__all__ = [
    "MAX_NAME_LENGTH",
    "CountingStore",
    "LocalDirStore",
    "MappedDirStore",
    "MemoryStore",
    "ObjectStore",
    "RangeViewStore",
    "ReadAheadStore",
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
_READ_AHEAD_PIECE = 8 << 20  # the read-ahead thread reads (and probes) 8 MiB at a time

Chunks = bytes | bytearray | memoryview | Iterable[bytes | bytearray | memoryview]


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
class ReadAheadStore(Protocol):
    """Optional capability: a hint to start fetching a range that will be read soon."""

    def will_need(self, name: str, offset: int, length: int) -> threading.Event | None:
        """Start fetching; an event set once the range is fetched, or None if it is ready."""
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
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self._root = Path(root)
        self._root.mkdir(parents=True, exist_ok=True)
        self._root = self._root.resolve()

    def __repr__(self) -> str:
        return "LocalDirStore(...)"

    def _path(self, name: str) -> Path:
        return self._root.joinpath(*validate_object_name(name).split("/"))

    def put(self, name: str, data: Chunks) -> int:
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
                        if size - kicked >= _WRITEBACK_BYTES:
                            # start writing back what is written so far (Linux: DONTNEED on
                            # dirty pages starts asynchronous writeback), so the fsync below
                            # waits for the last few MiB, not the whole object
                            with contextlib.suppress(OSError):
                                os.posix_fadvise(fd, kicked, size - kicked,
                                                 os.POSIX_FADV_DONTNEED)
                            kicked = size
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


def _cached(path: Path, offset: int) -> bool:
    """Whether the byte at ``offset`` of the file is in the page cache (False if unsure)."""
    nowait = getattr(os, "RWF_NOWAIT", 0)
    if not nowait:
        return False
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return True  # nothing to read ahead; the read that follows reports the error
    try:
        return os.preadv(fd, [bytearray(1)], offset, nowait) == 1
    except OSError:  # BlockingIOError: not cached
        return False
    finally:
        os.close(fd)


class MappedDirStore(LocalDirStore):
    """A :class:`LocalDirStore` whose ranged reads are zero-copy memory maps: the trainer's store.

    ``view_range`` maps the object read-only and keeps the mapping for the next read, so the
    reader decrypts straight from the page cache (no copy into a read buffer, no page faults
    on a re-read: with the data cached this runs at the speed of AES-GCM on memory). No
    ``MADV_SEQUENTIAL``: its drop-behind would evict pages the next epoch re-reads, and the
    read-ahead below does the sequential part. ``will_need`` hands a range to a read-ahead
    thread that reads what is not cached yet through the kernel's read path: the reader hints
    the chunks ahead of the one it decrypts, so on a cold cache the disk reads while the CPU
    decrypts.

    Objects written through a store are never modified in place (a replacement is a new
    file), and the size is checked when the object is mapped, so a mapping stays valid; but
    if someone truncates an object file in place *while* it is mapped and read, the process
    receives SIGBUS and dies (the trainer is not dumpable and has no core limit, so its
    plaintext dies with its memory; nothing reaches disk). A store whose directory others may
    write should be read with :class:`LocalDirStore`, which reports such a file as short.
    """

    def __repr__(self) -> str:
        return "MappedDirStore(...)"

    def will_need(self, name: str, offset: int, length: int) -> threading.Event | None:
        """Bring ``[offset, offset + length)`` into the page cache in the background.

        Returns None if the range's last byte is cached already (probed here with a
        non-blocking ``preadv(RWF_NOWAIT)``: the warm case costs one system call); otherwise
        a read-ahead thread reads the range through the kernel's read path (large readahead,
        unlike page faults) into a scratch buffer of ciphertext, and the returned event is set
        once it has. The caller decrypts what is cached meanwhile and waits for the event
        before it touches the range.
        """
        _check_range(offset, length)
        path = self._path(name)
        if length == 0 or _cached(path, offset + length - 1):
            return None
        done = threading.Event()
        with self._maps_lock:
            if self._ahead is None:
                self._ahead = queue.SimpleQueue()
                threading.Thread(target=self._read_ahead, args=(self._ahead,),
                                 name="store-read-ahead", daemon=True).start()
            self._ahead.put((path, offset, length, done))
        return done

    @staticmethod
    def _read_ahead(hints: queue.SimpleQueue[tuple[Path, int, int, threading.Event] | None],
                    ) -> None:
        scratch = bytearray(_READ_AHEAD_PIECE)
        while (hint := hints.get()) is not None:
            path, offset, length, done = hint
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    end = offset + length
                    for piece in range(offset, end, _READ_AHEAD_PIECE):
                        n = min(_READ_AHEAD_PIECE, end - piece)
                        if not os.preadv(fd, [memoryview(scratch)[:n]], piece):
                            break  # short file: the read that follows reports it
                finally:
                    os.close(fd)
            except OSError:
                pass  # a hint only: the read that follows reports the error
            finally:
                done.set()

    def __init__(self, root: str | os.PathLike[str]) -> None:
        super().__init__(root)
        # mappings kept between reads (the trainer reads every shard once per epoch): their
        # page tables stay filled, so a warm re-read costs no page faults. Keyed by the
        # file's identity, so a replaced object is mapped afresh.
        self._maps: dict[str, tuple[tuple[int, int, int], mmap.mmap]] = {}
        self._maps_lock = threading.Lock()
        self._ahead: queue.SimpleQueue[tuple[Path, int, int, threading.Event] | None] | None
        self._ahead = None

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
        the read-ahead thread."""
        with self._maps_lock:
            self._maps.clear()
            if self._ahead is not None:
                self._ahead.put(None)
                self._ahead = None


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

    def will_need(self, name: str, offset: int, length: int) -> threading.Event | None:
        """Forwarded to the inner store where it takes the hint (not counted: it is not a
        read of the caller's)."""
        if isinstance(self.inner, ReadAheadStore):
            return self.inner.will_need(name, offset, length)
        return None

    def size(self, name: str) -> int:
        return self.inner.size(name)

    def exists(self, name: str) -> bool:
        return self.inner.exists(name)

    def delete(self, name: str) -> None:
        self.inner.delete(name)

    def list(self, prefix: str = "") -> list[str]:
        return self.inner.list(prefix)


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
