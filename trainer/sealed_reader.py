"""The sealed dataset reader seen through the pipeline's :class:`~trainer.data.ShardReader`.

A sealed shard's plaintext is an offset table followed by its records back to back
(sealed/shard.py), so a shard's payload is the single range ``[o_0, o_n)`` of the decrypted
buffer; records are views into it. The manifest's copy of the offset table (authenticated
with the manifest) is what this adapter uses.

The store is :class:`sealed.store.MappedDirStore` for a local directory: cached ciphertext
is decrypted straight from the page cache (no copy into a read buffer); a shard not in
memory is read whole, in order, by the store's I/O thread (with the kernel's read-ahead
window doubled on its file), a few 4 MiB chunks ahead, into reused buffers and decrypted
from them while the next chunks are read, and the pipeline names the next shard so its first
chunks are read before this one is handed over: a cold shard decrypts at about the rate a
plain ``read`` of its file gets. (An object truncated in place while it is mapped and
read ends the process with SIGBUS; see the store's docstring.) For ``store:
s3://bucket/prefix`` it is :class:`sealed.s3store.S3Store`: ranged GETs in parallel, with
the ranges after the one being decrypted prefetched.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from sealed.reader import DatasetReader
from sealed.s3store import S3Store
from sealed.secrets import SecretBuffer
from sealed.store import MappedDirStore

if TYPE_CHECKING:
    from trainer.config import JobConfig

__all__ = ["SealedShards", "open_sealed_reader"]


class SealedShards:
    """Adapter over :class:`sealed.reader.DatasetReader` (used by one thread at a time)."""

    def __init__(self, reader: DatasetReader,
                 store: MappedDirStore | S3Store | None = None) -> None:
        self.reader = reader
        self._store = store
        self._offsets = [list(s.offsets) for s in reader.manifest.shards]

    @property
    def num_shards(self) -> int:
        return self.reader.num_shards

    def shard_capacity(self, j: int) -> int:
        return self.reader.shard_plaintext_size(j)

    def decrypt_shard_into(
        self, j: int, buffer: bytearray, next_shard: int | None = None
    ) -> memoryview:
        return self.reader.decrypt_shard_into(j, buffer, next_shard=next_shard)

    def records(self, j: int, plaintext: memoryview) -> Iterator[memoryview]:
        offsets = self._offsets[j]
        for i in range(len(offsets) - 1):
            yield plaintext[offsets[i] : offsets[i + 1]]

    def payload(self, j: int, plaintext: memoryview) -> memoryview:
        offsets = self._offsets[j]
        return plaintext[offsets[0] : offsets[-1]]

    def close(self) -> None:
        self.reader.close()
        if self._store is not None:
            self._store.close()  # unmap the shards / stop the fetch threads


def open_sealed_reader(config: JobConfig, dek: SecretBuffer) -> SealedShards:
    """Open the job's dataset (authenticating its manifest) from its store. The job's
    key version and manifest must be known by now (named, or resolved by the brokers)."""
    from trainer.dataset_check import DatasetMissing

    if not config.dataset.manifest or config.dataset.key_version is None:
        raise DatasetMissing(f"dataset {config.dataset.id}: the manifest and key version are "
                             f"not known (name dataset.manifest and dataset.key_version)")
    store: MappedDirStore | S3Store
    if config.dataset.store_is_s3:
        store = S3Store.from_url(config.dataset.store)
    else:
        store = MappedDirStore(config.dataset.store_path)
    try:
        reader = DatasetReader.open(
            store,
            config.dataset.manifest,
            dek=dek,
            tenant_id=config.tenant_id,
            dataset_id=config.dataset.id,
            key_version=config.dataset.key_version,
        )
    except BaseException:
        store.close()
        raise
    return SealedShards(reader, store)
