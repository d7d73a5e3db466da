"""Must-show 2: every denial is PERMISSION_DENIED with a readable reason, and audited."""

from __future__ import annotations

import sqlite3
import time

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from attest.interface import expected_report_data
from kms_broker import sealing
from kms_broker._proto.kmsbroker.v1 import broker_pb2 as pb
from kms_broker.grants import GrantDocument, sign_grant
from kms_broker.rpc import PermissionDeniedError
from kms_broker.tenant import upload_dataset
from tests.kms_broker.conftest import World, enrol, make_world, records
from tests.kms_broker.evidence import every_evidence  # noqa: F401 - fixture
from tests.kms_broker.verifiers import POLICY_YAML

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def world(broker_factory, tmp_path_factory) -> World:
    w = make_world(broker_factory("deny"), tmp_path_factory.mktemp("deny"),
                   nodes=("n1", "n2"))
    with w.broker.tenant("acme") as acme:
        upload_dataset([acme], records(3), w.store, dataset_id="ds2")
    return w


def denied(world: World, node: str, job: str, *, tenant: str = "acme",
           dataset: str = "ds1", evidence_for=None) -> PermissionDeniedError:
    with world.broker.key_client(node, job, evidence_for) as client, \
            pytest.raises(PermissionDeniedError) as info:
        client.fetch_dek(tenant_id=tenant, dataset_id=dataset, key_version=1)
    return info.value


def assert_audited(world: World, rule: str) -> None:
    denials = [r for r in world.broker.audit() if r["outcome"] == "denied"]
    assert denials and rule in denials[-1]["reason"], denials[-1:] or "no denial audited"


def test_no_grant(world: World) -> None:
    err = denied(world, "n1", "job-without-grant")
    assert "grant.missing" in str(err) and "job-without-grant" in str(err)
    assert_audited(world, "grant.missing")


def test_expired_grant(world: World) -> None:
    with world.broker.tenant("acme") as acme:
        world.grant(acme, grant_id="g-expiring", job_id="job-exp", ttl_ms=1500)
    time.sleep(1.6)
    err = denied(world, "n1", "job-exp")
    assert "grant.expired" in str(err)
    assert [r.name for r in err.failed_rules] == ["grant.expired"]
    assert_audited(world, "grant.expired")


def test_grant_for_another_dataset(world: World) -> None:
    with world.broker.tenant("acme") as acme:
        world.grant(acme, grant_id="g-ds2", dataset_id="ds2", job_id="job-ds2")
    err = denied(world, "n1", "job-ds2", dataset="ds1")
    assert "grant.missing" in str(err) and "acme/ds1" in str(err)
    assert_audited(world, "grant.missing")


def test_grant_signed_by_another_tenant(world: World) -> None:
    doc = GrantDocument(grant_id="g-forged", tenant_id="acme", dataset_id="ds1",
                        job_id="job-forged", policy_digest=world.policy_digest, max_nodes=1,
                        expires_unix_ms=int(time.time() * 1000) + 3_600_000)
    document, signature = sign_grant(doc, Ed25519PrivateKey.generate())
    with world.broker.tenant("acme") as acme, pytest.raises(PermissionDeniedError) as info:
        acme.submit_grant(document, signature)
    assert "grant.signature" in str(info.value)
    assert_audited(world, "grant.signature")
    # a forged grant written straight into the DB is refused at release as well
    with world.broker.db() as db:
        db.execute("INSERT INTO grants VALUES (?,?,?,?,?,?,?,?,?,?)",
                   ("g-forged", "acme", "ds1", "job-forged", world.policy_digest, 1,
                    doc.expires_unix_ms, 0, document, signature))
    err = denied(world, "n1", "job-forged")
    assert "grant.signature" in str(err)
    assert_audited(world, "grant.signature")


def test_tenant_b_dataset_through_tenant_a_job(world: World) -> None:
    with world.broker.tenant("beta") as beta:
        beta.register()
        upload_dataset([beta], records(3), world.store, dataset_id="secret")
        beta.put_policy(POLICY_YAML)
    err = denied(world, "n1", world.job_id, tenant="beta", dataset="secret")
    assert "grant.missing" in str(err) and "beta/secret" in str(err)
    assert_audited(world, "grant.missing")
    enrol(world.broker, "n3", tenant_scope="acme")
    err = denied(world, "n3", world.job_id, tenant="beta", dataset="secret")
    assert "node.scope" in str(err)
    assert_audited(world, "node.scope")


def _attest_request(stub, node: str, job: str, evidence_for, *,
                    bind_key: bytes | None = None):
    ch = stub.Challenge(pb.ChallengeRequest(node_id=node, job_id=job), timeout=10)
    _, pub = sealing.generate_node_key()
    kind, payload = evidence_for(expected_report_data(ch.nonce, ch.session_id,
                                                      bind_key or pub))
    return pb.AttestRequest(node_id=node, session_id=ch.session_id,
                            evidence=pb.Evidence(kind=kind, payload=payload),
                            node_public_key=pub)


def test_reused_nonce(world: World) -> None:
    stub = world.broker.node_stub("n1")
    request = _attest_request(stub, "n1", world.job_id, world.broker.evidence("n1"))
    assert stub.Attest(request, timeout=10).token
    with pytest.raises(grpc.RpcError) as info:
        stub.Attest(request, timeout=10)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "nonce.reused" in info.value.details()
    assert_audited(world, "nonce.reused")


def test_expired_session(broker_factory, tmp_path_factory) -> None:
    short = make_world(broker_factory("short-session", ttl_ms={"session": 300}),
                       tmp_path_factory.mktemp("short"))
    stub = short.broker.node_stub("n1")
    request = _attest_request(stub, "n1", short.job_id, short.broker.evidence("n1"))
    time.sleep(0.4)
    with pytest.raises(grpc.RpcError) as info:
        stub.Attest(request, timeout=10)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "session.expired" in info.value.details()
    assert_audited(short, "session.expired")


def test_evidence_bound_to_another_node_key(world: World) -> None:
    _, other_pub = sealing.generate_node_key()
    stub = world.broker.node_stub("n1")
    with pytest.raises(grpc.RpcError) as info:
        stub.Attest(_attest_request(stub, "n1", world.job_id, world.broker.evidence("n1"),
                                    bind_key=other_pub), timeout=10)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert world.broker.binding_failure in info.value.details()
    assert "not bound" in info.value.details() or "not the expected nonce" in \
        info.value.details()
    assert_audited(world, world.broker.binding_failure)


def test_policy_failure_lists_rules(world: World) -> None:
    ksm_on = world.broker.evidence("n1", {"node.ksm.enabled": True,
                                          "node.swap.enabled": False})
    err = denied(world, "n1", world.job_id, evidence_for=ksm_on)
    by_name = {r.name: r for r in err.rules}
    assert by_name["ksm-off"].passed is False and "KSM" in by_name["ksm-off"].reason
    assert by_name["swap-off"].passed is True
    assert_audited(world, "ksm-off")


def test_revoked_node(world: World) -> None:
    enrol(world.broker, "n2")
    world.broker.operator().RevokeNode(pb.RevokeNodeRequest(node_id="n2"), timeout=10)
    err = denied(world, "n2", world.job_id)
    assert "node.revoked" in str(err)
    assert_audited(world, "node.revoked")


def test_revoked_grant_ends_leases_and_is_pushed(world: World) -> None:
    with world.broker.tenant("acme") as acme:
        world.grant(acme, grant_id="g-rev", job_id="job-rev")
    notices = []
    with world.broker.key_client("n1", "job-rev") as client:
        client.watch_revocations(notices.append)
        released = client.fetch_dek(tenant_id="acme", dataset_id="ds1", key_version=1)
        released.dek.zeroize()
        assert client.renew() > 0
        deadline = time.monotonic() + 120  # hang guard for both waits, not a timing check
        while not client.watching() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert client.watching()
        with world.broker.tenant("acme") as acme:
            assert acme.revoke_grant("g-rev") == 1
        while not notices and time.monotonic() < deadline:
            time.sleep(0.02)
        assert notices, "the revocation was not pushed"
        assert notices[0].lease_id == released.leases[0].lease_id
        assert "g-rev" in notices[0].reason
        with pytest.raises(PermissionDeniedError) as info:
            client.renew()
        assert "lease.revoked" in str(info.value)
    err = denied(world, "n1", "job-rev")
    assert "grant.revoked" in str(err)
    assert_audited(world, "grant.revoked")


def test_denials_changed_no_lease(world: World) -> None:
    with sqlite3.connect(world.broker.state_dir / "broker.db") as db:
        jobs = {r[0] for r in db.execute(
            "SELECT g.job_id FROM leases l JOIN grants g ON l.grant_id = g.grant_id")}
    assert jobs <= {world.job_id, "job-rev"}
