"""docker-compose.yml's ``s3`` service (profile ``s3``) run by the local harness: a development
S3-compatible server over TLS with a certificate from the deployment's CA, reached through the
standard AWS files bootstrap writes; and the whole deployment training from a dataset kept
there (``DATASET_STORE=s3://...``), every object scanned for the corpus' sentences."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from compose import LocalHarness
from compose.image import build_image_environment, image_environment_variables
from compose.ports import free_port, free_port_pairs
from sealed import DatasetReader, SecretBuffer, open_store, write_dataset
from sealed.s3store import S3Store
from tests.compose.conftest import live_processes
from tests.compose.test_deployment import (
    CANARIES,
    COMPOSE_FILE,
    _files_containing,
    _released_to,
)

pytestmark = pytest.mark.integration
PREFIX = "datasets/corpus"


def _use_aws_files(monkeypatch: pytest.MonkeyPatch, harness: LocalHarness, home: str) -> None:
    """This process configured as the service whose home is ``home`` is (only its files)."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    volume = harness.volume_path(home.rsplit("/", 1)[-1])
    monkeypatch.setenv("AWS_CONFIG_FILE", str(volume / "aws" / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(volume / "aws" / "credentials"))


def _bucket_objects(store: S3Store) -> dict[str, bytes]:
    return {name: store.get_range(name, 0, store.size(name)) for name in store.list()}


def test_s3_service_serves_tls_with_the_deployment_ca(tmp_path: Path, monkeypatch) -> None:
    provider, tenant = free_port_pairs(2)
    variables = {"S3_PORT": str(free_port()), "PROVIDER_BROKER_PORT": str(provider),
                 "TENANT_BROKER_PORT": str(tenant)}
    harness = LocalHarness(COMPOSE_FILE, tmp_path / "run", variables=variables,
                           profiles=["s3"])
    marker = f"CT_COMPOSE_ID={harness.run_id}:"
    try:
        harness.up(["s3"], wait=True)
        assert {s.name: s.health for s in harness.ps()}["s3"] == "healthy"
        _use_aws_files(monkeypatch, harness, "/var/lib/tenant")
        config = (harness.volume_path("tenant") / "aws" / "config").read_text()
        assert f"endpoint_url = https://127.0.0.1:{variables['S3_PORT']}" in config
        assert os.stat(harness.volume_path("tenant") / "aws" / "credentials").st_mode \
            & 0o077 == 0
        store = open_store(f"s3://ct-data/{PREFIX}")
        canary = b"CANARY-compose-" + os.urandom(8).hex().encode()
        with SecretBuffer.random(32) as dek:
            ref = write_dataset(store, [canary + b" %d" % i for i in range(50)], dek=dek,
                                tenant_id="acme", dataset_id="corpus", key_version=1,
                                share_holders=["b"])
            with DatasetReader.open(store, ref.manifest_name, dek=dek, tenant_id="acme",
                                    dataset_id="corpus", key_version=1) as reader:
                assert bytes(reader.read_record(7)) == canary + b" 7"
        objects = _bucket_objects(store)
        assert objects and all(canary not in body for body in objects.values())
        store.close()
        # a node reaches the same server with its own files
        _use_aws_files(monkeypatch, harness, "/var/lib/node-a")
        node_store = open_store(f"s3://ct-data/{PREFIX}")
        assert node_store.list() == sorted(objects)
        node_store.close()
    finally:
        harness.down()
    assert live_processes(pgids=set(), marker=marker) == []
    assert not harness.run_dir.exists()


@pytest.mark.slow
def test_the_deployment_trains_from_a_dataset_in_s3(tmp_path: Path, monkeypatch) -> None:
    steps = 60
    provider, tenant, tpm_a, tpm_b, master = free_port_pairs(5)
    variables = {
        "PROVIDER_BROKER_PORT": str(provider), "TENANT_BROKER_PORT": str(tenant),
        "TPM_A_PORT": str(tpm_a), "TPM_A_CTRL_PORT": str(tpm_a + 1),
        "TPM_B_PORT": str(tpm_b), "TPM_B_CTRL_PORT": str(tpm_b + 1),
        "MASTER_PORT": str(master), "TRAIN_STEPS": str(steps), "LEASE_TTL_MS": "60000",
        "S3_PORT": str(free_port()), "DATASET_STORE": f"s3://ct-data/{PREFIX}",
    }
    image = build_image_environment(tmp_path / "image")
    harness = LocalHarness(COMPOSE_FILE, tmp_path / "run", variables=variables,
                           profiles=["s3"], image_env=image_environment_variables(image))
    marker = f"CT_COMPOSE_ID={harness.run_id}:"
    try:
        harness.up()
        harness.wait_all_completed(["node-a", "node-b"])
        node_a = harness.logs("node-a")
        assert f"step {steps}/{steps}" in node_a and "world 2 on cpu" in node_a
        losses = [float(x) for x in re.findall(rf"step \d+/{steps} loss ([\d.]+)", node_a)]
        assert losses[-1] < losses[0]
        assert "shred report (normal exit)" in harness.logs("node-b")
        for broker in ("provider", "tenant"):
            assert _released_to(harness, broker) == {"node:node-a", "node:node-b"}
        # the dataset is in the bucket, not in the shared volume
        store_volume = harness.volume_path("store")
        assert not (store_volume / "shards").exists()
        assert not (store_volume / "manifests").exists()
        _use_aws_files(monkeypatch, harness, "/var/lib/tenant")
        store = open_store(f"s3://ct-data/{PREFIX}")
        objects = _bucket_objects(store)
        store.close()
        assert any(n.startswith("shards/") for n in objects)
        for name, body in objects.items():
            assert re.fullmatch(r"(shards|manifests)/[0-9a-f]{32}", name), name
            assert not [c for c in CANARIES if c in body], name
        assert _files_containing(harness.run_dir, CANARIES) == []
    finally:
        harness.down()
    assert live_processes(pgids=set(), marker=marker) == []
    assert not harness.run_dir.exists()
