"""The encrypted manifest: what a dataset consists of, readable only with its key.

Storage sees a manifest as one opaque object named ``manifests/<32 lowercase hex>`` (16
random bytes, chosen by the writer and returned to the caller in
:class:`~sealed.writer.DatasetRef`); shards are ``shards/<32 lowercase hex>``. Names and sizes
are all that storage learns: the tenant's file names exist only inside the encrypted manifest.

The manifest plaintext is encrypted as one stream (:mod:`sealed.streaming`) whose associated
data (HKDF ``info``) is, in the canonical ``u16 length || bytes`` encoding::

    b"sealed-manifest/v1" | tenant id | dataset id | BE32 key version | manifest object name

so a manifest copied under another name, or presented for another tenant, dataset or key
version, fails authentication.

Plaintext layout, big-endian (``str16`` = u16 byte length + UTF-8; limits in brackets)::

    size    field
    4       magic b"SMAN"
    2       format version = 1
    2       reserved = 0
    str16   tenant id                       [128]
    str16   dataset id                      [128]
    4       key version
    16      upload id (random per write; also bound into every shard's associated data)
    4       ciphertext segment size = 1048576 (the streaming parameters in use)
    2       share holder count h            [1 .. 16]
    h x     str16 share holder (broker id or address, in share index order) [512]
    4       shard count s                   [1 .. 1048576]
    s x     shard entry:
            str16   object name             [512]
            40      stream header of the shard ciphertext (length byte, salt, nonce prefix)
            8       ciphertext size
            8       plaintext size
            32      SHA-256 of the shard plaintext, or 32 zero bytes if the writer did not
                    record one (the default: see sealed.writer)
            4       record count n          [1 .. 4194304]
            8(n+1)  record offsets o_0 .. o_n, identical to the shard's own offset table
            n x     str16 record name (empty for records that came without a name) [4096]

Counts are checked against their limit and against the bytes that remain before anything is
allocated. The stream header is kept so the reader derives each shard's key from the
authentic salt and rejects a shard object whose header differs: together with AES-GCM this
binds the manifest to exactly the shard ciphertexts written with it.
"""

from __future__ import annotations

import bisect
import itertools
import sys
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field

from sealed import streaming
from sealed._codec import Cursor, canonical_fields, str16, u16, u32, u64
from sealed.errors import DecryptionError, FormatError, StoreError
from sealed.keys import validate_identifier
from sealed.secrets import SecretBuffer, zeroize
from sealed.shard import MAX_RECORDS_PER_SHARD, SHARD_HEADER_SIZE, UPLOAD_ID_SIZE
from sealed.store import ObjectStore, validate_object_name

__all__ = [
    "MANIFEST_PREFIX",
    "MAX_MANIFEST_SIZE",
    "NO_DIGEST",
    "SHARD_PREFIX",
    "Manifest",
    "ShardEntry",
    "decode_manifest",
    "encode_manifest",
    "manifest_aad",
    "open_manifest",
    "seal_manifest",
]

MANIFEST_MAGIC = b"SMAN"
MANIFEST_VERSION = 1
MANIFEST_PREFIX = "manifests/"
SHARD_PREFIX = "shards/"
MAX_MANIFEST_SIZE = 1 << 30
MAX_SHARDS = 1 << 20
MAX_SHARE_HOLDERS = 16
MAX_HOLDER_LENGTH = 512
MAX_RECORD_NAME = 4096
_MANIFEST_DOMAIN = b"sealed-manifest/v1"
_DIGEST_SIZE = 32
NO_DIGEST = bytes(_DIGEST_SIZE)  # a shard entry's sha256 when no plaintext digest was recorded
_LITTLE = sys.byteorder == "little"


def manifest_aad(*, tenant_id: str, dataset_id: str, key_version: int, name: str) -> bytes:
    return canonical_fields(
        _MANIFEST_DOMAIN, tenant_id.encode(), dataset_id.encode(), u32(key_version), name.encode()
    )


@dataclass(frozen=True, kw_only=True, eq=False)
class ShardEntry:
    """One shard as the manifest describes it. ``offsets`` has ``record_count + 1`` items."""

    object_name: str
    header: bytes
    ciphertext_size: int
    plaintext_size: int
    sha256: bytes
    offsets: array  # array('Q')
    names: tuple[str, ...]

    @property
    def record_count(self) -> int:
        return len(self.offsets) - 1

    def record_range(self, i: int) -> tuple[int, int]:
        """Plaintext byte range ``[start, end)`` of record ``i`` of this shard."""
        if not 0 <= i < self.record_count:
            raise IndexError(f"record {i} outside this shard's {self.record_count} records")
        return self.offsets[i], self.offsets[i + 1]


@dataclass(frozen=True, kw_only=True, eq=False)
class Manifest:
    tenant_id: str
    dataset_id: str
    key_version: int
    upload_id: bytes
    share_holders: tuple[str, ...]
    shards: tuple[ShardEntry, ...]
    _starts: list[int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        starts = list(itertools.accumulate((s.record_count for s in self.shards), initial=0))
        object.__setattr__(self, "_starts", starts)

    def __repr__(self) -> str:  # names and digests stay out of logs
        return (
            f"<Manifest {self.tenant_id}/{self.dataset_id} v{self.key_version}: "
            f"{len(self.shards)} shards, {self.num_records} records>"
        )

    @property
    def num_records(self) -> int:
        return self._starts[-1]

    def first_record(self, j: int) -> int:
        return self._starts[j]

    def locate(self, k: int) -> tuple[int, int]:
        """Global record index -> (shard index, index within the shard)."""
        if not 0 <= k < self.num_records:
            raise IndexError(f"record {k} outside the dataset's {self.num_records} records")
        j = bisect.bisect_right(self._starts, k) - 1
        return j, k - self._starts[j]


# --------------------------------------------------------------------------- encoding


def encode_manifest(m: Manifest) -> bytes:
    out = bytearray(MANIFEST_MAGIC + u16(MANIFEST_VERSION) + u16(0))
    out += str16(m.tenant_id) + str16(m.dataset_id) + u32(m.key_version) + m.upload_id
    out += u32(streaming.SEGMENT_SIZE)
    out += u16(len(m.share_holders))
    for h in m.share_holders:
        out += str16(h, max_len=MAX_HOLDER_LENGTH)
    out += u32(len(m.shards))
    for s in m.shards:
        out += str16(s.object_name) + s.header + u64(s.ciphertext_size) + u64(s.plaintext_size)
        out += s.sha256 + u32(s.record_count)
        table = array("Q", s.offsets)
        if _LITTLE:
            table.byteswap()  # native order -> big-endian on the wire
        out += table.tobytes()
        for name in s.names:
            out += str16(name, max_len=MAX_RECORD_NAME)
    return bytes(out)


def _decode_shard(c: Cursor, what: str) -> ShardEntry:
    name = c.str16(512)
    try:
        validate_object_name(name)
    except StoreError:
        raise FormatError(f"{what} has an invalid object name") from None
    header = c.bytes(streaming.HEADER_SIZE)
    ct_size, pt_size = c.u64(), c.u64()
    digest = c.bytes(_DIGEST_SIZE)
    n = c.expect_count(c.u32(), 8 + 2, MAX_RECORDS_PER_SHARD, "record count")
    if n == 0:
        raise FormatError(f"{what} has an empty shard")
    offsets = array("Q")
    offsets.frombytes(c.bytes(8 * (n + 1)))
    if _LITTLE:
        offsets.byteswap()
    names = tuple(c.str16(MAX_RECORD_NAME) for _ in range(n))
    if header[0] != streaming.HEADER_SIZE:
        raise FormatError(f"{what} lists a shard with an unknown stream header")
    if pt_size > streaming.MAX_CIPHERTEXT_SIZE or streaming.ciphertext_size(pt_size) != ct_size:
        raise FormatError(f"{what} lists a shard whose sizes do not match")
    if offsets[0] != SHARD_HEADER_SIZE + 8 * (n + 1) or offsets[-1] != pt_size:
        raise FormatError(f"{what} lists a shard whose record offsets do not match its size")
    if any(a > b for a, b in itertools.pairwise(offsets)):
        raise FormatError(f"{what} lists record offsets out of order")
    return ShardEntry(
        object_name=name,
        header=header,
        ciphertext_size=ct_size,
        plaintext_size=pt_size,
        sha256=digest,
        offsets=offsets,
        names=names,
    )


def decode_manifest(data: bytes | bytearray | memoryview) -> Manifest:
    what = "manifest"
    c = Cursor(data, what)
    if c.bytes(4) != MANIFEST_MAGIC or c.u16() != MANIFEST_VERSION:
        raise FormatError("manifest has an unknown magic or format version")
    c.u16()
    tenant_id, dataset_id = c.str16(128), c.str16(128)
    key_version = c.u32()
    upload_id = c.bytes(UPLOAD_ID_SIZE)
    if c.u32() != streaming.SEGMENT_SIZE:
        raise FormatError("manifest names a ciphertext segment size this version cannot read")
    h = c.expect_count(c.u16(), 2, MAX_SHARE_HOLDERS, "share holder count")
    holders = tuple(c.str16(MAX_HOLDER_LENGTH) for _ in range(h))
    s = c.expect_count(c.u32(), 2 + 40 + 8 + 8 + 32 + 4, MAX_SHARDS, "shard count")
    if h == 0 or s == 0:
        raise FormatError("manifest lists no share holder or no shard")
    shards = tuple(_decode_shard(c, what) for _ in range(s))
    c.end()
    return Manifest(
        tenant_id=tenant_id,
        dataset_id=dataset_id,
        key_version=key_version,
        upload_id=upload_id,
        share_holders=holders,
        shards=shards,
    )


# --------------------------------------------------------------------------- sealing


def seal_manifest(dek: SecretBuffer, manifest: Manifest, name: str) -> bytes:
    """Encrypt a manifest for storage under ``name``."""
    validate_object_name(name)
    aad = manifest_aad(
        tenant_id=manifest.tenant_id,
        dataset_id=manifest.dataset_id,
        key_version=manifest.key_version,
        name=name,
    )
    return streaming.encrypt(dek, aad, encode_manifest(manifest))


def open_manifest(
    store: ObjectStore,
    name: str,
    *,
    dek: SecretBuffer,
    tenant_id: str,
    dataset_id: str,
    key_version: int,
    share_holders: Sequence[str] | None = None,
) -> Manifest:
    """Read, authenticate and parse a manifest; :class:`DecryptionError` if it is not genuine."""
    validate_identifier("tenant", tenant_id)
    validate_identifier("dataset", dataset_id)
    validate_object_name(name)
    size = store.size(name)
    if size > MAX_MANIFEST_SIZE:
        raise FormatError(f"manifest object is {size} bytes, above the {MAX_MANIFEST_SIZE} limit")
    streaming.plaintext_size(size, label="manifest")
    ciphertext = bytearray(size)
    store.readinto(name, 0, ciphertext)
    aad = manifest_aad(
        tenant_id=tenant_id, dataset_id=dataset_id, key_version=key_version, name=name
    )
    plaintext = streaming.decrypt(dek, aad, ciphertext, label="manifest")
    try:
        manifest = decode_manifest(plaintext)
    finally:
        zeroize(plaintext)
    if (manifest.tenant_id, manifest.dataset_id, manifest.key_version) != (
        tenant_id,
        dataset_id,
        key_version,
    ):
        raise DecryptionError("manifest")
    if share_holders is not None and tuple(share_holders) != manifest.share_holders:
        raise FormatError("manifest lists other share holders than expected")
    return manifest
