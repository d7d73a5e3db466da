"""Issue 11, request path: one validation layer before the handlers (items 3), session
binding (5), sticky revocation (7), grant identity and per-tenant grant ids (2, 8), and every
refusal in the audit log. A real broker subprocess on SoftHSM, over mTLS."""

from __future__ import annotations

import subprocess
import sys
import time

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from attest.interface import expected_report_data
from kms_broker import sealing
from kms_broker._proto.kmsbroker.v1 import broker_pb2 as pb
from kms_broker._proto.kmsbroker.v1 import broker_pb2_grpc as pb_grpc
from kms_broker.grants import GrantDocument, sign_grant
from kms_broker.rpc import BrokerRpcError, PermissionDeniedError, open_channel
from kms_broker.tenant import upload_dataset
from tests.kms_broker.conftest import REPO, World, enrol, make_world, records
from tests.kms_broker.verifiers import POLICY_YAML, make_evidence

pytestmark = pytest.mark.integration

C = grpc.StatusCode


@pytest.fixture(scope="module")
def world(broker_factory, tmp_path_factory) -> World:
    return make_world(broker_factory("reqpath"), tmp_path_factory.mktemp("reqpath"),
                      nodes=("n1", "n2"))


def _raw(world: World, role: str, ident: str, method: str, data: bytes) -> grpc.RpcError:
    """Send ``data`` as the request bytes of ``method``, unparsed by the client."""
    call = open_channel(world.broker.endpoint(role, ident)).unary_unary(method)
    with pytest.raises(grpc.RpcError) as info:
        call(data, timeout=10)
    return info.value


def _audit_since(world: World, n: int) -> list[dict]:
    return world.broker.audit()[n:]


# ------------------------------------------------------------ item 3: bad input
def test_undecodable_protobuf_and_invalid_utf8_are_invalid_argument(world: World) -> None:
    cases = {
        # field 1 (node_id, a string) holding bytes that are not UTF-8
        "invalid utf-8": ("/kmsbroker.v1.NodeService/Challenge", b"\x0a\x02\xff\xfe"),
        # a length-delimited field running past the end of the message
        "truncated": ("/kmsbroker.v1.NodeService/Challenge", b"\x0a\x7fn1"),
        "garbage wire type": ("/kmsbroker.v1.NodeService/Release", b"\xff\xff\xff\xff"),
    }
    for name, (method, data) in cases.items():
        err = _raw(world, "node", "n1", method, data)
        assert err.code() == C.INVALID_ARGUMENT, (name, err.code(), err.details())
        assert "not a valid" in err.details() and "deserializing" not in err.details()
    err = _raw(world, "tenant", "acme", "/kmsbroker.v1.TenantService/CreateGrant",
               b"\x0a\x04ac\xffe")
    assert err.code() == C.INVALID_ARGUMENT, err.details()


def test_grant_over_4_kib_is_resource_exhausted(world: World) -> None:
    stub = pb_grpc.TenantServiceStub(open_channel(world.broker.endpoint("tenant", "acme")))
    with pytest.raises(grpc.RpcError) as info:
        stub.CreateGrant(pb.CreateGrantRequest(tenant_id="acme", grant=b"{" + b" " * 5000,
                                               signature=b"s" * 64), timeout=10)
    assert info.value.code() == C.RESOURCE_EXHAUSTED, info.value.details()
    assert "4096" in info.value.details()


def test_commit_share_of_the_wrong_length_is_invalid_argument_and_audited_failed(
    world: World,
) -> None:
    stub = pb_grpc.TenantServiceStub(open_channel(world.broker.endpoint("tenant", "acme")))
    opened = stub.OpenUpload(pb.OpenUploadRequest(
        tenant_id="acme", dataset_id="ds-short", key_version=1, share_index=0, share_count=1),
        timeout=10)
    before = len(world.broker.audit())
    for wrong in (b"\x00\x41" + b"\x04" * 65 + b"w" * 39, b"x" * 50, b""):
        with pytest.raises(grpc.RpcError) as info:
            stub.CommitShare(pb.CommitShareRequest(tenant_id="acme", upload_id=opened.upload_id,
                                                   sealed_share=wrong), timeout=10)
        assert info.value.code() == C.INVALID_ARGUMENT, info.value.details()
        assert "107" in info.value.details()
    commits = [r for r in _audit_since(world, before) if r["event"] == "commit_share"]
    assert [r["outcome"] for r in commits] == ["error"] * 3
    with world.broker.db() as db:
        assert db.execute("SELECT committed FROM uploads WHERE upload_id=?",
                          (opened.upload_id,)).fetchone() == (0,)
        assert db.execute("SELECT COUNT(*) FROM dataset_shares WHERE dataset_id='ds-short'"
                          ).fetchone() == (0,)


# ------------------------------------------------------------ item 5: session binding
def test_attest_naming_another_nodes_session_does_not_burn_it(world: World) -> None:
    n1, n2 = world.broker.node_stub("n1"), world.broker.node_stub("n2")
    ch = n1.Challenge(pb.ChallengeRequest(node_id="n1", job_id=world.job_id), timeout=10)
    _, pub = sealing.generate_node_key()
    kind, payload = make_evidence(expected_report_data(ch.nonce, ch.session_id, pub))
    evidence = pb.Evidence(kind=kind, payload=payload)
    with pytest.raises(grpc.RpcError) as info:
        n2.Attest(pb.AttestRequest(node_id="n2", session_id=ch.session_id, evidence=evidence,
                                   node_public_key=pub), timeout=10)
    assert info.value.code() == C.PERMISSION_DENIED
    assert "session.node" in info.value.details()
    # the rightful node still attests with its session
    reply = n1.Attest(pb.AttestRequest(node_id="n1", session_id=ch.session_id,
                                       evidence=evidence, node_public_key=pub), timeout=10)
    assert reply.allowed and reply.token


# ------------------------------------------------------------ item 7: sticky revocation
def _cli(world: World, *args: str) -> subprocess.CompletedProcess:
    pki = world.broker.pki
    return subprocess.run(
        [sys.executable, "-m", "kms_broker.cli", *args, "--broker", world.broker.address,
         "--ca", str(pki.ca_path), "--cert", str(pki.root / "operator-ops.pem"),
         "--key", str(pki.root / "operator-ops.key"), "--server-name", "localhost"],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False)


def test_re_enrolling_a_revoked_node_needs_an_audited_reinstatement(world: World) -> None:
    enrol(world.broker, "n3")
    assert _cli(world, "node", "revoke", "n3").returncode == 0
    with pytest.raises(grpc.RpcError) as info:
        enrol(world.broker, "n3")
    assert info.value.code() == C.PERMISSION_DENIED and "node.revoked" in info.value.details()
    with world.broker.db() as db:
        assert db.execute("SELECT revoked FROM nodes WHERE node_id='n3'").fetchone() == (1,)
    with world.broker.key_client("n3", world.job_id) as client, \
            pytest.raises(PermissionDeniedError):
        client.fetch_dek(tenant_id="acme", dataset_id="ds1", key_version=1)
    # an operator reinstates it (audited); the node is still refused until it enrols again
    done = _cli(world, "node", "reinstate", "n3")
    assert done.returncode == 0, done.stderr
    assert [(r["event"], r["actor"]) for r in world.broker.audit()
            if r["event"] == "reinstate_node"] == [("reinstate_node", "operator:ops")]
    with world.broker.key_client("n3", world.job_id) as client, \
            pytest.raises(PermissionDeniedError):
        client.fetch_dek(tenant_id="acme", dataset_id="ds1", key_version=1)
    enrol(world.broker, "n3")
    with world.broker.key_client("n3", world.job_id) as client:
        client.fetch_dek(tenant_id="acme", dataset_id="ds1", key_version=1).dek.zeroize()
    # reinstating a node that is not revoked is refused
    again = _cli(world, "node", "reinstate", "n3")
    assert again.returncode != 0 and "not revoked" in again.stderr


# ------------------------------------------------------------ item 2: grant identity
def test_a_grant_row_copied_under_another_id_is_refused(world: World) -> None:
    with world.broker.tenant("acme") as acme:
        world.grant(acme, grant_id="g-solo", job_id="job-solo", max_nodes=1)
    with world.broker.key_client("n1", "job-solo") as client:
        client.fetch_dek(tenant_id="acme", dataset_id="ds1", key_version=1).dek.zeroize()
    with world.broker.db() as db:  # an attacker with the database copies the row
        db.execute("INSERT INTO grants SELECT 'g-solo-copy', tenant_id, dataset_id, job_id, "
                   "policy_digest, max_nodes, expires_ms, revoked, document, signature "
                   "FROM grants WHERE grant_id='g-solo'")
    before = len(world.broker.audit())
    with world.broker.key_client("n2", "job-solo") as client, \
            pytest.raises(PermissionDeniedError) as info:
        client.fetch_dek(tenant_id="acme", dataset_id="ds1", key_version=1)
    failed = {r.name: r.reason for r in info.value.failed_rules}
    assert "grant.signature" in failed and "g-solo-copy" in failed["grant.signature"]
    assert "lease.no_room" in failed  # the real grant's one place is n1's
    with world.broker.db() as db:
        holders = db.execute("SELECT DISTINCT node_id FROM leases WHERE grant_id LIKE 'g-solo%' "
                             "AND revoked=0").fetchall()
    assert holders == [("n1",)]
    assert any(r["outcome"] == "denied" for r in _audit_since(world, before))


def test_a_lease_moved_onto_a_copied_grant_does_not_renew_after_revocation(
    world: World,
) -> None:
    with world.broker.tenant("acme") as acme:
        world.grant(acme, grant_id="g-renew", job_id="job-renew", max_nodes=1)
    with world.broker.key_client("n2", "job-renew") as client:
        client.fetch_dek(tenant_id="acme", dataset_id="ds1", key_version=1).dek.zeroize()
        with world.broker.db() as db:
            db.execute("INSERT INTO grants SELECT 'g-renew-copy', tenant_id, dataset_id, "
                       "job_id, policy_digest, max_nodes, expires_ms, revoked, document, "
                       "signature FROM grants WHERE grant_id='g-renew'")
            db.execute("UPDATE leases SET grant_id='g-renew-copy' WHERE grant_id='g-renew'")
        with world.broker.tenant("acme") as acme:
            acme.revoke_grant("g-renew")
        with pytest.raises(PermissionDeniedError) as info:
            client.renew()
    assert "grant.signature" in str(info.value)


# ------------------------------------------------------------ item 8: grant ids per tenant
def test_grant_ids_are_scoped_per_tenant(world: World, tmp_path) -> None:
    with world.broker.tenant("beta") as beta:
        beta.register()
        upload_dataset([beta], records(3), world.store, dataset_id="beta-ds")
        digest = beta.put_policy(POLICY_YAML)
        doc = GrantDocument(grant_id=world.grant_id, tenant_id="beta", dataset_id="beta-ds",
                            job_id="beta-job", policy_digest=digest, max_nodes=1,
                            expires_unix_ms=int(time.time() * 1000) + 3_600_000)
        # acme already has a grant with this id: beta creates its own, learning nothing
        assert beta.create_grant(doc) == world.grant_id
        assert beta.revoke_grant(world.grant_id) == 0
    with world.broker.db() as db:
        rows = db.execute("SELECT tenant_id, revoked FROM grants WHERE grant_id=? "
                          "ORDER BY tenant_id", (world.grant_id,)).fetchall()
    assert rows == [("acme", 0), ("beta", 1)]  # beta's revocation left acme's grant alone
    with world.broker.key_client("n1", world.job_id) as client:
        client.fetch_dek(tenant_id="acme", dataset_id="ds1", key_version=1).dek.zeroize()


# ------------------------------------------------------------ every refusal audited
def test_refusals_at_release_renew_and_admin_are_audited(world: World) -> None:
    node = world.broker.node_stub("n1")
    before = len(world.broker.audit())
    with pytest.raises(grpc.RpcError) as info:  # UNAUTHENTICATED at release
        node.Release(pb.ReleaseRequest(node_id="n1", token=b"\x00" * 90, tenant_id="acme",
                                       dataset_id="ds1", key_version=1), timeout=10)
    assert info.value.code() == C.UNAUTHENTICATED
    with world.broker.key_client("n1", world.job_id) as client:
        client.fetch_dek(tenant_id="acme", dataset_id="ds1", key_version=1).dek.zeroize()
        with world.broker.db() as db:  # the lease is gone: NOT_FOUND at renew
            db.execute("DELETE FROM leases WHERE lease_id=?", (client.leases[0].lease_id,))
        with pytest.raises(BrokerRpcError) as err:
            client.renew()
        assert err.value.code == "NOT_FOUND"
    refusals = [(r["event"], r["reason"].split(":")[0]) for r in _audit_since(world, before)
                if r["outcome"] == "denied"]
    assert refusals == [("release", "Unauthenticated"), ("renew", "NotFound")]
    # a shredded tenant's actions are denied and audited (domain/admin.py)
    world.broker.pki.issue("tenant", "gamma")
    key = Ed25519PrivateKey.generate()
    with world.broker.tenant("gamma") as gamma:
        gamma.register()
        gamma.shred()
    before = len(world.broker.audit())
    doc, sig = sign_grant(GrantDocument(
        grant_id="gx", tenant_id="gamma", dataset_id="g-ds", job_id="j", policy_digest="0" * 64,
        max_nodes=1, expires_unix_ms=int(time.time() * 1000) + 60_000), key)
    stub = pb_grpc.TenantServiceStub(open_channel(world.broker.endpoint("tenant", "gamma")))
    for call in (
        lambda: stub.PutPolicy(pb.PutPolicyRequest(tenant_id="gamma", policy_yaml=POLICY_YAML),
                               timeout=10),
        lambda: stub.CreateGrant(pb.CreateGrantRequest(tenant_id="gamma", grant=doc,
                                                       signature=sig), timeout=10),
        lambda: stub.OpenUpload(pb.OpenUploadRequest(tenant_id="gamma", dataset_id="d",
                                                     key_version=1, share_count=1),
                                timeout=10),
    ):
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == C.PERMISSION_DENIED
    denied = [r for r in _audit_since(world, before) if r["outcome"] == "denied"]
    assert [r["event"] for r in denied] == ["put_policy", "create_grant", "open_upload"]
    assert all("tenant.shredded" in r["reason"] for r in denied)
