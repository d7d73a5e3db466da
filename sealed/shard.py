"""Plaintext shard layout, shard packing and the shard associated data.

A shard is a sequence of records (opaque bytes) with an offset table in front, so the byte
range of record i follows from the table (or from the manifest's copy of it) and only the
ciphertext segments that hold it need decrypting. Plaintext layout, big-endian::

    offset      size        field
    0           4           magic b"SSHD"
    4           2           layout version = 1
    6           2           reserved = 0
    8           4           record count n, 1 <= n <= MAX_RECORDS_PER_SHARD
    12          4           reserved = 0
    16          8 * (n+1)   offsets o_0 .. o_n (u64): o_0 = 16 + 8 * (n+1) (the end of this
                            table), o_i <= o_{i+1}, o_n = the shard's plaintext size
    o_0         o_n - o_0   record bytes: record i is [o_i, o_{i+1})

The whole plaintext is then encrypted as one stream (:mod:`sealed.streaming`) with this
associated data, the HKDF ``info`` (see :func:`sealed._codec.canonical_fields`)::

    u16 len || b"sealed-shard/v1"
    u16 len || tenant id (UTF-8)
    u16 len || dataset id (UTF-8)
    u16 4   || BE32 key version
    u16 16  || upload id (16 random bytes, one per dataset write)
    u16 4   || BE32 shard index
    u16 4   || BE32 shard count

so a shard moved to another index, another dataset, another upload of the same dataset,
another tenant or another key version fails authentication, and so does a dataset whose
shard list was cut short (the count is in every shard's key).

Packing (:func:`plan_shards`) is greedy and deterministic: records keep their order; a shard
is closed before a record that would take it past the target size, unless the shard is still
empty (a record larger than the target gets a shard of its own).
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Iterable, Iterator, Sequence

from sealed._codec import canonical_fields, u32
from sealed.errors import FormatError

__all__ = [
    "DEFAULT_TARGET_SHARD_SIZE",
    "MAX_RECORDS_PER_SHARD",
    "MAX_RECORD_SIZE",
    "MAX_TARGET_SHARD_SIZE",
    "MIN_TARGET_SHARD_SIZE",
    "SHARD_HEADER_SIZE",
    "SHARD_MAGIC",
    "ShardView",
    "plan_shards",
    "shard_aad",
    "shard_offsets",
    "shard_prefix",
    "shard_size",
]

SHARD_MAGIC = b"SSHD"
SHARD_VERSION = 1
SHARD_HEADER_SIZE = 16
DEFAULT_TARGET_SHARD_SIZE = 64 << 20
MIN_TARGET_SHARD_SIZE = 4 << 10
MAX_TARGET_SHARD_SIZE = 1 << 30
MAX_RECORD_SIZE = 1 << 30
MAX_RECORDS_PER_SHARD = 1 << 22
UPLOAD_ID_SIZE = 16
_SHARD_DOMAIN = b"sealed-shard/v1"
_U64 = struct.Struct(">Q")
_HEAD = struct.Struct(">4sHHII")


def shard_aad(
    *,
    tenant_id: str,
    dataset_id: str,
    key_version: int,
    upload_id: bytes,
    shard_index: int,
    shard_count: int,
) -> bytes:
    """The associated data (HKDF info) that binds a shard to its place."""
    if len(upload_id) != UPLOAD_ID_SIZE:
        raise ValueError("upload id must be 16 bytes")
    if not 0 <= shard_index < shard_count < 2**32:
        raise ValueError("shard index must be below the shard count")
    return canonical_fields(
        _SHARD_DOMAIN,
        tenant_id.encode(),
        dataset_id.encode(),
        u32(key_version),
        upload_id,
        u32(shard_index),
        u32(shard_count),
    )


def _table_end(n: int) -> int:
    return SHARD_HEADER_SIZE + 8 * (n + 1)


def shard_size(record_sizes: Sequence[int]) -> int:
    """Plaintext size of a shard holding records of these sizes."""
    return _table_end(len(record_sizes)) + sum(record_sizes)


def shard_offsets(record_sizes: Sequence[int]) -> list[int]:
    """The offsets o_0 .. o_n of a shard holding records of these sizes."""
    offsets = [_table_end(len(record_sizes))]
    for size in record_sizes:
        offsets.append(offsets[-1] + size)
    return offsets


def shard_prefix(record_sizes: Sequence[int]) -> bytes:
    """Header and offset table: everything before the first record's bytes."""
    n = len(record_sizes)
    if not 1 <= n <= MAX_RECORDS_PER_SHARD:
        raise ValueError(f"a shard holds 1 to {MAX_RECORDS_PER_SHARD} records")
    head = _HEAD.pack(SHARD_MAGIC, SHARD_VERSION, 0, n, 0)
    return head + b"".join(_U64.pack(o) for o in shard_offsets(record_sizes))


def plan_shards(record_sizes: Iterable[int], target_shard_size: int) -> list[int]:
    """Greedy packing: the number of records in each shard, in order."""
    counts: list[int] = []
    n, size = 0, _table_end(0)
    for rec in record_sizes:
        grown = size + 8 + rec
        if n and (grown > target_shard_size or n == MAX_RECORDS_PER_SHARD):
            counts.append(n)
            n, size = 0, _table_end(0)
            grown = size + 8 + rec
        n, size = n + 1, grown
    if n:
        counts.append(n)
    return counts


class ShardView:
    """Records of a decrypted (authentic) shard plaintext, as zero-copy ``memoryview`` slices.

    Parsing validates the layout (magic, version, count, monotonic offsets ending at the
    plaintext size), so a structurally wrong shard raises :class:`FormatError`.
    """

    __slots__ = ("_offsets", "_view")

    def __init__(self, plaintext: memoryview | bytearray | bytes, *, what: str = "shard") -> None:
        view = memoryview(plaintext).cast("B")
        if len(view) < _table_end(1):
            raise FormatError(f"{what} is too short to hold a record table")
        magic, version, _r1, n, _r2 = _HEAD.unpack(view[:SHARD_HEADER_SIZE])
        if magic != SHARD_MAGIC or version != SHARD_VERSION:
            raise FormatError(f"{what} has an unknown layout (magic or version)")
        if not 1 <= n <= MAX_RECORDS_PER_SHARD or _table_end(n) > len(view):
            raise FormatError(f"{what} has an invalid record count {n}")
        offsets = list(struct.unpack_from(f">{n + 1}Q", view, SHARD_HEADER_SIZE))
        if offsets[0] != _table_end(n) or offsets[-1] != len(view):
            raise FormatError(f"{what} has an offset table that does not match its size")
        if any(a > b for a, b in itertools.pairwise(offsets)):
            raise FormatError(f"{what} has offsets out of order")
        self._offsets = offsets
        self._view = view

    @property
    def offsets(self) -> list[int]:
        return list(self._offsets)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def record(self, i: int) -> memoryview:
        if not 0 <= i < len(self):
            raise IndexError(f"record {i} outside this shard's {len(self)} records")
        return self._view[self._offsets[i] : self._offsets[i + 1]]

    def __iter__(self) -> Iterator[memoryview]:
        view, offs = self._view, self._offsets
        for i in range(len(offs) - 1):
            yield view[offs[i] : offs[i + 1]]
