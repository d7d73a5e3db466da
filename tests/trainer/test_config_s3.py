"""``dataset.store: s3://...`` in the job file: accepted, parsed once, bad addresses named."""

from __future__ import annotations

import os

import pytest

from sealed import SecretBuffer, StoreError
from tests.s3server import s3_server  # noqa: F401 - fixture
from trainer.config import ConfigError, JobConfig
from trainer.sealed_reader import open_sealed_reader

BASE = {
    "job_id": "job-1",
    "tenant_id": "acme",
    "dataset": {"id": "corpus", "key_version": 1, "manifest": "manifests/ab12",
                "store": "s3://ct-data/tenants/acme"},
    "checkpoint": {"dir": "/c"},
}


def _job(store: str) -> JobConfig:
    return JobConfig.from_mapping({**BASE, "dataset": {**BASE["dataset"], "store": store}})


def test_an_s3_store_is_accepted_and_is_not_a_path():
    ds = _job("s3://ct-data/tenants/acme").dataset
    assert ds.store_is_s3 and ds.store == "s3://ct-data/tenants/acme"
    with pytest.raises(ValueError, match="not a local path"):
        ds.store_path  # noqa: B018
    local = _job("file:///data/store").dataset
    assert not local.store_is_s3 and str(local.store_path) == "/data/store"


@pytest.mark.parametrize("store,message", [
    ("s3://Bad_Bucket/x", "dataset.store: invalid bucket name"),
    ("s3://ct-data/a b", "dataset.store: invalid s3 prefix"),
    ("s3://key:secret@ct-data/x", "dataset.store: s3 URL must be s3://BUCKET[/PREFIX]"),
    ("https://ct-data.example/x", "dataset.store must be a directory, file://PATH or s3://"),
])
def test_bad_store_addresses_name_the_field(store: str, message: str):
    with pytest.raises(ConfigError) as info:
        _job(store)
    assert message in str(info.value)


def test_the_trainer_opens_an_s3_store_for_s3_jobs(s3_server, monkeypatch):  # noqa: F811
    """open_sealed_reader reads the manifest from the bucket (missing here: a store error
    naming it, not a local path lookup)."""
    for name in [n for n in os.environ if n.startswith("AWS_")]:
        monkeypatch.delenv(name)
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    job = _job(s3_server.url("empty-prefix"))
    with SecretBuffer.random(32) as dek, \
            pytest.raises(StoreError, match="object manifests/ab12 not found"):
        open_sealed_reader(job, dek)
