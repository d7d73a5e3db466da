"""Encrypt a folder or an iterable of records into a dataset in an object store.

:func:`write_dataset` makes two passes over the source. The first learns every record's size
(and name) and plans the shards; the second streams the bytes through the encrypter. Two
passes are what lets every shard's associated data bind the shard *count* while memory stays
constant: no shard is ever held in memory, only one 1 MiB segment buffer, one 1 MiB read
buffer and 8 bytes of index per record (plus its name, which the manifest keeps).

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
shards that no manifest names: unreadable ciphertext, collectable by listing ``shards/``.)
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
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
from sealed.store import ObjectStore

__all__ = ["DEFAULT_MAX_RECORD_SIZE", "DatasetRef", "validate_record_name", "write_dataset"]

DEFAULT_MAX_RECORD_SIZE = 256 << 20
_READ_CHUNK = 1 << 20

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

    def records(self, sizes: Sequence[int]) -> Iterator[tuple[str, int, Iterator[memoryview]]]:
        buf = bytearray(_READ_CHUNK)
        try:
            for (rel, path), size in zip(self._files, sizes, strict=True):
                yield rel, size, self._read(rel, path, size, buf)
        finally:
            zeroize(buf)

    @staticmethod
    def _read(rel: str, path: Path, size: int, buf: bytearray) -> Iterator[memoryview]:
        view = memoryview(buf)
        try:
            with open(path, "rb", buffering=0) as f:
                done = 0
                while True:
                    n = f.readinto(view)
                    if not n:
                        break
                    done += n
                    if done > size:
                        break
                    yield view[:n]
        except OSError as exc:
            raise InputError(f"{rel}: cannot read: {exc.strerror or exc}") from None
        if done != size:
            raise InputError(f"{rel}: file changed size while it was being encrypted")


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

    def records(self, sizes: Sequence[int]) -> Iterator[tuple[str, int, Iterator[memoryview]]]:
        count = 0
        for k, item in enumerate(self._source):
            name, view = self._split(k, item)
            if k >= len(sizes) or len(view) != sizes[k]:
                raise InputError(f"record {k}: the source changed between the two passes")
            count += 1
            yield name, len(view), iter((view,))
        if count != len(sizes):
            raise InputError("the source yielded fewer records on the second pass")


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
    random: Callable[[int], bytes] = os.urandom,
) -> DatasetRef:
    """Encrypt ``source`` into ``store``; returns where the manifest is. See the module doc.

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
    published: list[str] = []
    entries: list[ShardEntry] = []
    done = 0
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
            enc = streaming.StreamEncryptor(dek, aad, label=f"shard {j}", random=random)
            digest = hashlib.sha256()

            def plaintext(
                shard_sizes: list[int] = shard_sizes, digest: hashlib._Hash = digest
            ) -> Iterator[Buffer]:
                nonlocal done
                prefix = shard_prefix(shard_sizes)
                digest.update(prefix)
                yield prefix
                for _ in shard_sizes:
                    _name, _size, chunks = next(records)
                    for chunk in chunks:
                        digest.update(chunk)
                        yield chunk
                    done += _size
                    if progress is not None:
                        progress(done, total)

            store.put(name, enc.encrypt(plaintext()))  # atomic: on failure nothing appears
            published.append(name)
            assert enc.plaintext_size is not None and enc.ciphertext_size is not None
            entries.append(
                ShardEntry(
                    object_name=name,
                    header=enc.header,
                    ciphertext_size=enc.ciphertext_size,
                    plaintext_size=enc.plaintext_size,
                    sha256=digest.digest(),
                    offsets=array("Q", shard_offsets(shard_sizes)),
                    names=tuple(names[first : first + count]),
                )
            )
            first += count
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
        for name in published:
            # keep the original error; an orphan left behind is unreadable ciphertext
            with contextlib.suppress(StoreError):
                store.delete(name)
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
