"""Reading a dataset back: round trips, zero-copy shard views, and reads of only what is needed."""

from __future__ import annotations

import hashlib

import pytest

from sealed import CountingStore, streaming
from sealed.shard import ShardView

from .helpers import make_records, open_reader, write

SEG = streaming.SEGMENT_SIZE


def test_round_trip_in_order_and_random_access(store, dek) -> None:
    sizes = [0, 1, 5000, 2_500_000, 70_000, 1, 1_200_000, 33, 0, 4_000_000]
    records = make_records(sizes)
    ref = write(store, records, dek, plaintext_digests=True)
    assert ref.num_records == len(records) and ref.num_shards >= 3
    with open_reader(store, ref, dek) as reader:
        assert reader.num_records == len(records)
        assert sum(reader.shard_record_count(j) for j in range(reader.num_shards)) == len(records)
        assert reader.share_holders == ("broker-provider:7443", "broker-tenant:7443")
        for k in reversed(range(len(records))):
            assert reader.read_record(k) == records[k]
            assert reader.record_size(k) == len(records[k])
        buf = bytearray(reader.max_shard_plaintext_size)
        seen = []
        for j in range(reader.num_shards):
            seen.extend(bytes(r) for r in reader.iter_shard_records(j, buf))
            view = reader.decrypt_shard_into(j, buf, verify_digest=True)
            assert hashlib.sha256(view).digest() == reader.manifest.shards[j].sha256
        assert seen == records


def test_shard_records_are_views_into_the_callers_buffer(store, dek) -> None:
    records = make_records([100, 200, 300])
    ref = write(store, records, dek)
    with open_reader(store, ref, dek) as reader:
        buf = bytearray(reader.shard_plaintext_size(0))
        view = reader.shard_view(0, buf)
        assert isinstance(view, ShardView) and len(view) == 3
        rec = view.record(1)
        assert rec.obj is buf  # no copy: a slice of the caller's buffer
        assert rec == records[1]


def test_names_stay_inside_the_manifest(store, dek) -> None:
    records = [("photos/cat.jpg", b"meow" * 100), ("notes/secret-plan.txt", b"plan")]
    ref = write(store, records, dek)
    with open_reader(store, ref, dek) as reader:
        assert [reader.record_name(k) for k in range(2)] == [
            "photos/cat.jpg",
            "notes/secret-plan.txt",
        ]
    for name in store.list():
        blob = store.get_range(name, 0, store.size(name))
        assert b"cat.jpg" not in blob and b"secret-plan" not in blob and b"meow" not in blob
        assert "cat" not in name and "secret" not in name


def test_random_access_reads_only_the_segments_holding_the_record(store, dek) -> None:
    """Both read paths: readinto (local directory) and zero-copy views (memory)."""
    # one shard of 8 records of 1 MiB - 100 bytes: record k spans segments k..k+1
    inner = store
    sizes = [SEG - 100] * 8
    records = make_records(sizes)
    ref = write(inner, records, dek, target_shard_size=64 << 20)
    assert ref.num_shards == 1
    counting = CountingStore(inner)
    reader = open_reader(counting, ref, dek)
    ct_size = reader.manifest.shards[0].ciphertext_size
    assert streaming.segment_count(ct_size) == 8
    shard_name = reader.manifest.shards[0].object_name
    for k in [5, 0, 7, 3]:
        counting.reset()
        assert reader.read_record(k) == records[k]
        start, end = reader.manifest.shards[0].record_range(k)
        first, last = streaming.segment_of(start), streaming.segment_of(end - 1)
        expected = min(ct_size, (last + 1) * SEG) - streaming.ciphertext_start(first)
        assert counting.bytes_read == expected, (k, first, last)
        assert last - first <= 1
        assert expected <= 2 * SEG < ct_size / 3
        assert all(name == shard_name for name, _, _ in counting.ranges)
    counting.reset()
    assert reader.read_record(6) == records[6]
    assert counting.bytes_read <= 2 * SEG
    # a record inside one segment costs exactly that segment
    small = make_records([10] * 3 + [SEG * 2] + [10])
    ref2 = write(inner, small, dek, target_shard_size=64 << 20)
    reader2 = open_reader(counting, ref2, dek)
    counting.reset()
    assert reader2.read_record(1) == small[1]
    assert counting.bytes_read == SEG - streaming.HEADER_SIZE
    counting.reset()
    assert reader2.read_record(2) == small[2]
    assert counting.bytes_read == SEG - streaming.HEADER_SIZE
    reader.close()
    reader2.close()


def test_whole_shard_decrypt_reads_the_shard_once(store, dek) -> None:
    inner = store
    records = make_records([1 << 20] * 5)
    ref = write(inner, records, dek, target_shard_size=64 << 20)
    counting = CountingStore(inner)
    with open_reader(counting, ref, dek) as reader:
        counting.reset()
        buf = bytearray(reader.shard_plaintext_size(0))
        reader.decrypt_shard_into(0, buf)
        assert counting.bytes_read == reader.manifest.shards[0].ciphertext_size


def test_close_zeroes_the_key_copy_and_refuses_further_reads(store, dek) -> None:
    ref = write(store, make_records([10, 20]), dek)
    reader = open_reader(store, ref, dek)
    assert reader.read_record(0)
    reader.close()
    assert not reader._dek.alive
    assert dek.alive  # the caller's key is the caller's to zero
    with pytest.raises(ValueError, match="closed"):
        reader.read_record(0)


def test_bad_buffers_and_indexes_are_clear_errors(store, dek) -> None:
    ref = write(store, make_records([10, 20]), dek)
    with open_reader(store, ref, dek) as reader:
        with pytest.raises(ValueError, match="needs a writable buffer"):
            reader.decrypt_shard_into(0, bytearray(3))
        with pytest.raises(ValueError, match="needs a writable buffer"):
            reader.decrypt_shard_into(0, bytes(reader.shard_plaintext_size(0)))
        with pytest.raises(IndexError, match="shard 5"):
            reader.decrypt_shard_into(5, bytearray(100))
        with pytest.raises(IndexError, match="record 2"):
            reader.read_record(2)
        with pytest.raises(IndexError, match="record 9"):
            reader.read_shard_record(0, 9)


def test_segment_range_decrypt_reads_and_returns_only_that_range(store, dek) -> None:
    inner = store
    records = make_records([SEG] * 5)
    ref = write(inner, records, dek, target_shard_size=64 << 20)
    counting = CountingStore(inner)
    with open_reader(counting, ref, dek) as reader:
        full = bytes(reader.decrypt_shard_into(0, bytearray(reader.shard_plaintext_size(0))))
        counting.reset()
        out = bytearray(3 * SEG)
        view = reader.decrypt_segments_into(0, 2, 3, out)
        start = streaming.plaintext_start(2)
        assert view == full[start : streaming.plaintext_start(4)]
        assert counting.bytes_read == 2 * SEG
        last = streaming.segment_count(reader.manifest.shards[0].ciphertext_size) - 1
        tail = reader.decrypt_segments_into(0, last, last, out)
        assert tail == full[streaming.plaintext_start(last) :]
        with pytest.raises(IndexError, match="outside shard 0"):
            reader.decrypt_segments_into(0, 0, last + 1, out)
        with pytest.raises(ValueError, match="writable buffer"):
            reader.decrypt_segments_into(0, 0, 1, bytearray(10))
