"""Must-show 3 (cryptographic tenant isolation) and 4, audit half (fail closed, recover)."""

from __future__ import annotations

import os
import shutil

import grpc
import pytest

from attest.interface import expected_report_data
from kms_broker import sealing
from kms_broker._proto.kmsbroker.v1 import broker_pb2 as pb
from kms_broker.rpc import DataLoss, UnavailableError
from kms_broker.tenant import upload_dataset
from tests.kms_broker.conftest import World, make_world, records
from tests.kms_broker.evidence import every_evidence  # noqa: F401 - fixture

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def world(broker_factory, tmp_path_factory) -> World:
    w = make_world(broker_factory("iso"), tmp_path_factory.mktemp("iso"))
    with w.broker.tenant("beta") as beta:
        beta.register()
        upload_dataset([beta], records(3), w.store, dataset_id="beta-ds")
    return w


def _count(world: World, sql: str) -> int:
    with world.broker.db() as db:
        return db.execute(sql).fetchone()[0]


def _token(world: World, node: str = "n1") -> bytes:
    stub = world.broker.node_stub(node)
    ch = stub.Challenge(pb.ChallengeRequest(node_id=node, job_id=world.job_id), timeout=10)
    _, pub = sealing.generate_node_key()
    kind, payload = world.broker.evidence(node)(expected_report_data(ch.nonce, ch.session_id,
                                                                     pub))
    return stub.Attest(pb.AttestRequest(node_id=node, session_id=ch.session_id,
                                        evidence=pb.Evidence(kind=kind, payload=payload),
                                        node_public_key=pub), timeout=10).token


def _release(world: World, token: bytes) -> pb.ReleaseResponse:
    return world.broker.node_stub("n1").Release(pb.ReleaseRequest(
        node_id="n1", token=token, tenant_id=world.tenant_id, dataset_id=world.dataset_id,
        key_version=1), timeout=10)


def test_copied_wrapped_share_fails_cryptographically(world: World) -> None:
    with world.broker.db() as db:
        original = db.execute("SELECT wrapped_share FROM dataset_shares WHERE tenant_id='acme' "
                              "AND dataset_id='ds1'").fetchone()[0]
        db.execute("UPDATE dataset_shares SET wrapped_share=(SELECT wrapped_share FROM "
                   "dataset_shares WHERE tenant_id='beta' AND dataset_id='beta-ds') "
                   "WHERE tenant_id='acme' AND dataset_id='ds1'")
    leases = _count(world, "SELECT COUNT(*) FROM leases")
    try:
        with world.broker.key_client("n1", world.job_id) as client, \
                pytest.raises(DataLoss) as info:
            client.fetch_dek(tenant_id="acme", dataset_id="ds1", key_version=1)
        assert info.value.code == "DATA_LOSS"
        assert "failed to authenticate" in str(info.value)
        assert _count(world, "SELECT COUNT(*) FROM leases") == leases
        last = world.broker.actions()[-1]  # (the timer's signed checkpoints skipped)
        assert last["event"] == "release" and last["outcome"] == "error"
    finally:
        with world.broker.db() as db:
            db.execute("UPDATE dataset_shares SET wrapped_share=? WHERE tenant_id='acme' AND "
                       "dataset_id='ds1'", (original,))
    with world.broker.key_client("n1", world.job_id) as client:
        client.fetch_dek(tenant_id="acme", dataset_id="ds1", key_version=1).dek.zeroize()


def test_audit_failure_blocks_release_then_recovers(world: World) -> None:
    token = _token(world)
    leases = _count(world, "SELECT COUNT(*) FROM leases")
    log = world.broker.state_dir / "audit.log"
    aside = log.with_name("audit.log.aside")
    os.rename(log, aside)
    log.mkdir()  # the log path is now unwritable as a file
    try:
        with pytest.raises(grpc.RpcError) as info:
            _release(world, token)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "audit" in info.value.details()
        assert _count(world, "SELECT COUNT(*) FROM leases") == leases
        # reading the log through the API says the same, not INTERNAL
        with world.broker.tenant("acme") as acme:
            for read in (lambda: acme.tail_audit(10), acme.verify_audit):
                with pytest.raises(UnavailableError, match="audit log unreadable"):
                    read()
    finally:
        shutil.rmtree(log)
        os.rename(aside, log)
    with world.broker.tenant("acme") as acme:
        assert acme.verify_audit().ok
    assert _release(world, token).sealed_share
    assert _count(world, "SELECT COUNT(*) FROM leases") == leases + 1
    from kms_broker.audit import verify_log

    assert verify_log(log).ok


def test_policy_text_edited_under_its_digest_is_not_used(world: World) -> None:
    """An attacker with the broker DB swaps the policy text for one that allows everything:
    the text no longer hashes to the digest the tenant signed, so no release follows."""
    with world.broker.db() as db:
        digest, original = db.execute(
            "SELECT digest, text FROM policies WHERE tenant_id='acme'").fetchone()
        permissive = ("name: open\nversion: 1\nrules:\n  - name: anything\n"
                      "    expr: 'true'\n    reason: allows every node\n")
        db.execute("UPDATE policies SET text=? WHERE tenant_id='acme' AND digest=?",
                   (permissive, digest))
    world.broker.restart()  # the broker caches checked policies; start from the DB alone
    leases = _count(world, "SELECT COUNT(*) FROM leases")
    try:
        with pytest.raises(grpc.RpcError) as info:
            _release(world, _token(world))
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "policy" in info.value.details()
        assert _count(world, "SELECT COUNT(*) FROM leases") == leases
    finally:
        with world.broker.db() as db:
            db.execute("UPDATE policies SET text=? WHERE tenant_id='acme' AND digest=?",
                       (original, digest))
        world.broker.restart()
    assert _release(world, _token(world)).sealed_share
