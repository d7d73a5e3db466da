"""The job's dataset, checked on this node before any key is released.

A job names its dataset by id, optionally with a key version and the manifest's object name
(``dataset:`` in the job file). What it leaves out, the node learns from the brokers: every
Challenge names the dataset and each broker answers with the manifest it has on record and
the key version it belongs to (:mod:`kms_broker.client`, ``check_dataset``). Before the node
makes its evidence or asks any broker for a release, :func:`require_manifest` checks that the
manifest is in the job's store, so a wrong store or name costs no key release and no lease.

Exit status 8 (``trainer --help``) for both failures here: :class:`DatasetMissing` (the
manifest is not in the store, or nobody knows its name) and :class:`DatasetMismatch` (the job
names another manifest than the brokers have on record, or the brokers disagree).
"""

from __future__ import annotations

import dataclasses

from trainer.config import DatasetConfig, JobConfig

__all__ = ["EXIT_DATASET", "DatasetMismatch", "DatasetMissing", "require_manifest", "resolved"]

EXIT_DATASET = 8


class DatasetMissing(Exception):
    """The job's manifest is not in its store (or its name is not known): found before any
    broker is asked for a key."""


class DatasetMismatch(Exception):
    """The dataset the job names is not what the brokers have on record."""


def resolved(config: JobConfig, *, key_version: int, manifest: str) -> JobConfig:
    """The job with its dataset's key version and manifest filled in (as the brokers said)."""
    dataset: DatasetConfig = dataclasses.replace(config.dataset, key_version=key_version,
                                                 manifest=manifest)
    return dataclasses.replace(config, dataset=dataset)


def require_manifest(config: JobConfig) -> None:
    """The dataset's manifest must be named (by the job or the brokers) and be in the job's
    store (a local directory, or the s3:// bucket: one HEAD request) before the key is
    requested."""
    from sealed.store import LocalDirStore

    if not config.dataset.manifest:
        raise DatasetMissing(
            f"the manifest of dataset {config.tenant_id}/{config.dataset.id} is not known: "
            f"the brokers have none on record for key version {config.dataset.key_version} "
            f"and the job file names none; name dataset.manifest (the name `kms-broker "
            f"dataset upload` printed)")
    store = config.dataset.store
    if config.dataset.store_is_s3:
        _require_in_bucket(store, config.dataset.manifest, config.dataset.id)
        return
    root = config.dataset.store_path
    if not root.is_dir():
        raise DatasetMissing(f"dataset.store {store} is not a directory on this node")
    if not LocalDirStore(root).exists(config.dataset.manifest):
        raise DatasetMissing(
            f"manifest {config.dataset.manifest} of dataset {config.dataset.id} is not in the "
            f"store {store} (the name `kms-broker dataset upload` printed, in the store it "
            f"wrote)")


def _require_in_bucket(store: str, manifest: str, dataset_id: str) -> None:
    from sealed.errors import StoreError
    from sealed.s3store import S3Store

    try:
        bucket = S3Store.from_url(store)
        try:
            found = bucket.exists(manifest)
        finally:
            bucket.close()
    except StoreError as exc:
        raise DatasetMissing(f"cannot look for manifest {manifest} in {store}: {exc}") from None
    if not found:
        raise DatasetMissing(
            f"manifest {manifest} of dataset {dataset_id} is not in the store {store} (the "
            f"name `kms-broker dataset upload` printed, in the store it wrote)")
