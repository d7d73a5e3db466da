"""Substitution at the dataset level: shards and manifests moved, swapped or re-versioned."""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sealed import DecryptionError, MemoryStore, SecretBuffer, streaming
from sealed.shard import shard_aad

from .conftest import DATASET, TENANT, VERSION
from .helpers import make_records, open_reader, read_object, replace_object, write

SHARD_MSG = re.compile(r"^decryption failed \(shard (\d+)(, segment (\d+))?\)$")
MANIFEST_MSG = re.compile(r"^decryption failed \(manifest(, segment \d+)?\)$")
# 4 equal records of 1.5 MiB with a 3 MiB target: 2 records per shard, 2 shards of equal size
SIZES = [3 << 19] * 4


def _dataset(store, dek, dataset_id=DATASET, key_version=VERSION, tenant_id=TENANT):
    records = make_records(SIZES)
    ref = write(
        store,
        records,
        dek,
        dataset_id=dataset_id,
        key_version=key_version,
        tenant_id=tenant_id,
        target_shard_size=(3 << 20) + 4096,
    )
    assert ref.num_shards == 2
    return ref, records


def _shard_names(store, ref, dek) -> list[str]:
    with open_reader(store, ref, dek) as reader:
        return [s.object_name for s in reader.manifest.shards]


def _check_no_secret(err: Exception, dek: SecretBuffer, records: list[bytes]) -> None:
    message = str(err)
    with dek.view() as k:
        assert bytes(k).hex() not in message
    assert all(
        r[:8].hex() not in message and r[:8].decode("latin-1") not in message for r in records
    )


def _assert_shard_rejected(store, ref, dek, records, j: int) -> None:
    with open_reader(store, ref, dek) as reader:
        buf = bytearray(reader.shard_plaintext_size(j))
        with pytest.raises(DecryptionError) as info:
            reader.decrypt_shard_into(j, buf)
        assert SHARD_MSG.match(str(info.value)) and info.value.shard == j
        _check_no_secret(info.value, dek, records)
        assert not any(buf)
        first = reader.manifest.first_record(j)
        with pytest.raises(DecryptionError, match=SHARD_MSG):
            reader.read_record(first + 1)


def test_shards_swapped_within_a_dataset_are_rejected(store, dek) -> None:
    ref, records = _dataset(store, dek)
    a, b = _shard_names(store, ref, dek)
    blob_a, blob_b = read_object(store, a), read_object(store, b)
    assert len(blob_a) == len(blob_b)
    replace_object(store, a, blob_b)
    replace_object(store, b, blob_a)
    _assert_shard_rejected(store, ref, dek, records, 0)
    _assert_shard_rejected(store, ref, dek, records, 1)


def test_shard_aad_binds_index_count_dataset_tenant_version(dek) -> None:
    """Even with the right salt and key, another place in the AAD fails authentication."""
    base = dict(
        tenant_id=TENANT,
        dataset_id=DATASET,
        key_version=VERSION,
        upload_id=b"u" * 16,
        shard_index=1,
        shard_count=3,
    )
    ciphertext = streaming.encrypt(dek, shard_aad(**base), b"shard bytes")
    assert streaming.decrypt(dek, shard_aad(**base), ciphertext) == b"shard bytes"
    for change in [
        dict(shard_index=0),
        dict(shard_count=2),
        dict(dataset_id="dataset-2"),
        dict(tenant_id="tenant-b"),
        dict(key_version=2),
        dict(upload_id=b"v" * 16),
    ]:
        with pytest.raises(DecryptionError, match=r"^decryption failed \(stream, segment 0\)$"):
            streaming.decrypt(dek, shard_aad(**{**base, **change}), ciphertext)


def test_shard_from_another_dataset_is_rejected(store, dek) -> None:
    ref_a, records = _dataset(store, dek, dataset_id="dataset-a")
    ref_b, _ = _dataset(store, dek, dataset_id="dataset-b")  # same key on purpose
    shard_a = _shard_names(store, ref_a, dek)[0]
    shard_b = _shard_names(store, ref_b, dek)[0]
    replace_object(store, shard_a, read_object(store, shard_b))
    _assert_shard_rejected(store, ref_a, dek, records, 0)


def test_shard_from_another_upload_of_the_same_dataset_is_rejected(store, dek) -> None:
    ref_1, records = _dataset(store, dek)
    ref_2, _ = _dataset(store, dek)  # same tenant, dataset, version and key
    shard_1 = _shard_names(store, ref_1, dek)[1]
    shard_2 = _shard_names(store, ref_2, dek)[1]
    replace_object(store, shard_1, read_object(store, shard_2))
    _assert_shard_rejected(store, ref_1, dek, records, 1)


def test_swapped_manifest_is_rejected(store, dek) -> None:
    ref_a, _ = _dataset(store, dek, dataset_id="dataset-a")
    ref_b, _ = _dataset(store, dek, dataset_id="dataset-b")
    replace_object(store, ref_a.manifest_name, read_object(store, ref_b.manifest_name))
    with pytest.raises(DecryptionError, match=MANIFEST_MSG):
        open_reader(store, ref_a, dek)


def test_manifest_copied_under_another_name_is_rejected(store, dek) -> None:
    ref_1, _ = _dataset(store, dek)
    ref_2, _ = _dataset(store, dek)  # identical ids: only the object name differs
    replace_object(store, ref_1.manifest_name, read_object(store, ref_2.manifest_name))
    with pytest.raises(DecryptionError, match=MANIFEST_MSG):
        open_reader(store, ref_1, dek)


def test_wrong_key_version_tenant_or_key_is_rejected(store, dek) -> None:
    ref, _ = _dataset(store, dek)
    for kw in [
        dict(key_version=VERSION + 1),
        dict(tenant_id="tenant-b"),
        dict(dataset_id="dataset-2"),
    ]:
        with pytest.raises(DecryptionError, match=MANIFEST_MSG):
            open_reader(store, ref, dek, **kw)
    with SecretBuffer.random(32) as other, pytest.raises(DecryptionError, match=MANIFEST_MSG):
        open_reader(store, ref, other)


def test_shard_of_another_key_version_is_rejected(store, dek) -> None:
    ref_1, records = _dataset(store, dek, key_version=1)
    ref_2, _ = _dataset(store, dek, key_version=2)
    replace_object(
        store,
        _shard_names(store, ref_1, dek)[0],
        read_object(store, _shard_names(store, ref_2, dek)[0]),
    )
    _assert_shard_rejected(store, ref_1, dek, records, 0)


def test_truncated_or_dropped_shard_is_rejected(store, dek) -> None:
    ref, records = _dataset(store, dek)
    name = _shard_names(store, ref, dek)[1]
    blob = read_object(store, name)
    replace_object(store, name, blob[: len(blob) - 100])  # cut mid-segment
    _assert_shard_rejected(store, ref, dek, records, 1)
    replace_object(store, name, blob[: streaming.SEGMENT_SIZE])  # last segments dropped
    _assert_shard_rejected(store, ref, dek, records, 1)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(pos_fraction=st.floats(0, 1, exclude_max=True), bit=st.integers(0, 7))
def test_bit_flip_in_a_stored_shard_is_rejected(dek, pos_fraction: float, bit: int) -> None:
    store = MemoryStore()
    ref, _ = _dataset(store, dek)
    name = _shard_names(store, ref, dek)[1]
    blob = bytearray(read_object(store, name))
    pos = int(pos_fraction * len(blob))
    blob[pos] ^= 1 << bit
    replace_object(store, name, bytes(blob))
    with open_reader(store, ref, dek) as reader:
        buf = bytearray(reader.shard_plaintext_size(1))
        with pytest.raises(DecryptionError) as info:
            reader.decrypt_shard_into(1, buf)
        m = SHARD_MSG.match(str(info.value))
        assert m and m.group(1) == "1"
        if pos >= streaming.HEADER_SIZE:
            assert info.value.segment == (pos // streaming.SEGMENT_SIZE)
        assert not any(buf)


def test_flipped_manifest_bit_is_rejected(store, dek) -> None:
    ref, _ = _dataset(store, dek)
    blob = bytearray(read_object(store, ref.manifest_name))
    blob[len(blob) // 2] ^= 0x10
    replace_object(store, ref.manifest_name, bytes(blob))
    with pytest.raises(DecryptionError, match=MANIFEST_MSG):
        open_reader(store, ref, dek)
