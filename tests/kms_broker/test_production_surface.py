"""The production surface: what `kms-broker serve` and the production package expose.

- Test-only enrolment (``EnrolTestNode``) exists only in the test composition of the server
  (tests/kms_broker/testing_server.py): the production package and proto do not contain it,
  and `kms-broker serve` answers UNIMPLEMENTED for it even when its configuration loads the
  trusting test verifier (the old guard was that verifier's name).
- `kms-broker serve` refuses ``hsm.backend: fake`` unless ``--dev-insecure-fake-hsm`` is given.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import yaml

from kms_broker.rpc import open_channel
from tests.kms_broker._proto.kmsbroker.testing.v1 import testing_pb2 as tpb
from tests.kms_broker._proto.kmsbroker.testing.v1 import testing_pb2_grpc as tpb_grpc
from tests.kms_broker.conftest import PRODUCTION_SERVER, REPO, TEST_SERVER, start_broker

pytestmark = pytest.mark.integration
TEST_ONLY_NAMES = ("EnrolTestNode", "enrol_test_node", "enrol-test", "kmsbroker.testing")


def _files(*roots: Path) -> list[Path]:
    return [p for root in roots for p in root.rglob("*")
            if p.is_file() and p.suffix in (".py", ".pyi", ".proto") and
            "__pycache__" not in p.parts]


def test_production_package_and_proto_hold_no_test_only_api() -> None:
    files = _files(REPO / "kms_broker", REPO / "protos")
    assert any(p.name == "broker_pb2_grpc.py" for p in files)
    offenders = [(str(p.relative_to(REPO)), name) for p in files
                 for name in TEST_ONLY_NAMES if name in p.read_text()]
    assert offenders == []


def _enrol_test_node(broker, node_id: str) -> None:  # type: ignore[no-untyped-def]
    channel = open_channel(broker.endpoint("operator", "ops"))
    try:
        tpb_grpc.TestEnrolmentServiceStub(channel).EnrolTestNode(
            tpb.EnrolTestNodeRequest(node_id=node_id), timeout=30)
    finally:
        channel.close()


@pytest.fixture(scope="module")
def brokers(tmp_path_factory, pki, softhsm_config):  # type: ignore[no-untyped-def]
    """The same trusting configuration under `kms-broker serve` and the test composition."""
    root = tmp_path_factory.mktemp("surface")
    started = [start_broker(root, pki, softhsm_config, name=name, server=server)
               for name, server in (("prod", PRODUCTION_SERVER), ("test", TEST_SERVER))]
    yield dict(zip(("prod", "test"), started, strict=True))
    for b in started:
        b.stop()


def test_kms_broker_serve_does_not_expose_test_enrolment(brokers) -> None:
    prod = brokers["prod"]
    with pytest.raises(grpc.RpcError) as err:
        _enrol_test_node(prod, "direct")
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    with prod.db() as db:
        assert db.execute("SELECT COUNT(*) FROM nodes").fetchone()[0] == 0
    assert not any(r["event"] == "enrol_test_node" for r in prod.audit())


def test_the_test_composition_serves_it(brokers) -> None:
    """Control: the same call and configuration work where the test service is composed."""
    test = brokers["test"]
    _enrol_test_node(test, "direct")
    with test.db() as db:
        assert db.execute("SELECT node_id FROM nodes").fetchall() == [("direct",)]


def test_cli_has_no_test_enrolment_command() -> None:
    out = subprocess.run([sys.executable, "-m", "kms_broker.cli", "node", "enrol-test", "n1",
                          "--broker", "127.0.0.1:1"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 2
    assert "invalid choice: 'enrol-test'" in out.stderr


def _fake_config(tmp_path: Path, pki) -> Path:  # type: ignore[no-untyped-def]
    cfg = tmp_path / "fake.yaml"
    cfg.write_text(yaml.safe_dump({
        "broker_id": "fake", "listen": "127.0.0.1:0", "state_dir": str(tmp_path / "state"),
        "tls": {"ca": str(pki.ca_path), "cert": str(pki.root / "broker-b.pem"),
                "key": str(pki.root / "broker-b.key")},
        "hsm": {"backend": "fake"},
        "verifiers": ["tests.kms_broker.verifiers:JsonClaimsVerifier"],
    }))
    return cfg


def test_serve_refuses_the_fake_hsm(tmp_path: Path, pki) -> None:  # type: ignore[no-untyped-def]
    out = subprocess.run([sys.executable, "-m", "kms_broker.cli", "serve", "--config",
                          str(_fake_config(tmp_path, pki))],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert "hsm.backend: fake" in out.stderr and "not a custody boundary" in out.stderr
    assert "--dev-insecure-fake-hsm" in out.stderr
    assert not (tmp_path / "state").exists()  # refused before anything was created


def test_serve_runs_the_fake_hsm_only_with_the_dev_flag(tmp_path: Path,  # type: ignore[no-untyped-def]
                                                        pki) -> None:
    log = tmp_path / "serve.log"
    proc = subprocess.Popen([sys.executable, "-m", "kms_broker.cli", "serve", "--config",
                             str(_fake_config(tmp_path, pki)), "--dev-insecure-fake-hsm"],
                            cwd=REPO, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    port_file = tmp_path / "state" / "broker.port"
    try:
        deadline = time.monotonic() + 120  # start-up guard, not a timing assertion
        while not port_file.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert port_file.exists(), log.read_text()
        assert "NOT a custody boundary" in log.read_text()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
