"""Small helpers for the sealed tests (no fakes of the component under test)."""

from __future__ import annotations

import os

from sealed import SecretBuffer, write_dataset
from sealed.writer import DatasetRef

from .conftest import DATASET, TENANT, VERSION


def make_records(sizes: list[int]) -> list[bytes]:
    """Distinct records: random bytes of each size."""
    return [os.urandom(n) for n in sizes]


def write(store, records, dek: SecretBuffer, **kw) -> DatasetRef:
    args = {
        "dek": dek,
        "tenant_id": TENANT,
        "dataset_id": DATASET,
        "key_version": VERSION,
        "share_holders": ["broker-provider:7443", "broker-tenant:7443"],
        "target_shard_size": 3 << 20,
    }
    args.update(kw)
    return write_dataset(store, records, **args)


def open_reader(store, ref: DatasetRef, dek: SecretBuffer, **kw):
    from sealed import DatasetReader

    args = {
        "dek": dek,
        "tenant_id": ref.tenant_id,
        "dataset_id": ref.dataset_id,
        "key_version": ref.key_version,
    }
    args.update(kw)
    return DatasetReader.open(store, ref.manifest_name, **args)


def replace_object(store, name: str, data: bytes) -> None:
    """What an attacker with write access to storage does."""
    store.delete(name)
    store.put(name, data)


def read_object(store, name: str) -> bytes:
    return store.get_range(name, 0, store.size(name))
