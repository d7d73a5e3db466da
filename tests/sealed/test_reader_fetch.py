"""The trainer's store path for data not in memory: background reads into reused buffers.

``MappedDirStore`` decrypts cached chunks in place from its mapping and has the others read
ahead into the reader's buffers. Whether the kernel keeps a page cached is not up to a test,
so these tests take the real store and real files and only fix the answer of its cache probe
(every chunk cold, every chunk cached, or alternating), then check that every path decrypts
exactly the plaintext written, and that tampering and truncation are caught with the
caller's buffer zeroed.
"""

from __future__ import annotations

import os
import random

import pytest

from sealed import DecryptionError, MappedDirStore, StoreError, streaming
from sealed import reader as reader_module
from sealed.store import Fetch, _cached_pages

from .helpers import make_records, open_reader, write

SEG = streaming.SEGMENT_SIZE


class ProbedStore(MappedDirStore):
    """The real mapped store with its cache probe answered by ``policy(name, offset)``; counts
    the probes and the mapped views (ranges decrypted in place from the mapping)."""

    def __init__(self, root, policy) -> None:
        super().__init__(root)
        self.policy = policy
        self.probes = 0
        self.views: list[tuple[str, int, int]] = []

    def view_range(self, name: str, offset: int, length: int) -> memoryview:
        self.views.append((name, offset, length))
        return super().view_range(name, offset, length)

    def fetch(self, name: str) -> Fetch:
        fetch = super().fetch(name)
        store = self

        class _Probed(Fetch):
            __slots__ = ()

            def cached(self, offset: int, length: int) -> bool:
                store.probes += 1
                return store.policy(name, offset)

        probed = _Probed.__new__(_Probed)
        Fetch.__init__(probed, name, fetch._fd, self._queue_read)
        fetch._fd = -1  # handed over to ``probed``
        return probed


POLICIES = {
    "cold": lambda name, offset: False,
    "cached": lambda name, offset: True,
    # some shards cached, others not (object names are random hex), chunks alternating
    "mixed": lambda name, offset: (int(name[-1], 16) + offset // (
        reader_module.FETCH_SEGMENTS * SEG)) % 2 == 1,
}


@pytest.fixture(params=sorted(POLICIES))
def probed(request, tmp_path):
    store = ProbedStore(tmp_path / "store", POLICIES[request.param])
    yield store
    store.close()


def _shard_plaintexts(reader, records):
    """Each shard's expected plaintext, from the records (offset table in front)."""
    from sealed.shard import shard_prefix

    out, k = [], 0
    for entry in reader.manifest.shards:
        n = entry.record_count
        sizes = [len(r) for r in records[k : k + n]]
        out.append(shard_prefix(sizes) + b"".join(records[k : k + n]))
        k += n
    return out


def test_every_path_decrypts_exactly_what_was_written(probed, dek) -> None:
    # shards of about 9 MiB: three chunks, the last one short; plus a small last shard
    sizes = [3 * SEG + 12_345] * 9 + [70_000]
    records = make_records(sizes)
    ref = write(probed, records, dek, target_shard_size=9 << 20)
    with open_reader(probed, ref, dek) as reader:
        assert reader.num_shards >= 4
        expected = _shard_plaintexts(reader, records)
        buf = bytearray(reader.max_shard_plaintext_size)
        n = reader.num_shards
        # in order with the right next-shard hints (the trainer's pipeline)
        for j in range(n):
            view = reader.decrypt_shard_into(j, buf, next_shard=(j + 1) % n)
            assert view == expected[j]
        # shuffled, with hints that are sometimes wrong, and random access in between
        order = list(range(n)) * 2
        random.Random(7).shuffle(order)
        for k, j in enumerate(order):
            hint = order[k + 1] if k % 3 else (j + 2) % n
            buf[:] = bytes(len(buf))
            assert reader.decrypt_shard_into(j, buf, next_shard=hint) == expected[j]
            if k % 4 == 0:
                assert reader.read_record(k % len(records)) == records[k % len(records)]
        last = streaming.segment_count(reader.manifest.shards[0].ciphertext_size) - 1
        assert reader.decrypt_segments_into(0, 1, last, buf) == expected[0][
            streaming.plaintext_start(1) :
        ]
    assert probed.probes > 0


def test_the_first_shard_s_reads_start_before_its_header_is_read(dek, tmp_path) -> None:
    events: list[str] = []

    class Logged(ProbedStore):
        def readinto(self, name, offset, buf) -> None:
            events.append(f"readinto {offset}")
            super().readinto(name, offset, buf)

        def _queue_read(self, fetch, offset, buf, ticket) -> None:
            events.append(f"queued {offset}")
            super()._queue_read(fetch, offset, buf, ticket)

    store = Logged(tmp_path / "store", POLICIES["cold"])
    records = make_records([3 * SEG + 12_345] * 3)
    ref = write(store, records, dek, target_shard_size=64 << 20)
    with open_reader(store, ref, dek) as reader:
        expected = _shard_plaintexts(reader, records)[0]
        events.clear()
        assert reader.decrypt_shard_into(0, bytearray(reader.shard_plaintext_size(0))) == expected
    assert events[0] == f"queued {streaming.HEADER_SIZE}"  # the first chunk, right after it
    assert events.index("readinto 0") > 0  # the header
    store.close()


def test_a_shard_cached_whole_is_decrypted_from_the_mapping(dek, tmp_path) -> None:
    store = ProbedStore(tmp_path / "store", POLICIES["cached"])
    records = make_records([3 * SEG + 12_345] * 3)
    ref = write(store, records, dek, target_shard_size=64 << 20)
    with open_reader(store, ref, dek) as reader:
        assert reader.num_shards == 1
        expected = _shard_plaintexts(reader, records)[0]
        buf = bytearray(reader.shard_plaintext_size(0))
        assert reader.decrypt_shard_into(0, buf) == expected
        entry = reader.manifest.shards[0]
        name, size = entry.object_name, entry.ciphertext_size
    # one view over the whole shard after its header: no chunk read into a buffer
    assert store.views == [(name, streaming.HEADER_SIZE, size - streaming.HEADER_SIZE)]
    assert store.probes == 1
    store.close()


def test_a_tampered_chunk_read_in_the_background_fails_and_zeroes_the_buffer(dek, tmp_path):
    store = ProbedStore(tmp_path / "store", POLICIES["cold"])
    records = make_records([12 * SEG])
    ref = write(store, records, dek, target_shard_size=64 << 20)
    with open_reader(store, ref, dek) as reader:
        entry = reader.manifest.shards[0]
        path = tmp_path / "store" / entry.object_name
        blob = bytearray(path.read_bytes())
        blob[9 * SEG + 100] ^= 1  # segment 9: in the third chunk, after two decrypted ones
        path.write_bytes(blob)
        buf = bytearray(reader.shard_plaintext_size(0))
        with pytest.raises(DecryptionError) as info:
            reader.decrypt_shard_into(0, buf, next_shard=0)
        assert info.value.segment == 9
        assert buf == bytes(len(buf))  # the segments decrypted before it are wiped too
    store.close()


def test_an_object_truncated_after_opening_is_a_store_error_not_a_short_read(dek, tmp_path):
    store = ProbedStore(tmp_path / "store", POLICIES["cold"])
    records = make_records([10 * SEG])
    ref = write(store, records, dek, target_shard_size=64 << 20)
    with open_reader(store, ref, dek) as reader:
        buf = bytearray(reader.shard_plaintext_size(0))
        reader.decrypt_shard_into(0, buf)  # checks the size once
        path = tmp_path / "store" / reader.manifest.shards[0].object_name
        os.truncate(path, 6 * SEG + 7)
        buf[:] = bytes(len(buf))
        with pytest.raises(StoreError, match="shorter than"):
            reader.decrypt_shard_into(0, buf)
        assert buf == bytes(len(buf))  # the chunk decrypted before the short one is wiped
    store.close()


def test_an_object_truncated_before_opening_fails_authentication(dek, tmp_path) -> None:
    store = ProbedStore(tmp_path / "store", POLICIES["cold"])
    ref = write(store, make_records([5 * SEG]), dek, target_shard_size=64 << 20)
    with open_reader(store, ref, dek) as reader:
        path = tmp_path / "store" / reader.manifest.shards[0].object_name
        os.truncate(path, 4 * SEG)
        with pytest.raises(DecryptionError):
            reader.decrypt_shard_into(0, bytearray(reader.shard_plaintext_size(0)))
    store.close()


def test_reads_run_ahead_into_a_bounded_set_of_reused_buffers(dek, tmp_path) -> None:
    store = ProbedStore(tmp_path / "store", POLICIES["cold"])
    ref = write(store, make_records([40 * SEG, 40 * SEG]), dek, target_shard_size=41 << 20)
    with open_reader(store, ref, dek) as reader:
        assert reader.num_shards == 2
        buf = bytearray(reader.max_shard_plaintext_size)
        reader.decrypt_shard_into(0, buf, next_shard=1)
        # the next shard's first chunks are under way before the call returned
        assert [c.shard for c in reader._ahead] == [1] * len(reader._ahead)
        assert 0 < len(reader._ahead) <= reader_module.FETCH_AHEAD
        reader.decrypt_shard_into(1, buf)
        assert reader._buffers == reader_module.FETCH_BUFFERS  # never more, whatever the size
        assert not reader._ahead and not reader._fetches  # nothing left open
    store.close()


def test_one_shard_read_again_and_again_names_itself_next(probed, dek) -> None:
    records = make_records([9 * SEG + 5])
    ref = write(probed, records, dek, target_shard_size=64 << 20)
    with open_reader(probed, ref, dek) as reader:
        assert reader.num_shards == 1
        expected = _shard_plaintexts(reader, records)[0]
        buf = bytearray(reader.shard_plaintext_size(0))
        for _ in range(3):  # the trainer's epochs over a one-shard dataset
            buf[:] = bytes(len(buf))
            assert reader.decrypt_shard_into(0, buf, next_shard=0) == expected
            assert reader._ahead and all(c.shard == 0 for c in reader._ahead)
            assert reader._ahead[0].first == 0  # the next call's first chunk, under way


def test_a_missing_next_shard_does_not_fail_the_current_one(probed, dek, tmp_path) -> None:
    records = make_records([2 * SEG, 2 * SEG])
    ref = write(probed, records, dek, target_shard_size=2 << 20)
    with open_reader(probed, ref, dek) as reader:
        assert reader.num_shards == 2
        expected = _shard_plaintexts(reader, records)
        probed.delete(reader.manifest.shards[1].object_name)
        buf = bytearray(reader.max_shard_plaintext_size)
        assert reader.decrypt_shard_into(0, buf, next_shard=1) == expected[0]
        with pytest.raises(StoreError, match="not found"):  # reported where it is read
            reader.decrypt_shard_into(1, buf)


def test_a_shard_not_cached_whole_is_read_in_order_by_the_io_thread_alone(dek, tmp_path):
    # the probe finds the start cold and the rest "cached" (the kernel's read-ahead for the
    # I/O thread's first read fills the next pages): every chunk is still read by the I/O
    # thread, in order, so its reads stay one sequential stream; none comes from the mapping
    queued: list[tuple[int, int]] = []

    class Logged(ProbedStore):
        def _queue_read(self, fetch, offset, buf, ticket) -> None:
            queued.append((offset, len(buf)))
            super()._queue_read(fetch, offset, buf, ticket)

    store = Logged(tmp_path / "store", lambda name, offset: offset > 0)
    records = make_records([20 * SEG + 777])
    ref = write(store, records, dek, target_shard_size=64 << 20)
    with open_reader(store, ref, dek) as reader:
        assert reader.num_shards == 1
        expected = _shard_plaintexts(reader, records)[0]
        store.views.clear()
        queued.clear()
        assert reader.decrypt_shard_into(0, bytearray(reader.shard_plaintext_size(0))) == expected
        size = reader.manifest.shards[0].ciphertext_size
    assert store.views == []  # nothing decrypted from the mapping
    assert store.probes == 1  # one probe for the shard, none per chunk
    pos = streaming.HEADER_SIZE
    for offset, length in queued:  # contiguous, in order, to the end
        assert offset == pos
        pos += length
    assert pos == size
    store.close()


def test_a_dataset_dropped_from_the_page_cache_is_read_in_order_by_the_io_thread(dek, tmp_path):
    # the real probe this time (no answer fixed): the shards are dropped from the page cache
    # as the benchmark's cold runs do, then read as the trainer reads them
    queued: dict[str, list[tuple[int, int]]] = {}
    views: list[str] = []

    class Logged(MappedDirStore):
        def _queue_read(self, fetch, offset, buf, ticket) -> None:
            queued.setdefault(fetch._name, []).append((offset, len(buf)))
            super()._queue_read(fetch, offset, buf, ticket)

        def view_range(self, name: str, offset: int, length: int) -> memoryview:
            views.append(name)
            return super().view_range(name, offset, length)

    root = tmp_path / "store"
    records = make_records([9 * SEG + 4321] * 3)
    writer = MappedDirStore(root)
    ref = write(writer, records, dek, target_shard_size=9 << 20)
    writer.close()
    store = Logged(root)
    with open_reader(store, ref, dek) as reader:
        assert reader.num_shards == 3
        expected = _shard_plaintexts(reader, records)
        entries = reader.manifest.shards
        for e in entries:  # never mapped: the clean pages go
            fd = os.open(root / e.object_name, os.O_RDONLY)
            try:
                os.fdatasync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                if _cached_pages(fd, 0, e.ciphertext_size):
                    pytest.skip("this file system keeps dropped pages (tmpfs?): nothing is cold")
            finally:
                os.close(fd)
        buf = bytearray(reader.max_shard_plaintext_size)
        for j in range(3):
            view = reader.decrypt_shard_into(j, buf, next_shard=j + 1 if j < 2 else None)
            assert view == expected[j]
    assert views == []  # nothing from the mapping: every shard was cold
    for e in entries:  # each shard read whole, in order, in one stream of background reads
        pos = streaming.HEADER_SIZE
        for offset, length in queued[e.object_name]:
            assert offset == pos
            pos += length
        assert pos == e.ciphertext_size
    store.close()
