"""Encrypted shards -> batches: assignment, in-memory decryption, equivalence with the
plaintext baseline, tamper detection, shredding of every buffer."""

from __future__ import annotations

import itertools
import struct

import pytest
import torch

from sealed.errors import DecryptionError
from sealed.store import LocalDirStore
from sealed.writer import write_dataset
from tests.trainer.conftest import corpus
from trainer.config import JobConfig
from trainer.data import (
    EncryptedBatches,
    FeatureRecords,
    PlaintextShards,
    ShardPlan,
    TokenWindows,
    make_loader,
)
from trainer.sealed_reader import SealedShards, open_sealed_reader
from trainer.shred import Shredder


def _config(ds) -> JobConfig:
    return JobConfig.from_mapping({
        "job_id": "job-1", "tenant_id": "acme",
        "dataset": {"id": "corpus", "key_version": 1, "manifest": ds.manifest,
                    "store": str(ds.store)},
        "checkpoint": {"dir": str(ds.root / "ckpt")},
    })


def _batches(reader, shredder, *, rank=0, world=1, seq_len=32, batch=4, seed=7):
    return EncryptedBatches(reader, TokenWindows(seq_len), batch_size=batch, rank=rank,
                            world_size=world, seed=seed, prefetch_depth=2, shredder=shredder)


def _plaintext_twin(reader: SealedShards, records: list[bytes]) -> PlaintextShards:
    shards, start = [], 0
    for entry in reader.reader.manifest.shards:
        shards.append(records[start : start + entry.record_count])
        start += entry.record_count
    assert start == len(records)
    return PlaintextShards(shards)


def test_shard_plan_assigns_each_shard_to_one_rank_and_shuffles_per_epoch():
    plans = [ShardPlan(10, r, 3, seed=1) for r in range(3)]
    assert [p.shards for p in plans] == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    for p in plans:
        assert sorted(p.order(0)) == p.shards
        assert p.order(0) == ShardPlan(10, p.rank, 3, seed=1).order(0)  # deterministic
    assert any(p.order(0) != p.order(1) for p in plans)
    few = [ShardPlan(2, r, 3, seed=0) for r in range(3)]
    assert all(p.striped and p.shards == [0, 1] for p in few)
    with pytest.raises(ValueError, match="rank 3 outside world size 3"):
        ShardPlan(2, 3, 3, seed=0)


def test_encrypted_batches_equal_the_plaintext_baseline(dataset):
    reader = open_sealed_reader(_config(dataset), dataset.dek)
    records = corpus(400, canary=dataset.canary.decode())
    twin = _plaintext_twin(reader, records)
    shredder = Shredder()
    enc = iter(make_loader(_batches(reader, shredder)))
    plain = iter(make_loader(_batches(twin, Shredder())))
    text = b"".join(records)
    for _ in range(60):  # more than one epoch of this rank's windows
        x, y = next(enc)
        px, py = next(plain)
        assert x.dtype == torch.long and x.shape == (4, 32)
        assert torch.equal(x, px) and torch.equal(y, py)
        assert torch.equal(x[:, 1:], y[:, :-1])  # target = input shifted by one byte
        for row in range(4):
            window = bytes(x[row].tolist()) + bytes([int(y[row, -1])])
            assert window in text
    shredder.shred("test")
    reader.close()


def test_ranks_read_disjoint_shards(dataset):
    reader0 = open_sealed_reader(_config(dataset), dataset.dek)
    reader1 = open_sealed_reader(_config(dataset), dataset.dek)
    seen = []
    for rank, reader in ((0, reader0), (1, reader1)):
        shredder = Shredder()
        batches = _batches(reader, shredder, rank=rank, world=2)
        it = iter(batches)
        for _ in range(5):
            next(it)
        seen.append(batches.prefetcher.stats.shards)
        assert set(batches.plan.shards) == set(range(rank, reader.num_shards, 2))
        shredder.shred("test")
    assert all(n > 0 for n in seen)


def test_fewer_shards_than_ranks_gives_disjoint_samples(tmp_path, dataset):
    records = [f"{i:032d}\n".encode() for i in range(64)]  # each record is one 33-byte window
    seen = []
    for rank in range(2):
        shredder = Shredder()
        pipe = EncryptedBatches(PlaintextShards([records]), TokenWindows(32), batch_size=8,
                                rank=rank, world_size=2, seed=3, prefetch_depth=1,
                                shredder=shredder)
        it = iter(pipe)
        rows = set()
        for _ in range(4):  # one epoch: 32 windows per rank
            x, y = next(it)
            rows |= {bytes(x[r].tolist()) + bytes([int(y[r, -1])]) for r in range(8)}
        seen.append(rows)
        shredder.shred("test")
    assert len(seen[0]) == len(seen[1]) == 32 and not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(records)


def test_tampered_shard_fails_before_any_batch(dataset):
    store = LocalDirStore(dataset.store)
    for name in store.list("shards/"):
        path = dataset.store.joinpath(*name.split("/"))
        blob = bytearray(path.read_bytes())
        blob[len(blob) // 2] ^= 0x80
        path.chmod(0o600)
        path.write_bytes(bytes(blob))
    reader = open_sealed_reader(_config(dataset), dataset.dek)
    shredder = Shredder()
    it = iter(make_loader(_batches(reader, shredder)))
    with pytest.raises(DecryptionError, match=r"decryption failed \(shard \d+"):
        next(it)
    shredder.shred("test")


def test_shred_zeroes_pipeline_buffers_and_stops_prefetch(dataset):
    reader = open_sealed_reader(_config(dataset), dataset.dek)
    shredder = Shredder()
    batches = _batches(reader, shredder)
    it = iter(make_loader(batches))
    x, _ = next(it)
    slots = [s for s in list(batches.prefetcher._free.queue) if len(s.buffer)]
    assert batches.stats.decrypted_bytes > 0 and batches.stats.decrypt_gbps > 0
    report = shredder.shred("test")
    assert report.buffers >= 1 and report.tensors == 6
    assert not batches.prefetcher._thread.is_alive()
    assert float(x.abs().sum()) == 0
    for slot in slots:
        assert slot.buffer == bytearray(len(slot.buffer))
    assert dataset.canary not in b"".join(bytes(s.buffer) for s in slots)


def test_feature_records_feed_the_classifier(tmp_path, dataset):
    rows = [struct.pack("<4f", i, -i, i / 2, 1.0) + struct.pack("<I", i % 3) for i in range(64)]
    twin = PlaintextShards([rows[:32], rows[32:]])
    shredder = Shredder()
    batches = EncryptedBatches(twin, FeatureRecords(4, 3), batch_size=8, rank=0, world_size=1,
                               seed=0, prefetch_depth=1, shredder=shredder)
    x, y = next(iter(batches))
    assert x.shape == (8, 4) and y.shape == (8,)
    for row in range(8):
        i = int(x[row, 0])
        assert torch.equal(x[row], torch.tensor([i, -i, i / 2, 1.0])) and int(y[row]) == i % 3
    shredder.shred("test")
    bad = EncryptedBatches(PlaintextShards([[b"short"]]), FeatureRecords(4, 3), batch_size=1,
                           rank=0, world_size=1, seed=0, prefetch_depth=1, shredder=Shredder())
    with pytest.raises(ValueError, match="classifier record 0 of shard 0 has 5 bytes, expected 20"):
        next(iter(bad))
    # the same records sealed and read back through the real reader
    ref = write_dataset(LocalDirStore(tmp_path / "feat"), rows, dek=dataset.dek,
                        tenant_id="acme", dataset_id="feat", key_version=1,
                        share_holders=["a"], target_shard_size=4096)
    from sealed.reader import DatasetReader

    sealed = SealedShards(DatasetReader.open(LocalDirStore(tmp_path / "feat"), ref.manifest_name,
                                             dek=dataset.dek, tenant_id="acme",
                                             dataset_id="feat", key_version=1))
    shredder = Shredder()
    x2, y2 = next(iter(EncryptedBatches(sealed, FeatureRecords(4, 3), batch_size=8, rank=0,
                                        world_size=1, seed=0, prefetch_depth=1,
                                        shredder=shredder)))
    assert all(int(y2[r]) == int(x2[r, 0]) % 3 for r in range(8))
    shredder.shred("test")


def test_the_prefetcher_names_the_shard_it_decrypts_next(dataset):
    """The next-shard hint (which starts the sealed reader's disk reads early) is always the
    shard actually decrypted next, across epochs."""
    import threading

    calls: list[tuple[int, int | None]] = []
    enough = threading.Event()

    class Recording(PlaintextShards):
        def decrypt_shard_into(self, j, buffer, next_shard=None):
            calls.append((j, next_shard))
            if len(calls) >= 3 * self.num_shards:
                enough.set()
            return super().decrypt_shard_into(j, buffer, next_shard)

    reader = open_sealed_reader(_config(dataset), dataset.dek)
    records = corpus(400, canary=dataset.canary.decode())
    shards, start = [], 0
    for entry in reader.reader.manifest.shards:
        shards.append(records[start : start + entry.record_count])
        start += entry.record_count
    reader.close()
    recording = Recording(shards)
    assert recording.num_shards >= 3
    shredder = Shredder()
    it = iter(make_loader(_batches(recording, shredder, seq_len=255, batch=32)))
    for _ in range(5000):  # consume until three epochs were decrypted
        next(it)
        if enough.is_set():
            break
    shredder.shred("test")
    assert enough.is_set()
    assert all(hint == nxt for (_, hint), (nxt, _) in itertools.pairwise(calls))
    plan = ShardPlan(recording.num_shards, 0, 1, 7)
    order = plan.order(0) + plan.order(1)
    assert [j for j, _ in calls[: len(order)]] == order
