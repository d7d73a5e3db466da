"""Shard layout, packing and manifest encoding, including hostile lengths."""

from __future__ import annotations

import struct
from array import array

import pytest

from sealed import FormatError, streaming
from sealed.manifest import Manifest, ShardEntry, decode_manifest, encode_manifest
from sealed.shard import SHARD_HEADER_SIZE, ShardView, plan_shards, shard_prefix


def _shard(records: list[bytes]) -> bytes:
    return shard_prefix([len(r) for r in records]) + b"".join(records)


def test_shard_layout_byte_by_byte() -> None:
    blob = _shard([b"ab", b"", b"xyz"])
    assert blob[:4] == b"SSHD"
    assert struct.unpack(">HHII", blob[4:16]) == (1, 0, 3, 0)
    offsets = struct.unpack(">4Q", blob[16:48])
    assert offsets == (48, 50, 50, 53) and len(blob) == 53
    view = ShardView(blob)
    assert [bytes(r) for r in view] == [b"ab", b"", b"xyz"]


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda b: b"XXXX" + b[4:], "unknown layout"),
        (lambda b: b[:4] + b"\x00\x02" + b[6:], "unknown layout"),
        (lambda b: b[:8] + struct.pack(">I", 0) + b[12:], "invalid record count"),
        (lambda b: b[:8] + struct.pack(">I", 2**31) + b[12:], "invalid record count"),
        (lambda b: b[:24] + struct.pack(">Q", 52) + b[32:], "out of order"),
        (lambda b: b + b"extra", "does not match its size"),
        (lambda b: b[:10], "too short"),
    ],
)
def test_malformed_shards_are_format_errors(mutate, match) -> None:
    blob = _shard([b"ab", b"", b"xyz"])
    with pytest.raises(FormatError, match=match):
        ShardView(mutate(blob))


def test_packing_is_greedy_and_keeps_order() -> None:
    table = SHARD_HEADER_SIZE + 8
    target = table + 3 * (8 + 100)
    assert plan_shards([100] * 7, target) == [3, 3, 1]
    assert plan_shards([10_000, 1, 1], target) == [1, 2]  # an oversize record stands alone
    assert plan_shards([], target) == []


def _manifest() -> Manifest:
    sizes = [5, 7]
    offs = array("Q", [40, 45, 52])
    entry = ShardEntry(
        object_name="shards/aa",
        header=bytes([40]) + b"s" * 39,
        ciphertext_size=streaming.ciphertext_size(52),
        plaintext_size=52,
        sha256=b"d" * 32,
        offsets=offs,
        names=("x/1", ""),
    )
    assert sum(sizes) + 40 == 52
    return Manifest(
        tenant_id="t",
        dataset_id="d",
        key_version=3,
        upload_id=b"u" * 16,
        share_holders=("b1", "b2"),
        shards=(entry, entry),
    )


def test_manifest_round_trip() -> None:
    m = decode_manifest(encode_manifest(_manifest()))
    assert (m.tenant_id, m.dataset_id, m.key_version) == ("t", "d", 3)
    assert m.share_holders == ("b1", "b2") and m.num_records == 4
    assert list(m.shards[1].offsets) == [40, 45, 52] and m.shards[0].names == ("x/1", "")
    assert m.locate(3) == (1, 1) and m.locate(0) == (0, 0)
    assert "x/1" not in repr(m)


def test_hostile_manifest_counts_fail_before_allocating() -> None:
    blob = bytearray(encode_manifest(_manifest()))
    # shard count field sits right after the holders; claim 2**20 shards
    pos = blob.index(b"\x00\x02b2") + 4
    assert struct.unpack(">I", blob[pos : pos + 4]) == (2,)
    blob[pos : pos + 4] = struct.pack(">I", 1 << 20)
    with pytest.raises(FormatError, match="shard count"):
        decode_manifest(bytes(blob))
    blob[pos : pos + 4] = struct.pack(">I", 0xFFFFFFFF)
    with pytest.raises(FormatError, match="shard count"):
        decode_manifest(bytes(blob))


@pytest.mark.parametrize("cut", [0, 3, 10, 60, -1])
def test_truncated_manifest_is_a_format_error(cut) -> None:
    blob = encode_manifest(_manifest())
    with pytest.raises(FormatError):
        decode_manifest(blob[:cut])


def test_manifest_with_trailing_bytes_or_bad_offsets_is_rejected() -> None:
    blob = encode_manifest(_manifest())
    with pytest.raises(FormatError, match="trailing"):
        decode_manifest(blob + b"\x00")
    bad = bytearray(blob)
    i = bad.index(struct.pack(">3Q", 40, 45, 52))
    bad[i : i + 24] = struct.pack(">3Q", 40, 50, 52)[:16] + struct.pack(">Q", 51)
    with pytest.raises(FormatError, match="offsets"):
        decode_manifest(bytes(bad))
