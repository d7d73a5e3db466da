"""The tenant and operator command line, run as real subprocesses against a broker whose
certificates were made by ``kms-broker certs``."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from kms_broker.cli import main
from kms_broker.client import KeyClient
from kms_broker.rpc import BrokerEndpoint, PermissionDeniedError
from sealed import DatasetReader, LocalDirStore
from tests.kms_broker.conftest import REPO, enrol, start_broker
from tests.kms_broker.verifiers import POLICY_YAML, make_evidence

pytestmark = pytest.mark.integration


def run(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "kms_broker.cli", *args], cwd=REPO,
                          capture_output=True, text=True, check=False)
    if ok:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture(scope="module")
def cli_broker(tmp_path_factory, softhsm_config):
    root = tmp_path_factory.mktemp("cli")
    pki_dir = root / "pki"
    assert main(["certs", "ca", "--dir", str(pki_dir)]) == 0
    for role, ident in (("broker", "b"), ("tenant", "acme"), ("node", "n1"),
                        ("operator", "ops")):
        assert main(["certs", "issue", "--ca-dir", str(pki_dir), "--out", str(pki_dir),
                     "--role", role, "--id", ident]) == 0
    pki = SimpleNamespace(ca_path=pki_dir / "ca.pem", root=pki_dir)
    broker = start_broker(root, pki, softhsm_config, name="cli")
    yield broker, root, pki_dir
    broker.stop()


def tls(pki_dir: Path, role: str, ident: str) -> list[str]:
    return ["--ca", str(pki_dir / "ca.pem"), "--cert", str(pki_dir / f"{role}-{ident}.pem"),
            "--key", str(pki_dir / f"{role}-{ident}.key")]


def test_tenant_workflow_through_the_cli(cli_broker) -> None:
    broker, root, pki_dir = cli_broker
    key = root / "tenant.key"
    tenant = ["--broker", broker.address, "--tenant", "acme", *tls(pki_dir, "tenant", "acme")]
    run("tenant", "init", "--key", str(key))
    assert os.stat(key).st_mode & 0o777 == 0o600
    assert run("tenant", "init", "--key", str(key), ok=False).returncode == 1
    assert "registered, KEK v1" in run("tenant", "register", *tenant, "--tenant-key",
                                       str(key)).stdout
    enrol(broker, "n1")  # test-only direct enrolment (the test composition of the server)
    data = root / "data"
    (data / "sub").mkdir(parents=True)
    files = {f"f{i}.bin": secrets.token_bytes(2000 + i) for i in range(5)}
    files["sub/x.txt"] = b"hello"
    for name, payload in files.items():
        (data / name).write_bytes(payload)
    store = root / "store"
    up = run("dataset", "upload", str(data), "--store", str(store), "--dataset", "ds1",
             *tenant, "--tenant-key", str(key))
    assert "uploaded 6 records" in up.stdout and "100%" in up.stderr
    policy = root / "policy.yaml"
    policy.write_text(POLICY_YAML)
    digest = run("policy", "put", str(policy), *tenant).stdout.split()[-1]
    assert len(digest) == 64
    grant = run("grant", "create", "--dataset", "ds1", "--job", "job1", "--policy-digest",
                digest, "--grant-id", "g1", *tenant, "--tenant-key", str(key))
    assert "grant g1" in grant.stdout
    listing = run("dataset", "list", *tenant).stdout
    assert "ds1 status=active versions=[1] kek=v1" in listing

    endpoint = BrokerEndpoint.from_files(broker.address, ca=pki_dir / "ca.pem",
                                         cert=pki_dir / "node-n1.pem",
                                         key=pki_dir / "node-n1.key")
    manifest = listing.split("manifest=")[1].strip()
    with KeyClient([endpoint], node_id="n1", job_id="job1", evidence_for=make_evidence) as kc:
        released = kc.fetch_dek(tenant_id="acme", dataset_id="ds1", key_version=1)
    with released.dek as dek:
        reader = DatasetReader.open(LocalDirStore(store), manifest, dek=dek,
                                    tenant_id="acme", dataset_id="ds1", key_version=1)
        names = [reader.record_name(k) for k in range(reader.num_records)]
        assert sorted(names) == sorted(files)

    assert "KEK now v2, 1 share(s)" in run("dataset", "rotate", *tenant).stdout
    run("grant", "revoke", "g1", *tenant)
    with KeyClient([endpoint], node_id="n1", job_id="job1", evidence_for=make_evidence) as kc, \
            pytest.raises(PermissionDeniedError, match=r"grant\.revoked"):
        kc.fetch_dek(tenant_id="acme", dataset_id="ds1", key_version=1)

    unkeyed = run("audit", "verify", "--state-dir", str(broker.state_dir), ok=False)
    assert unkeyed.returncode == 2 and unkeyed.stdout.startswith("CHAIN INTACT, AUTHENTICITY "
                                                                 "NOT CHECKED")
    pem = run("audit", "public-key", "--config", str(broker.state_dir.parent / "cli.yaml")).stdout
    assert pem.startswith("-----BEGIN PUBLIC KEY-----")
    (broker.state_dir.parent / "audit-key.pem").write_text(pem)
    keyed = run("audit", "verify", "--state-dir", str(broker.state_dir),
                "--public-key", str(broker.state_dir.parent / "audit-key.pem"))
    assert keyed.stdout.startswith("OK") and "anchored up to record" in keyed.stdout
    tail = run("audit", "tail", "--state-dir", str(broker.state_dir), "--limit", "2").stdout
    assert len(tail.splitlines()) == 2
    online = run("audit", "verify", *tenant).stdout
    assert "OK" in online
    refused = run("tenant", "shred", *tenant, ok=False)
    assert refused.returncode == 1 and "--yes" in refused.stderr
    assert "key(s) destroyed" in run("tenant", "shred", *tenant, "--yes").stdout


def test_usage_errors_exit_2_and_failures_exit_1(cli_broker, tmp_path) -> None:
    broker, _, pki_dir = cli_broker
    assert run("dataset", "upload", ok=False).returncode == 2
    assert run("nonsense", ok=False).returncode == 2
    bad_pin = tmp_path / "pin"
    bad_pin.write_text("1234")
    bad_pin.chmod(0o644)
    failed = run("hsm", "init", "--state-dir", str(tmp_path / "h"), "--so-pin-file",
                 str(bad_pin), "--pin-file", str(bad_pin), ok=False)
    assert failed.returncode == 1 and "0600" in failed.stderr
    missing = run("dataset", "list", "--broker", broker.address, "--tenant", "nobody-here",
                  *tls(pki_dir, "tenant", "acme"), ok=False)
    assert missing.returncode == 1 and "does not match the client certificate" in missing.stderr
    assert "--help" not in run("--help").stderr and "serve" in run("--help").stdout


def test_hsm_init_creates_a_token_from_pin_files(tmp_path) -> None:
    pins = []
    for name in ("so", "user"):
        path = tmp_path / f"{name}.pin"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, secrets.token_hex(8).encode() + b"\n")
        os.close(fd)
        pins.append(path)
    out = run("hsm", "init", "--state-dir", str(tmp_path / "hsm"), "--label", "t1",
              "--so-pin-file", str(pins[0]), "--pin-file", str(pins[1]))
    assert "token 't1' ready" in out.stdout
    assert any((tmp_path / "hsm" / "tokens").iterdir())
    again = run("hsm", "init", "--state-dir", str(tmp_path / "hsm"), "--label", "t1",
                "--so-pin-file", str(pins[0]), "--pin-file", str(pins[1]), ok=False)
    assert again.returncode == 1 and "already exists" in again.stderr
    for p in pins:  # the PINs never reach argv or output
        assert p.read_text().strip() not in out.stdout + out.stderr


def test_policy_test_offline(tmp_path) -> None:
    from tests.kms_broker.verifiers import make_evidence

    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY_YAML)
    report_data = secrets.token_bytes(32)
    args = ["policy", "test", str(policy), "--kind", "test-json", "--report-data",
            report_data.hex(), "--verifier", "tests.kms_broker.verifiers:JsonClaimsVerifier"]
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_bytes(make_evidence(report_data)[1])
    bad.write_bytes(make_evidence(report_data, {"node.ksm.enabled": True,
                                                "node.swap.enabled": False})[1])
    allowed = run(*args[:3], str(good), *args[3:])
    assert "ALLOWED" in allowed.stdout and "PASS ksm-off" in allowed.stdout
    denied = run(*args[:3], str(bad), *args[3:], ok=False)
    assert denied.returncode == 1 and "FAIL ksm-off" in denied.stdout


def test_sigterm_stops_the_broker_with_a_signed_checkpoint(cli_broker) -> None:
    """Runs last in this module: it stops the module's broker."""
    import json

    broker, _, _ = cli_broker
    broker.stop()
    assert broker.proc.returncode == 0
    last = json.loads((broker.state_dir / "audit.log").read_text().splitlines()[-1])
    assert last["event"] == "checkpoint" and len(last["sig"]) > 100
