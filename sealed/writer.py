"""Encrypt a folder or an iterable of records into a dataset in an object store.

:func:`write_dataset` makes two passes over the source. The first learns every record's size
(and name) and plans the shards; the second streams the bytes through the encrypter. Two
passes are what lets every shard's associated data bind the shard *count* while memory stays
constant: no shard is ever held in memory, only a fixed pool of segment buffers (see below)
and 8 bytes of index per record (plus its name, which the manifest keeps).

The second pass is a pipeline of three threads over :data:`PIPELINE_DEPTH` plaintext and as
many ciphertext segment buffers (about 8 MiB in all, whatever the dataset's size):

* the calling thread fills each plaintext buffer with exactly one segment's payload
  (1,048,520 bytes for segment 0, 1,048,560 after it: reads from files go straight into the
  buffer, segment-aligned, whatever the record boundaries) and encrypts it into a
  ciphertext buffer (the sizes, hence the last segment, are known from the first pass);
* only with ``plaintext_digests=True``: a digest thread computes each shard's plaintext
  SHA-256 (the manifest's ``sha256``) from the same plaintext buffers, beside encryption
  rather than in its way. Off by default: SHA-256 runs near 2 GB/s on one core, several times
  slower than AES-GCM, and it is redundant for integrity (the manifest binds each shard's
  stream header, so AES-GCM accepts only the exact ciphertext written with it); without it
  the manifest records 32 zero bytes for the digest;
* two store threads write the ciphertext (``store.put``: write, fsync, link), one shard
  each, while the next segments are read and encrypted: one shard is flushed to disk while
  the next is written. A store that offers it (``LocalDirStore``) takes the shards with
  ``put_unsynced`` instead (no fsync per shard: the disk writes back while the CPU encrypts)
  and one ``sync`` makes them all durable before the manifest, the commit point, is put.

``hashlib``, AES-GCM and file I/O release the GIL, so the three run on separate cores where
there are any. A failure in any of them stops all three; the error is raised in the caller.

Sources:

* a folder (``pathlib.Path``): every regular file below it is one record, in sorted order of
  its relative POSIX path, which is its name in the manifest. A symbolic link is followed
  only if it resolves to a regular file inside the folder; links that leave the folder, links
  to directories, and special files (FIFOs, sockets, devices) are errors. Every file is
  opened during the first pass, so an unreadable file fails before anything is written; a
  file that changes size between the passes is an error too.
* an iterable of records, each ``bytes``-like or a ``(name, bytes-like)`` pair. It must be
  re-iterable (a list, a tuple, or an object whose ``__iter__`` starts over): a one-shot
  iterator or generator is refused with :class:`InputError`.

Record names are relative POSIX paths: 1-4096 UTF-8 bytes, no leading ``/``, no empty, ``.``
or ``..`` component, no control characters.

Shards are published (atomic ``put``) as they are produced, the manifest last: the manifest is
the commit point. On any error, every shard this call published is deleted before the error
propagates, so the store holds no partial dataset. (A process killed mid-write can leave
shards that no manifest names: unreadable ciphertext, collectable by listing ``shards/``; a
machine that crashes before the final ``sync`` may leave such shards short too. A manifest is
put only after every shard it names is durable.)
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import stat
import threading
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from sealed import streaming
from sealed.errors import InputError, StoreError
from sealed.keys import DEK_SIZE, validate_identifier
from sealed.manifest import (
    MANIFEST_PREFIX,
    MAX_HOLDER_LENGTH,
    MAX_RECORD_NAME,
    MAX_SHARDS,
    MAX_SHARE_HOLDERS,
    NO_DIGEST,
    SHARD_PREFIX,
    Manifest,
    ShardEntry,
    seal_manifest,
)
from sealed.secrets import SecretBuffer, zeroize
from sealed.shard import (
    DEFAULT_TARGET_SHARD_SIZE,
    MAX_RECORD_SIZE,
    MAX_TARGET_SHARD_SIZE,
    MIN_TARGET_SHARD_SIZE,
    UPLOAD_ID_SIZE,
    plan_shards,
    shard_aad,
    shard_offsets,
    shard_prefix,
)
from sealed.store import DeferredSyncStore, ObjectStore

__all__ = ["DEFAULT_MAX_RECORD_SIZE", "DatasetRef", "validate_record_name", "write_dataset"]

DEFAULT_MAX_RECORD_SIZE = 256 << 20
PIPELINE_DEPTH = 4  # segment buffers per stage (plaintext, ciphertext): memory stays flat
STORE_THREADS = 2  # shards written at once: one is flushed (fsync) while the next is written
READ_AHEAD_BYTES = 32 << 20  # source files hinted to the kernel (WILLNEED) this far ahead
_POLL_S = 0.1  # how often a blocked stage checks whether another one failed

Progress = Callable[[int, int], None]
Buffer = bytes | bytearray | memoryview


@dataclass(frozen=True, kw_only=True)
class DatasetRef:
    """What a caller needs to find the dataset again (nothing secret)."""

    manifest_name: str
    tenant_id: str
    dataset_id: str
    key_version: int
    num_shards: int
    num_records: int
    plaintext_bytes: int
    ciphertext_bytes: int


def validate_record_name(name: object) -> str:
    """A record name for the manifest: a clean relative POSIX path, else InputError."""
    if not isinstance(name, str):
        raise InputError(f"record name must be a str, got {type(name).__name__}")
    try:
        raw = name.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(f"record name {name!r:.80} is not valid UTF-8") from None
    if not 0 < len(raw) <= MAX_RECORD_NAME:
        raise InputError(f"record name must be 1-{MAX_RECORD_NAME} bytes of UTF-8")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        raise InputError(f"record name {name!r:.80} contains control characters")
    if name.startswith("/") or any(p in ("", ".", "..") for p in name.split("/")):
        raise InputError(
            f"record name {name!r:.80} must be a relative path without '.', '..' or empty parts"
        )
    return name


# --------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class _Planned:
    name: str
    size: int


class _FolderSource:
    def __init__(self, root: Path, max_record_size: int) -> None:
        try:
            self._root = root.resolve(strict=True)
        except OSError as exc:
            raise InputError(f"source folder {root}: {exc.strerror}") from None
        if not self._root.is_dir():
            raise InputError(f"source {root} is not a folder")
        self._max = max_record_size
        self._files: list[tuple[str, Path]] = []

    def _check_entry(self, rel: str, path: Path) -> int:
        try:
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                target = path.resolve(strict=True)
                if not target.is_relative_to(self._root):
                    raise InputError(f"{rel}: symbolic link points outside the source folder")
                st = target.stat()
            if not stat.S_ISREG(st.st_mode):
                kind = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file"
                raise InputError(f"{rel}: {kind} (only regular files become records)")
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            os.close(fd)
        except InputError:
            raise
        except OSError as exc:
            raise InputError(f"{rel}: cannot read: {exc.strerror or exc}") from None
        if st.st_size > self._max:
            raise InputError(
                f"{rel}: {st.st_size} bytes exceeds the maximum record size of {self._max}"
            )
        return st.st_size

    def plan(self) -> Iterator[_Planned]:
        entries: list[tuple[str, Path]] = []

        def walk(folder: Path, prefix: str) -> None:
            try:
                children = sorted(os.scandir(folder), key=lambda e: e.name)
            except OSError as exc:
                raise InputError(f"{prefix or '.'}: cannot list folder: {exc.strerror}") from None
            for entry in children:
                rel = f"{prefix}{entry.name}"
                if any("\udc80" <= ch <= "\udcff" for ch in entry.name):
                    raise InputError(f"{rel!r:.80}: file name is not valid UTF-8")
                if entry.is_dir(follow_symlinks=False):
                    walk(Path(entry.path), rel + "/")
                else:
                    entries.append((rel, Path(entry.path)))

        walk(self._root, "")
        for rel, path in entries:
            validate_record_name(rel)
            size = self._check_entry(rel, path)
            self._files.append((rel, path))
            yield _Planned(rel, size)

    def records(self, sizes: Sequence[int]) -> Iterator[_Record]:
        files = list(zip(self._files, sizes, strict=True))
        hinted = 0  # files [0, hinted) have been hinted to the kernel
        for k, ((rel, path), size) in enumerate(files):
            # keep the next READ_AHEAD_BYTES of the following files coming from the disk
            # while this one is encrypted (the reads themselves are synchronous)
            ahead = 0
            for m in range(k + 1, len(files)):
                if ahead >= READ_AHEAD_BYTES:
                    break
                if m >= hinted:
                    _will_need(files[m][0][1], 0, READ_AHEAD_BYTES)
                    hinted = m + 1
                ahead += files[m][1]
            yield _FileRecord(rel, path, size)


class _Record:
    """One record's bytes, read into caller buffers (``readinto`` returns 0 at its end)."""

    size: int

    def readinto(self, dest: memoryview) -> int:
        raise NotImplementedError

    def finish(self) -> None:
        """Called once every byte was read: checks the source did not change; releases it."""


class _MemoryRecord(_Record):
    __slots__ = ("_pos", "_view", "size")

    def __init__(self, view: memoryview) -> None:
        self._view, self._pos, self.size = view, 0, len(view)

    def readinto(self, dest: memoryview) -> int:
        n = min(len(dest), self.size - self._pos)
        dest[:n] = self._view[self._pos : self._pos + n]
        self._pos += n
        return n


class _FileRecord(_Record):
    __slots__ = ("_done", "_file", "_path", "_rel", "size")

    def __init__(self, rel: str, path: Path, size: int) -> None:
        self._rel, self._path, self.size, self._done = rel, path, size, 0
        self._file = None

    def _changed(self) -> InputError:
        return InputError(f"{self._rel}: file changed size while it was being encrypted")

    def readinto(self, dest: memoryview) -> int:
        want = min(len(dest), self.size - self._done)
        if want == 0:
            return 0
        try:
            if self._file is None:
                self._file = open(self._path, "rb", buffering=0)  # noqa: SIM115 - in finish()
            done = self._done
            if done == 0 or done // READ_AHEAD_BYTES != (done + want) // READ_AHEAD_BYTES:
                # a large file: the window after the one being read is hinted as it is entered
                start = ((done + want) // READ_AHEAD_BYTES + 1) * READ_AHEAD_BYTES
                if start < self.size:
                    with contextlib.suppress(OSError):
                        os.posix_fadvise(self._file.fileno(), start, READ_AHEAD_BYTES,
                                         os.POSIX_FADV_WILLNEED)
            n = self._file.readinto(dest[:want])
        except OSError as exc:
            self.finish_quietly()
            raise InputError(f"{self._rel}: cannot read: {exc.strerror or exc}") from None
        if not n:
            self.finish_quietly()
            raise self._changed()
        self._done += n
        return n

    def finish(self) -> None:
        try:
            if self._file is None and self.size == 0:
                self._file = open(self._path, "rb", buffering=0)  # noqa: SIM115
            if self._file is not None and self._file.read(1):
                raise self._changed()
        except OSError as exc:
            raise InputError(f"{self._rel}: cannot read: {exc.strerror or exc}") from None
        finally:
            self.finish_quietly()

    def finish_quietly(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _will_need(path: Path, offset: int, length: int) -> None:
    """Ask the kernel to start reading a range of a file (a hint: errors are the read's)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_WILLNEED)
    except OSError:
        pass
    finally:
        os.close(fd)


class _IterableSource:
    def __init__(self, source: Iterable[object], max_record_size: int) -> None:
        if iter(source) is source:
            raise InputError(
                "the records must be re-iterable (a list, a tuple or an object whose __iter__ "
                "starts over): the writer reads them twice, sizes first, so each shard's "
                "associated data can bind the shard count; a one-shot iterator cannot be sealed"
            )
        self._source = source
        self._max = max_record_size

    @staticmethod
    def _split(k: int, item: object) -> tuple[str, memoryview]:
        name = ""
        if isinstance(item, tuple):
            if len(item) != 2:
                raise InputError(f"record {k}: expected bytes or a (name, bytes) pair")
            name = validate_record_name(item[0])
            item = item[1]
        try:
            view = memoryview(item).cast("B")  # type: ignore[arg-type]
        except TypeError:
            raise InputError(
                f"record {k}: expected a bytes-like object, got {type(item).__name__}"
            ) from None
        return name, view

    def plan(self) -> Iterator[_Planned]:
        for k, item in enumerate(self._source):
            name, view = self._split(k, item)
            if len(view) > self._max:
                label = name or f"record {k}"
                raise InputError(
                    f"{label}: {len(view)} bytes exceeds the maximum record size of {self._max}"
                )
            yield _Planned(name, len(view))

    def records(self, sizes: Sequence[int]) -> Iterator[_Record]:
        count = 0
        for k, item in enumerate(self._source):
            _name, view = self._split(k, item)
            if k >= len(sizes) or len(view) != sizes[k]:
                raise InputError(f"record {k}: the source changed between the two passes")
            count += 1
            yield _MemoryRecord(view)
        if count != len(sizes):
            raise InputError("the source yielded fewer records on the second pass")


# --------------------------------------------------------------------------- pipeline


class _Stop(Exception):
    """Raised inside a stage when another stage failed (the first error is the one raised)."""


_END = object()


class _Pipeline:
    """The digest and store threads beside the caller's read-and-encrypt loop."""

    def __init__(self, store: ObjectStore, *, digests: bool) -> None:
        self._store = store
        self._with_digests = digests
        self._pt_free: queue.Queue[bytearray] = queue.Queue()
        self._ct_free: queue.Queue[bytearray] = queue.Queue()
        self._pt_all = [bytearray(streaming.SEGMENT_CAPACITY) for _ in range(PIPELINE_DEPTH)]
        for buf in self._pt_all:
            self._pt_free.put(buf)
        for _ in range(PIPELINE_DEPTH):
            self._ct_free.put(bytearray(streaming.SEGMENT_SIZE))
        self._digests: queue.Queue[object] = queue.Queue()
        # shards to write, each with its own queue of ciphertext chunks; two store threads
        # take them in turn, so one shard's fsync overlaps the next shard's writes
        self._shards: queue.Queue[object] = queue.Queue()
        self._writes: queue.Queue[object] | None = None
        self.published: list[str] = []
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        self._failed = threading.Event()
        self._threads = [
            threading.Thread(target=self._guard, args=(self._store_loop,),
                             name=f"sealed-store-{i}", daemon=True)
            for i in range(STORE_THREADS)
        ]
        if digests:
            self._threads.append(threading.Thread(target=self._guard, args=(self._digest_loop,),
                                                  name="sealed-digest", daemon=True))
        for t in self._threads:
            t.start()

    # the caller's side
    def _take(self, pool: queue.Queue[bytearray]) -> bytearray:
        while True:
            self.check()
            try:
                return pool.get(timeout=_POLL_S)
            except queue.Empty:
                continue

    def plaintext_buffer(self) -> bytearray:
        return self._take(self._pt_free)

    def ciphertext_buffer(self) -> bytearray:
        return self._take(self._ct_free)

    def check(self) -> None:
        if self._failed.is_set():
            raise _Stop

    def begin_shard(self, name: str, header: bytes) -> None:
        self._writes = queue.Queue()
        self._shards.put((name, header, self._writes))

    def segment(self, digest: hashlib._Hash | None, pt: bytearray, pt_len: int, ct: bytearray,
                ct_len: int) -> None:
        assert self._writes is not None
        if digest is None:
            self._pt_free.put(pt)  # encrypted: free again (wiped at the end)
        else:
            self._digests.put((digest, pt, pt_len))
        self._writes.put((ct, ct_len))

    def end_shard(self) -> None:
        assert self._writes is not None
        self._writes.put(_END)
        self._writes = None

    def _stop_threads(self) -> None:
        if self._with_digests:
            self._digests.put(None)
        for _ in range(STORE_THREADS):
            self._shards.put(None)
        for t in self._threads:
            t.join()

    def finish(self) -> None:
        """Wait until every shard is written and every digest computed; raise any failure."""
        self._stop_threads()
        if self._error is not None:
            raise self._error

    def abort(self) -> None:
        """Stop every thread (a shard being written is not published) and wait for them."""
        self._failed.set()
        self._stop_threads()

    def wipe(self) -> None:
        for buf in self._pt_all:
            zeroize(buf)

    # the threads' side
    def _guard(self, loop: Callable[[], None]) -> None:
        try:
            loop()
        except _Stop:
            pass
        except BaseException as exc:
            if self._error is None:
                self._error = exc
            self._failed.set()

    def _next(self, q: queue.Queue[object]) -> object:
        while True:
            if self._failed.is_set():
                raise _Stop
            try:
                return q.get(timeout=_POLL_S)
            except queue.Empty:
                continue

    def _digest_loop(self) -> None:
        while (item := self._next(self._digests)) is not None:
            digest, pt, n = item  # type: ignore[misc]
            digest.update(memoryview(pt)[:n])
            self._pt_free.put(pt)

    def _store_loop(self) -> None:
        store = self._store
        put = store.put_unsynced if isinstance(store, DeferredSyncStore) else store.put
        while (item := self._next(self._shards)) is not None:
            name, header, writes = item  # type: ignore[misc]
            put(name, self._shard_chunks(header, writes))
            with self._lock:
                self.published.append(name)

    def _shard_chunks(self, header: bytes, writes: queue.Queue[object]) -> Iterator[memoryview]:
        yield memoryview(header)
        while (item := self._next(writes)) is not _END:
            ct, n = item  # type: ignore[misc]
            yield memoryview(ct)[:n]  # the store has consumed it when asking for the next
            self._ct_free.put(ct)


class _Filler:
    """Fills segment buffers with one shard's plaintext: its offset table, then its records."""

    def __init__(self, prefix: bytes, records: Iterator[_Record], count: int,
                 on_record: Callable[[int], None]) -> None:
        self._pending: list[_Record] = [_MemoryRecord(memoryview(prefix))]
        self._records = records
        self._left = count  # records of this shard not yet started
        self._on_record = on_record
        self._current: _Record | None = None
        self._is_prefix = True

    def _advance(self) -> bool:
        if self._current is not None:
            self._current.finish()
            if not self._is_prefix:
                self._on_record(self._current.size)
            self._is_prefix = False
            self._current = None
        if self._pending:
            self._current = self._pending.pop()
            return True
        if self._left == 0:
            return False
        self._left -= 1
        self._current = next(self._records)
        return True

    def fill(self, dest: memoryview) -> None:
        pos = 0
        while pos < len(dest):
            if self._current is None and not self._advance():
                raise AssertionError("shard plaintext shorter than planned")
            assert self._current is not None
            n = self._current.readinto(dest[pos:])
            if n == 0:
                if not self._advance():
                    raise AssertionError("shard plaintext shorter than planned")
                continue
            pos += n

    def close(self) -> None:
        """After the last segment: finish the record in progress and any empty ones left."""
        while self._advance():
            if self._current is not None and self._current.size:
                raise AssertionError("shard plaintext longer than planned")


def _encrypt_shard(pipe: _Pipeline, cipher: streaming.SegmentCipher, pt_size: int,
                   filler: _Filler, digest: hashlib._Hash | None) -> int:
    """Read, encrypt and hand over every segment of one shard; returns its ciphertext size."""
    ct_size = streaming.ciphertext_size(pt_size)
    n = streaming.segment_count(ct_size)
    left = pt_size
    for i in range(n):
        cap = streaming.FIRST_SEGMENT_CAPACITY if i == 0 else streaming.SEGMENT_CAPACITY
        size = min(cap, left)
        pt = pipe.plaintext_buffer()
        view = memoryview(pt)[:size]
        try:
            filler.fill(view)
            ct = pipe.ciphertext_buffer()
        except BaseException:
            zeroize(pt)
            raise
        written = cipher.encrypt_segment_into(i, i == n - 1, view, memoryview(ct))
        pipe.segment(digest, pt, size, ct, written)
        left -= size
    filler.close()
    return ct_size


# --------------------------------------------------------------------------- writer


def _validate_args(
    dek: SecretBuffer,
    tenant_id: str,
    dataset_id: str,
    key_version: int,
    share_holders: Sequence[str],
    target_shard_size: int,
    max_record_size: int,
) -> None:
    validate_identifier("tenant", tenant_id)
    validate_identifier("dataset", dataset_id)
    if not isinstance(dek, SecretBuffer) or len(dek) != DEK_SIZE:
        raise ValueError(f"dek must be a {DEK_SIZE}-byte SecretBuffer")
    if not isinstance(key_version, int) or not 1 <= key_version < 2**32:
        raise ValueError("key_version must be an integer from 1 to 2**32-1")
    if isinstance(share_holders, str) or not 1 <= len(share_holders) <= MAX_SHARE_HOLDERS:
        raise ValueError(f"share_holders must list 1 to {MAX_SHARE_HOLDERS} holders")
    for h in share_holders:
        if not isinstance(h, str) or not 0 < len(h.encode()) <= MAX_HOLDER_LENGTH or "\0" in h:
            raise ValueError(f"share holder {h!r:.60} must be 1-{MAX_HOLDER_LENGTH} bytes")
    if not MIN_TARGET_SHARD_SIZE <= target_shard_size <= MAX_TARGET_SHARD_SIZE:
        raise ValueError(
            f"target_shard_size must be {MIN_TARGET_SHARD_SIZE}..{MAX_TARGET_SHARD_SIZE} bytes"
        )
    if not 0 < max_record_size <= MAX_RECORD_SIZE:
        raise ValueError(f"max_record_size must be 1..{MAX_RECORD_SIZE} bytes")


def write_dataset(
    store: ObjectStore,
    source: Path | Iterable[Buffer] | Iterable[tuple[str, Buffer]],
    *,
    dek: SecretBuffer,
    tenant_id: str,
    dataset_id: str,
    key_version: int,
    share_holders: Sequence[str],
    target_shard_size: int = DEFAULT_TARGET_SHARD_SIZE,
    max_record_size: int = DEFAULT_MAX_RECORD_SIZE,
    progress: Progress | None = None,
    plaintext_digests: bool = False,
    random: Callable[[int], bytes] = os.urandom,
) -> DatasetRef:
    """Encrypt ``source`` into ``store``; returns where the manifest is. See the module doc.

    ``plaintext_digests=True`` records each shard's plaintext SHA-256 in the manifest (for
    ``DatasetReader.decrypt_shard_into(..., verify_digest=True)``); off by default, see above.

    ``progress(done_bytes, total_bytes)`` is called after every record. Raises
    :class:`InputError` for unusable input (naming the file or record), :class:`StoreError`
    when the store fails; in both cases nothing of this dataset remains in the store.
    """
    _validate_args(
        dek, tenant_id, dataset_id, key_version, share_holders, target_shard_size, max_record_size
    )
    if isinstance(source, str | bytes):
        raise InputError("source must be a pathlib.Path or an iterable of records")
    src: _FolderSource | _IterableSource
    if isinstance(source, os.PathLike):
        src = _FolderSource(Path(source), max_record_size)
    else:
        src = _IterableSource(source, max_record_size)

    names: list[str] = []
    sizes: list[int] = []
    for planned in src.plan():
        names.append(planned.name)
        sizes.append(planned.size)
    if not sizes:
        raise InputError("the dataset has no records: an empty dataset cannot be sealed")
    counts = plan_shards(sizes, target_shard_size)
    if len(counts) > MAX_SHARDS:
        raise InputError(f"the dataset needs {len(counts)} shards, above the limit {MAX_SHARDS}")

    upload_id = random(UPLOAD_ID_SIZE)
    total = sum(sizes)
    entries: list[ShardEntry] = []
    digests: list[hashlib._Hash | None] = []
    done = 0

    def on_record(size: int) -> None:
        nonlocal done
        done += size
        if progress is not None:
            progress(done, total)

    pipe = _Pipeline(store, digests=plaintext_digests)
    try:
        try:
            records = src.records(sizes)
            first = 0
            for j, count in enumerate(counts):
                shard_sizes = sizes[first : first + count]
                name = f"{SHARD_PREFIX}{random(16).hex()}"
                aad = shard_aad(
                    tenant_id=tenant_id,
                    dataset_id=dataset_id,
                    key_version=key_version,
                    upload_id=upload_id,
                    shard_index=j,
                    shard_count=len(counts),
                )
                cipher = streaming.SegmentCipher.new_stream(
                    dek, aad, label=f"shard {j}", random=random
                )
                prefix = shard_prefix(shard_sizes)
                pt_size = len(prefix) + sum(shard_sizes)
                digest = hashlib.sha256() if plaintext_digests else None
                pipe.begin_shard(name, cipher.header)
                filler = _Filler(prefix, records, count, on_record)
                ct_size = _encrypt_shard(pipe, cipher, pt_size, filler, digest)
                pipe.end_shard()
                digests.append(digest)
                entries.append(
                    ShardEntry(
                        object_name=name,
                        header=cipher.header,
                        ciphertext_size=ct_size,
                        plaintext_size=pt_size,
                        sha256=b"",  # set below, once the digest thread is done
                        offsets=array("Q", shard_offsets(shard_sizes)),
                        names=tuple(names[first : first + count]),
                    )
                )
                first += count
            pipe.finish()  # every shard published, every digest computed (or the error)
            if isinstance(store, DeferredSyncStore):
                store.sync()  # every shard durable before the manifest names them
        except _Stop:
            pipe.abort()
            pipe.finish()  # raises the stage's error
            raise AssertionError("a pipeline stage stopped without an error") from None
        except BaseException:
            pipe.abort()
            raise
        finally:
            pipe.wipe()
        entries = [replace(e, sha256=NO_DIGEST if d is None else d.digest())
                   for e, d in zip(entries, digests, strict=True)]
        manifest = Manifest(
            tenant_id=tenant_id,
            dataset_id=dataset_id,
            key_version=key_version,
            upload_id=upload_id,
            share_holders=tuple(share_holders),
            shards=tuple(entries),
        )
        manifest_name = f"{MANIFEST_PREFIX}{random(16).hex()}"
        sealed = seal_manifest(dek, manifest, manifest_name)
        store.put(manifest_name, sealed)
    except BaseException:
        for published in pipe.published:
            # keep the original error; an orphan left behind is unreadable ciphertext
            with contextlib.suppress(StoreError):
                store.delete(published)
        raise
    return DatasetRef(
        manifest_name=manifest_name,
        tenant_id=tenant_id,
        dataset_id=dataset_id,
        key_version=key_version,
        num_shards=len(entries),
        num_records=len(sizes),
        plaintext_bytes=total,
        ciphertext_bytes=sum(e.ciphertext_size for e in entries) + len(sealed),
    )
