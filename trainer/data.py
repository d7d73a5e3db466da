"""Encrypted shards to training batches, with plaintext only in reusable in-memory buffers.

Pipeline (per rank)::

    ShardReader --(prefetch thread: decrypt shard j into a pooled buffer; the adapter
                   finds its samples in place, no copy)--> bounded queue
    --(main thread: adapter cuts fixed-size samples into preallocated batch tensors)-->
    IterableDataset --> torch DataLoader(batch_size=None, num_workers=0)

* **Assignment.** Shard ``j`` belongs to rank ``j % world_size`` (with fewer shards than
  ranks, every rank reads every shard and takes a disjoint stride of its samples); every epoch
  a rank visits its shards in an order drawn from ``(seed, epoch, rank)``, and samples inside
  a shard in an order drawn from ``(seed, epoch, shard)``. The stream never ends (epochs
  repeat), so every rank always has the next batch and DDP steps stay in lockstep.
* **Buffers.** ``prefetch_depth + 2`` decrypt buffers are allocated once (grown only if a
  larger shard appears) and registered with the shredder, as are the batch tensors. Nothing
  is written to disk and ``num_workers=0`` keeps plaintext in this process.
* **Prefetch.** A daemon thread decrypts ahead while the main thread trains; AES-GCM in
  cryptography >= 50 releases the GIL, so decryption overlaps the model's compute. It tells
  the reader which shard comes next (``next_shard``), so the sealed reader starts reading
  that shard's ciphertext from disk before it returns the current one.
* **Adapters** give record payloads meaning: :class:`TokenWindows` (records are text; the
  shard's record bytes, stored back to back, are cut in place into windows of
  ``seq_len + 1`` bytes: input and shifted target) and :class:`FeatureRecords` (each record
  is ``features`` float32 little-endian values followed by a uint32 little-endian label).
"""

from __future__ import annotations

import itertools
import queue
import random
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch.utils.data import DataLoader, IterableDataset

from trainer.shred import Shredder

__all__ = [
    "DataStats",
    "EncryptedBatches",
    "FeatureRecords",
    "PlaintextShards",
    "Prefetcher",
    "ShardPlan",
    "ShardReader",
    "TokenWindows",
    "make_loader",
]

MAX_SHARD_BYTES = 1 << 32


class ShardReader(Protocol):
    """What the pipeline needs from a dataset reader (the sealed reader, or plaintext)."""

    @property
    def num_shards(self) -> int: ...

    def shard_capacity(self, j: int) -> int:
        """Bytes of buffer :meth:`decrypt_shard_into` needs for shard ``j``."""
        ...

    def decrypt_shard_into(
        self, j: int, buffer: bytearray, next_shard: int | None = None
    ) -> memoryview:
        """Authenticate and decrypt shard ``j`` into ``buffer``; return the plaintext view.

        ``next_shard`` is the shard the pipeline decrypts next (a hint: its reads may start
        now, while this shard's samples are used)."""
        ...

    def records(self, j: int, plaintext: memoryview) -> Iterator[memoryview]:
        """The record payloads of shard ``j``, as views into its decrypted plaintext."""
        ...

    def payload(self, j: int, plaintext: memoryview) -> memoryview:
        """All record bytes of shard ``j`` back to back (records are stored contiguously)."""
        ...


class PlaintextShards:
    """Records held in memory in the clear: the benchmark's plaintext baseline ONLY.

    It goes through the same pipeline (buffers, prefetch, adapters); ``decrypt_shard_into``
    is a copy instead of authenticated decryption. Never used by ``trainer --attest``.
    """

    def __init__(self, shards: Sequence[Sequence[bytes]]) -> None:
        self._blobs = [b"".join(records) for records in shards]
        self._offsets: list[list[int]] = []
        for records in shards:
            offsets, pos = [0], 0
            for r in records:
                pos += len(r)
                offsets.append(pos)
            self._offsets.append(offsets)

    @property
    def num_shards(self) -> int:
        return len(self._blobs)

    def shard_capacity(self, j: int) -> int:
        return len(self._blobs[j])

    def decrypt_shard_into(
        self, j: int, buffer: bytearray, next_shard: int | None = None
    ) -> memoryview:
        n = len(self._blobs[j])
        view = memoryview(buffer)[:n]
        view[:] = self._blobs[j]
        return view

    def records(self, j: int, plaintext: memoryview) -> Iterator[memoryview]:
        offsets = self._offsets[j]
        for a, b in itertools.pairwise(offsets):
            yield plaintext[a:b]

    def payload(self, j: int, plaintext: memoryview) -> memoryview:
        return plaintext[: len(self._blobs[j])]


@dataclass(frozen=True, slots=True)
class ShardPlan:
    """Which shards a rank reads, in which order, each epoch.

    With at least as many shards as ranks, shard ``j`` belongs to rank ``j % world_size``.
    With fewer shards than ranks, every rank reads every shard and keeps every
    ``world_size``-th sample of the shard's (rank-independent) shuffled order, starting at its
    rank: the ranks still see disjoint samples.
    """

    num_shards: int
    rank: int
    world_size: int
    seed: int

    def __post_init__(self) -> None:
        if self.num_shards < 1:
            raise ValueError("the dataset has no shards")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside world size {self.world_size}")

    @property
    def striped(self) -> bool:
        return self.num_shards < self.world_size

    @property
    def shards(self) -> list[int]:
        if self.striped:
            return list(range(self.num_shards))
        return list(range(self.rank, self.num_shards, self.world_size))

    def order(self, epoch: int) -> list[int]:
        mine = self.shards
        random.Random(f"{self.seed}/{epoch}/{self.rank}").shuffle(mine)  # noqa: S311 - order only
        return mine


class DataStats:
    """Counters the prefetch thread updates and the logger reads."""

    def __init__(self) -> None:
        self.decrypted_bytes = 0
        self.decrypt_seconds = 0.0
        self.shards = 0
        self.wait_seconds = 0.0  # main thread blocked on the queue
        self.started = time.perf_counter()

    @property
    def decrypt_gbps(self) -> float:
        """Decryption throughput of the prefetch thread (GB/s of plaintext)."""
        return self.decrypted_bytes / self.decrypt_seconds / 1e9 if self.decrypt_seconds else 0.0


class _Slot:
    __slots__ = ("buffer",)

    def __init__(self) -> None:
        self.buffer = bytearray(0)


@dataclass(slots=True)
class ReadyShard:
    epoch: int
    shard: int
    slot: _Slot
    stream: memoryview  # the shard's samples, back to back, inside the slot's buffer
    count: int  # number of samples in stream


class _Adapter(Protocol):
    sample_bytes: int

    def pack(self, reader: ShardReader, j: int, plain: memoryview) -> tuple[memoryview, int]: ...


_STOP = object()


class Prefetcher:
    """Background decryption into pooled buffers, handing whole shards to the consumer."""

    def __init__(
        self,
        reader: ShardReader,
        plan: ShardPlan,
        adapter: _Adapter,
        *,
        depth: int,
        shredder: Shredder,
        start_epoch: int = 0,
    ) -> None:
        self._reader = reader
        self._plan = plan
        self._adapter = adapter
        self._shredder = shredder
        self._free: queue.Queue[_Slot] = queue.Queue()
        for _ in range(depth + 2):
            self._free.put(_Slot())
        self._ready: queue.Queue[object] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._start_epoch = start_epoch
        self.stats = DataStats()
        self._thread = threading.Thread(target=self._run, name="trainer-prefetch", daemon=True)
        shredder.add_stop_hook(self.stop, first=True)

    def start(self) -> Prefetcher:
        self._thread.start()
        return self

    def _grow(self, slot: _Slot, size: int) -> bytearray:
        if len(slot.buffer) >= size:
            return slot.buffer
        if not 0 < size <= MAX_SHARD_BYTES:
            raise ValueError(f"a shard needs {size} bytes of buffer, outside 1 B..4 GiB")
        new = bytearray(size)
        self._shredder.add_buffer("plaintext shard buffer", new)
        slot.buffer = new
        return new

    def _run(self) -> None:
        try:
            epoch = self._start_epoch
            order = self._plan.order(epoch)
            while not self._stop.is_set():
                following = self._plan.order(epoch + 1)
                for k, j in enumerate(order):
                    slot = self._take_free()
                    if slot is None:
                        return
                    buf = self._grow(slot, self._reader.shard_capacity(j))
                    after = order[k + 1] if k + 1 < len(order) else following[0]
                    t0 = time.perf_counter()
                    plain = self._reader.decrypt_shard_into(j, buf, after)
                    self.stats.decrypt_seconds += time.perf_counter() - t0
                    self.stats.decrypted_bytes += len(plain)
                    self.stats.shards += 1
                    if self._stop.is_set():
                        return
                    view, count = self._adapter.pack(self._reader, j, plain)
                    if not self._put(ReadyShard(epoch, j, slot, view, count)):
                        return
                epoch += 1
                order = following
        except BaseException as exc:  # the consumer re-raises it in the main thread
            self._put(exc)

    def _take_free(self) -> _Slot | None:
        while not self._stop.is_set():
            try:
                return self._free.get(timeout=0.1)
            except queue.Empty:
                continue
        return None

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def get(self) -> ReadyShard:
        t0 = time.perf_counter()
        item = self._ready.get()
        self.stats.wait_seconds += time.perf_counter() - t0
        if isinstance(item, BaseException):
            raise item
        assert isinstance(item, ReadyShard)
        return item

    def release(self, shard: ReadyShard) -> None:
        shard.stream.release()
        self._free.put(shard.slot)

    def stop(self) -> None:
        """Stop decrypting; returns once the thread has left (or after 5 s)."""
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=5.0)


class TokenWindows:
    """Byte-level LM samples: windows of ``seq_len + 1`` bytes (input and shifted target)."""

    def __init__(self, seq_len: int) -> None:
        self.seq_len = seq_len
        self.sample_bytes = seq_len + 1

    def pack(self, reader: ShardReader, j: int, plain: memoryview) -> tuple[memoryview, int]:
        """Records are text stored back to back: windows are cut from the payload in place."""
        payload = reader.payload(j, plain)
        count = len(payload) // self.sample_bytes
        return payload[: count * self.sample_bytes], count

    def batch_tensors(self, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows = torch.zeros(batch, self.sample_bytes, dtype=torch.uint8)
        return rows, torch.zeros(batch, self.seq_len, dtype=torch.long), torch.zeros(
            batch, self.seq_len, dtype=torch.long
        )

    def finish(self, rows: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> None:
        x.copy_(rows[:, :-1])
        y.copy_(rows[:, 1:])

    def tokens_per_sample(self) -> int:
        return self.seq_len


class FeatureRecords:
    """Classifier samples: ``features`` float32 LE values then a uint32 LE label per record."""

    def __init__(self, features: int, classes: int) -> None:
        self.features = features
        self.classes = classes
        self.sample_bytes = 4 * (features + 1)

    def pack(self, reader: ShardReader, j: int, plain: memoryview) -> tuple[memoryview, int]:
        """Every record must be exactly one sample; they are then used in place."""
        count = 0
        for i, rec in enumerate(reader.records(j, plain)):
            if len(rec) != self.sample_bytes:
                raise ValueError(
                    f"classifier record {i} of shard {j} has {len(rec)} bytes, expected "
                    f"{self.sample_bytes} ({self.features} float32 features + uint32 label)"
                )
            count += 1
        payload = reader.payload(j, plain)
        return payload[: count * self.sample_bytes], count

    def batch_tensors(self, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows = torch.zeros(batch, self.sample_bytes, dtype=torch.uint8)
        return rows, torch.zeros(batch, self.features), torch.zeros(batch, dtype=torch.long)

    def finish(self, rows: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> None:
        x.copy_(rows[:, : 4 * self.features].view(torch.float32))
        y.copy_(rows[:, 4 * self.features :].view(torch.int32).squeeze(1))
        if int(y.max()) >= self.classes or int(y.min()) < 0:
            raise ValueError(f"classifier label outside 0..{self.classes - 1}")

    def tokens_per_sample(self) -> int:
        return 1


class EncryptedBatches(IterableDataset):
    """Endless batches ``(x, y)`` from a rank's shards (see the module docstring).

    The yielded tensors are reused: two alternating sets, overwritten two batches later. They
    are registered with the shredder, as are the prefetcher's buffers.
    """

    def __init__(
        self,
        reader: ShardReader,
        adapter: TokenWindows | FeatureRecords,
        *,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        prefetch_depth: int,
        shredder: Shredder,
        start_epoch: int = 0,
    ) -> None:
        super().__init__()
        self.reader = reader
        self.adapter = adapter
        self.batch_size = batch_size
        self.plan = ShardPlan(reader.num_shards, rank, world_size, seed)
        self.seed = seed
        self.depth = prefetch_depth
        self.shredder = shredder
        self.epoch = start_epoch
        self._sets = [adapter.batch_tensors(batch_size) for _ in range(2)]
        for i, tensors in enumerate(self._sets):
            shredder.add_tensors(f"batch set {i}", lambda t=tensors: t)
        self.prefetcher = Prefetcher(
            reader, self.plan, adapter, depth=prefetch_depth, shredder=shredder,
            start_epoch=start_epoch,
        )

    @property
    def stats(self) -> DataStats:
        return self.prefetcher.stats

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.prefetcher.start()
        which, fill = 0, 0
        rows, x, y = self._sets[which]
        width = self.adapter.sample_bytes
        while True:
            ready = self.prefetcher.get()
            self.epoch = ready.epoch
            try:
                if ready.count == 0:
                    continue
                samples = torch.frombuffer(ready.stream, dtype=torch.uint8).view(-1, width)
                gen = torch.Generator().manual_seed(
                    (self.seed * 1_000_003 + ready.epoch * 65_537 + ready.shard) % (1 << 63)
                )
                order = torch.randperm(ready.count, generator=gen)
                if self.plan.striped:
                    order = order[self.plan.rank :: self.plan.world_size]
                taken, count = 0, len(order)
                while taken < count:
                    n = min(self.batch_size - fill, count - taken)
                    torch.index_select(
                        samples, 0, order[taken : taken + n], out=rows[fill : fill + n]
                    )
                    taken += n
                    fill += n
                    if fill == self.batch_size:
                        self.adapter.finish(rows, x, y)
                        yield x, y
                        which ^= 1
                        rows, x, y = self._sets[which]
                        fill = 0
                del samples
            finally:
                self.prefetcher.release(ready)


def make_loader(batches: EncryptedBatches) -> DataLoader:
    """A DataLoader over the batches; ``num_workers=0`` so plaintext never leaves the process."""
    return DataLoader(batches, batch_size=None, num_workers=0)
