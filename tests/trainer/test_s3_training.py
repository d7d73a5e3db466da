"""Training on a dataset kept in S3: a real S3-compatible server (moto's server mode, a
subprocess), the tenant's ``kms-broker dataset upload --store s3://...`` command, a real broker
(subprocess, mTLS, SoftHSM) releasing the key, and two torchrun ranks reading
``store: s3://...`` from the job file. The S3 endpoint and credentials reach every process
only through the standard AWS profile files. Afterwards every object in the bucket is scanned
for the plaintext canary and for the record names.

Evidence is the broker tests' ``test-json`` kind (tests/trainer/attested_entry.py: the
production path except the TPM quote, which the attestation tests cover).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import uuid

import pytest

from tests.kms_broker.conftest import enrol, pki, start_broker  # noqa: F401 - fixture
from tests.kms_broker.hsm_fixtures import softhsm_config  # noqa: F401 - fixture
from tests.kms_broker.verifiers import POLICY_YAML
from tests.s3server import S3Server
from tests.trainer.conftest import (
    PY,
    REPO,
    Proc,
    child_env,
    corpus,
    files_containing,
    job_dict,
    losses,
    write_job,
)

pytestmark = pytest.mark.integration
ENTRY = REPO / "tests" / "trainer" / "attested_entry.py"
PREFIX = "tenants/acme"


EXIT_DATASET = 8  # trainer/dataset_check.py


def _releases(broker) -> int:  # type: ignore[no-untyped-def]
    return sum(1 for r in broker.audit() if r["event"] == "release"
               and r["outcome"] == "allowed")


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "kms_broker.cli", *args], cwd=REPO,
                          env=child_env(**env), capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_upload_to_s3_and_train_from_it(tmp_path, pki, softhsm_config, procs):  # noqa: F811
    server = S3Server(tmp_path / "s3", tls=True)
    broker = start_broker(tmp_path / "broker", pki, softhsm_config, name="s3b")
    try:
        canary = f"CANARY-{uuid.uuid4().hex}"
        data = tmp_path / "corpus"
        data.mkdir()
        for i, record in enumerate(corpus(400, canary=canary)):
            (data / f"{canary}-{i:03d}.txt").write_bytes(record)  # names are secrets too
        tls = ["--ca", str(pki.ca_path), "--cert", str(pki.root / "tenant-acme.pem"),
               "--key", str(pki.root / "tenant-acme.key")]
        tenant = ["--broker", broker.address, "--tenant", "acme", *tls]
        key = tmp_path / "tenant.key"
        env = server.env
        _cli(env, "tenant", "init", "--key", str(key))
        _cli(env, "tenant", "register", *tenant, "--tenant-key", str(key))
        enrol(broker, "n1")
        up = _cli(env, "dataset", "upload", str(data), "--store", server.url(PREFIX),
                  "--dataset", "corpus", *tenant, "--tenant-key", str(key))
        assert "uploaded 400 records" in up.stdout
        manifest = re.search(r"manifest (\S+);", up.stdout).group(1)
        policy = tmp_path / "policy.yaml"
        policy.write_text(POLICY_YAML)
        digest = _cli(env, "policy", "put", str(policy), *tenant).stdout.split()[-1]
        _cli(env, "grant", "create", "--dataset", "corpus", "--job", "job-1",
             "--policy-digest", digest, "--grant-id", "g1", *tenant, "--tenant-key", str(key))
        # the broker records where the dataset lives: the s3:// address
        assert server.url(PREFIX) in str(broker.db().execute(
            "SELECT store_uri FROM datasets").fetchall())

        node = {"address": broker.address, "ca": str(pki.ca_path),
                "cert": str(pki.root / "node-n1.pem"), "key": str(pki.root / "node-n1.key"),
                "server_name": "localhost"}
        ds = type("DS", (), {"manifest": manifest, "store": server.url(PREFIX)})
        spec = job_dict(ds, tmp_path / "run", brokers=[node], steps=40,
                        attestation={"node_id": "n1", "tcti": "device:/dev/null"})
        # no manifest, no key version: the broker's record names them (issue 16)
        spec["dataset"] = {"id": "corpus", "store": server.url(PREFIX)}
        job = write_job(tmp_path / "job.yaml", spec)
        cmd = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               str(ENTRY), "--job", str(job)]
        proc = Proc(cmd, tmp_path / "logs", "train", **env)
        procs.append(proc)
        assert proc.wait() == 0, proc.err()[-4000:]
        found = losses(proc.err())
        assert found and found[0][1] > 5.0 and found[-1][1] < 0.6 * found[0][1]
        assert proc.err().count("shred report (normal exit)") == 2

        # the bucket holds ciphertext under opaque names, nothing else
        objects = server.objects()
        assert len(objects) >= 2 and all(k.startswith(PREFIX + "/") for k in objects)
        for k, body in objects.items():
            assert re.fullmatch(rf"{PREFIX}/(shards|manifests)/[0-9a-f]{{32}}", k), k
            assert canary.encode() not in body
            assert b"old tree near the river" not in body
        # nor did plaintext reach any file this run wrote (logs, checkpoints, state)
        assert files_containing([tmp_path / "run", tmp_path / "s3"],
                                [canary.encode()]) == []

        # the manifest on record gone from the bucket: found before any key is released
        releases = _releases(broker)
        server.raw.delete_object(Bucket=server.bucket, Key=f"{PREFIX}/{manifest}")
        cmd = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
               str(ENTRY), "--job", str(job)]
        proc = Proc(cmd, tmp_path / "logs", "missing", **env)
        procs.append(proc)
        assert proc.wait() != 0, proc.err()[-4000:]  # torchrun itself exits 1
        assert f"failed (exitcode: {EXIT_DATASET})" in proc.err(), proc.err()[-4000:]
        assert f"manifest {manifest} of dataset corpus is not in the store" in proc.err()
        assert _releases(broker) == releases
    finally:
        broker.stop()
        server.stop()


def test_a_tampered_object_in_the_bucket_stops_training(tmp_path, pki, softhsm_config,  # noqa: F811
                                                        procs):
    from kms_broker.grants import GrantDocument
    from kms_broker.tenant import upload_dataset

    server = S3Server(tmp_path / "s3")
    broker = start_broker(tmp_path / "broker", pki, softhsm_config, name="s3t")
    try:
        store = server.store(PREFIX)
        with broker.tenant("acme") as client:
            client.register()
            enrol(broker, "n1")
            up = upload_dataset([client], corpus(400), store, dataset_id="corpus",
                                store_uri=server.url(PREFIX))
            digest = client.put_policy(POLICY_YAML)
            client.create_grant(GrantDocument(
                grant_id="g1", tenant_id="acme", dataset_id="corpus", job_id="job-1",
                policy_digest=digest, max_nodes=4,
                expires_unix_ms=int(time.time() * 1000) + 3_600_000))
        store.close()
        shards = [k for k in server.objects() if "/shards/" in k]
        body = bytearray(server.raw.get_object(Bucket=server.bucket,
                                               Key=shards[0])["Body"].read())
        body[len(body) // 2] ^= 0x04
        server.raw.put_object(Bucket=server.bucket, Key=shards[0], Body=bytes(body))

        node = {"address": broker.address, "ca": str(pki.ca_path),
                "cert": str(pki.root / "node-n1.pem"), "key": str(pki.root / "node-n1.key"),
                "server_name": "localhost"}
        ds = type("DS", (), {"manifest": up.manifest_name, "store": server.url(PREFIX)})
        job = write_job(tmp_path / "job.yaml", job_dict(
            ds, tmp_path / "run", brokers=[node], steps=20,
            attestation={"node_id": "n1", "tcti": "device:/dev/null"}))
        proc = Proc([PY, str(ENTRY), "--job", str(job)], tmp_path / "logs", "train",
                    **server.env)
        procs.append(proc)
        assert proc.wait() != 0
        err = proc.err()
        assert "decryption failed (shard 0" in err, err[-3000:]
        assert not losses(err)  # no step ran on data that failed authentication
    finally:
        broker.stop()
        server.stop()


@pytest.fixture(autouse=True)
def _no_aws_from_the_machine(monkeypatch):
    """Only what S3Server hands out configures S3 in these tests."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
