"""The sealed data format: shard layout, manifest, and stored objects through the reader.

* ``shard_layout``: ``ShardView`` over a shard plaintext (magic, version, record count, the
  offset table), then every record. Expected error: ``FormatError``.
* ``manifest``: ``decode_manifest`` over a manifest plaintext (every length, count and
  identifier). Expected error: ``FormatError``.
* ``sealed_objects``: what an attacker who owns the object store controls: the bytes of a
  stored shard (byte 0 even) or of the stored manifest (odd) of a real dataset, read through
  ``DatasetReader.open`` and every record of the shard, as the trainer reads. Expected
  errors: ``DecryptionError``, ``FormatError``, ``StoreError`` (the ``SealedError`` family).

Seeds: a small dataset written by ``sealed.write_dataset`` with a fixed key (the seeds are
the real objects and their plaintexts).
"""

from __future__ import annotations

import atexit
import random
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fuzz.base import Harness

__all__ = ["HARNESSES"]

_TENANT, _DATASET = "acme", "corpus"


class _Dataset:
    """A real three-shard dataset in a temporary LocalDirStore, written once per process."""

    def __init__(self) -> None:
        from sealed import SecretBuffer, write_dataset
        from sealed.store import LocalDirStore

        self.dir = Path(tempfile.mkdtemp(prefix="fuzz-sealed-"))
        self.dek = SecretBuffer.from_bytes(bytes(range(32)), lock=False)
        records = [f"record {i}: ".encode() + bytes([i]) * (12 * i) for i in range(40)]
        self.ref = write_dataset(
            LocalDirStore(self.dir / "store"), records, dek=self.dek, tenant_id=_TENANT,
            dataset_id=_DATASET, key_version=1, share_holders=["broker-a", "broker-b"],
            target_shard_size=4096, random=random.Random(7).randbytes)  # deterministic seeds
        root = self.dir / "store"
        self.original = {p.relative_to(root).as_posix(): p.read_bytes()
                         for p in root.rglob("*") if p.is_file()}
        self.manifest = self.open().manifest

    def open(self) -> Any:
        from sealed.reader import DatasetReader
        from sealed.store import LocalDirStore

        return DatasetReader.open(LocalDirStore(self.dir / "store"), self.ref.manifest_name,
                                  dek=self.dek, tenant_id=_TENANT, dataset_id=_DATASET,
                                  key_version=1)

    def path(self, name: str) -> Path:
        return self.dir / "store" / name

    def restore(self) -> None:
        for name, data in self.original.items():
            self.path(name).write_bytes(data)


_DS: list[_Dataset] = []


def _ds() -> _Dataset:
    if not _DS:
        _DS.append(_Dataset())
        atexit.register(_DS.clear)  # the key's buffer is wiped while the interpreter is whole
    return _DS[0]


def _shard_layout(data: bytes) -> None:
    from sealed.shard import ShardView

    view = ShardView(data)
    assert sum(len(r) for r in view) == view.offsets[-1] - view.offsets[0]


def _plaintexts() -> Iterator[bytearray]:
    ds = _ds()
    with ds.open() as reader:
        for j in range(reader.num_shards):
            buf = bytearray(reader.shard_plaintext_size(j))
            reader.decrypt_shard_into(j, buf)
            yield buf


def _shard_layout_seeds() -> Iterator[tuple[str, bytes]]:
    for j, plain in enumerate(_plaintexts()):
        yield f"shard{j}", bytes(plain)


def _manifest(data: bytes) -> None:
    from sealed.manifest import decode_manifest

    m = decode_manifest(data)
    if m.num_records:
        m.locate(m.num_records - 1)


def _manifest_seeds() -> Iterator[tuple[str, bytes]]:
    from sealed.manifest import encode_manifest

    yield "three-shards", encode_manifest(_ds().manifest)


def _objects(data: bytes) -> None:
    if not data:
        return
    ds = _ds()
    shards = ds.manifest.shards
    name = shards[0].object_name if data[0] % 2 == 0 else ds.ref.manifest_name
    ds.path(name).write_bytes(data[1:])
    try:
        with ds.open() as reader:
            for i in range(reader.shard_record_count(0)):
                reader.read_shard_record(0, i)
    finally:
        ds.path(name).write_bytes(ds.original[name])


def _objects_seeds() -> Iterator[tuple[str, bytes]]:
    ds = _ds()
    yield "shard0", b"\x00" + ds.original[ds.manifest.shards[0].object_name]
    yield "manifest", b"\x01" + ds.original[ds.ref.manifest_name]


def _harnesses() -> list[Harness]:
    from sealed.errors import FormatError, SealedError

    return [
        Harness("shard_layout", "sealed.shard.ShardView (record table) + records",
                _shard_layout, (FormatError,), _shard_layout_seeds, max_len=16384),
        Harness("manifest", "sealed.manifest.decode_manifest", _manifest, (FormatError,),
                _manifest_seeds, max_len=16384),
        Harness("sealed_objects", "sealed.reader.DatasetReader over stored shard / manifest "
                "objects (stream header, segments, sizes, tags)", _objects, (SealedError,),
                _objects_seeds, max_len=16384),
    ]


HARNESSES = _harnesses
