"""Must-show 6: malformed, oversized and unauthenticated requests get the right status codes,
change nothing, and a valid request right after succeeds."""

from __future__ import annotations

import hashlib

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from attest.interface import expected_report_data
from kms_broker import sealing
from kms_broker._proto.kmsbroker.v1 import broker_pb2 as pb
from kms_broker._proto.kmsbroker.v1 import broker_pb2_grpc as pb_grpc
from tests.kms_broker.conftest import World, make_world
from tests.kms_broker.evidence import every_evidence  # noqa: F401 - fixture

pytestmark = pytest.mark.integration

C = grpc.StatusCode


@pytest.fixture(scope="module")
def world(broker_factory, tmp_path_factory) -> World:
    return make_world(broker_factory("bad"), tmp_path_factory.mktemp("bad"))


def _snapshot(world: World) -> str:
    """Digest of every table except sessions (each Challenge legitimately adds one)."""
    h = hashlib.sha256()
    with world.broker.db() as db:
        tables = [r[0] for r in db.execute(
            "SELECT name FROM sqlite_master WHERE type='table' ORDER BY name")]
        for t in tables:
            if t == "sessions":
                continue
            for row in db.execute(f"SELECT * FROM {t} ORDER BY 1"):
                h.update(repr((t, row)).encode())
    return h.hexdigest()


def _stub(world: World, cls, role: str, ident: str):
    from kms_broker.rpc import open_channel

    return cls(open_channel(world.broker.endpoint(role, ident)))


def _session(world: World) -> tuple[pb.ChallengeResponse, bytes, bytes]:
    ch = world.broker.node_stub("n1").Challenge(
        pb.ChallengeRequest(node_id="n1", job_id=world.job_id), timeout=10)
    _, pub = sealing.generate_node_key()
    return ch, pub, expected_report_data(ch.nonce, ch.session_id, pub)


def _cases(world: World):
    node = world.broker.node_stub("n1")
    tenant = _stub(world, pb_grpc.TenantServiceStub, "tenant", "acme")
    node_as_tenant = _stub(world, pb_grpc.TenantServiceStub, "node", "n1")
    nobody = _stub(world, pb_grpc.NodeServiceStub, "node", "nobody")
    operator_as_node = _stub(world, pb_grpc.OperatorServiceStub, "node", "n1")
    ch, pub, rd = _session(world)
    kind, payload = world.broker.evidence("n1")(rd)
    ev = pb.Evidence(kind=kind, payload=payload)

    def attest(**kw):
        fields = {"node_id": "n1", "session_id": ch.session_id, "evidence": ev,
                  "node_public_key": pub, **kw}
        return lambda: node.Attest(pb.AttestRequest(**fields), timeout=10)

    def release(**kw):
        fields = {"node_id": "n1", "token": b"\x00\x10" + b"x" * 80, "tenant_id": "acme",
                  "dataset_id": "ds1", "key_version": 1, **kw}
        return lambda: node.Release(pb.ReleaseRequest(**fields), timeout=10)

    return [
        # malformed
        ("bad node key", C.INVALID_ARGUMENT, attest(node_public_key=b"\x04short")),
        ("key not on curve", C.INVALID_ARGUMENT, attest(node_public_key=b"\x04" + b"\x01" * 64)),
        ("unknown evidence kind", C.INVALID_ARGUMENT,
         attest(evidence=pb.Evidence(kind="nope", payload=b"x"))),
        ("malformed evidence", C.INVALID_ARGUMENT,
         attest(evidence=pb.Evidence(kind=kind, payload=b"{not json"))),
        ("bad session id", C.INVALID_ARGUMENT, attest(session_id="../../etc")),
        ("key version 0", C.INVALID_ARGUMENT, release(key_version=0)),
        ("bad dataset id", C.INVALID_ARGUMENT, release(dataset_id="a/b")),
        ("bad job id", C.INVALID_ARGUMENT,
         lambda: node.Challenge(pb.ChallengeRequest(node_id="n1", job_id=""), timeout=10)),
        ("garbage grant", C.INVALID_ARGUMENT, lambda: tenant.CreateGrant(
            pb.CreateGrantRequest(tenant_id="acme", grant=b"{}", signature=b"s" * 64),
            timeout=10)),
        ("bad policy", C.INVALID_ARGUMENT, lambda: tenant.PutPolicy(
            pb.PutPolicyRequest(tenant_id="acme", policy_yaml="rules: [[["), timeout=10)),
        ("bad share split", C.INVALID_ARGUMENT, lambda: tenant.OpenUpload(
            pb.OpenUploadRequest(tenant_id="acme", dataset_id="x", key_version=1,
                                 share_index=5, share_count=99), timeout=10)),
        ("short tenant key", C.INVALID_ARGUMENT, lambda: tenant.RegisterTenant(
            pb.RegisterTenantRequest(tenant_id="acme", signing_public_key=b"k" * 5),
            timeout=10)),
        ("unknown session", C.NOT_FOUND, attest(session_id="0" * 32)),
        ("unknown dataset", C.NOT_FOUND, lambda: tenant.DeleteDataset(
            pb.DeleteDatasetRequest(tenant_id="acme", dataset_id="missing"), timeout=10)),
        # oversized
        ("evidence over the domain limit", C.RESOURCE_EXHAUSTED,
         attest(evidence=pb.Evidence(kind=kind, payload=b"x" * ((1 << 20) + 1)))),
        ("message over the transport limit", C.RESOURCE_EXHAUSTED,
         attest(evidence=pb.Evidence(kind=kind, payload=b"x" * (3 << 20)))),
        ("policy too large", C.RESOURCE_EXHAUSTED, lambda: tenant.PutPolicy(
            pb.PutPolicyRequest(tenant_id="acme", policy_yaml="#" * (65 << 10)), timeout=10)),
        ("sealed share too large", C.RESOURCE_EXHAUSTED, lambda: tenant.CommitShare(
            pb.CommitShareRequest(tenant_id="acme", upload_id="u1", sealed_share=b"s" * 1000),
            timeout=10)),
        # unauthenticated
        ("garbage token", C.UNAUTHENTICATED, release()),
        ("node id differs from certificate", C.UNAUTHENTICATED,
         lambda: node.Challenge(pb.ChallengeRequest(node_id="n2", job_id="j"), timeout=10)),
        ("tenant id differs from certificate", C.UNAUTHENTICATED, lambda: tenant.ShredTenant(
            pb.ShredTenantRequest(tenant_id="beta"), timeout=10)),
        ("node certificate on tenant service", C.UNAUTHENTICATED,
         lambda: node_as_tenant.ShredTenant(pb.ShredTenantRequest(tenant_id="n1"), timeout=10)),
        ("node certificate on operator service", C.UNAUTHENTICATED,
         lambda: operator_as_node.RevokeNode(pb.RevokeNodeRequest(node_id="n1"), timeout=10)),
        ("certificate naming no identity", C.UNAUTHENTICATED, lambda: nobody.Challenge(
            pb.ChallengeRequest(node_id="nobody", job_id="j"), timeout=10)),
    ]


def _no_client_cert(world: World):
    creds = grpc.ssl_channel_credentials(root_certificates=world.broker.pki.ca_path.read_bytes())
    channel = grpc.secure_channel(world.broker.address, creds,
                                  options=[("grpc.ssl_target_name_override", "localhost")])
    return pb_grpc.NodeServiceStub(channel)


def test_bad_requests_get_the_right_codes_and_change_nothing(world: World) -> None:
    before = _snapshot(world)
    audit_before = len(world.broker.actions())
    results = {}
    for name, expected, call in _cases(world):
        with pytest.raises(grpc.RpcError) as info:
            call()
        results[name] = (info.value.code(), expected, info.value.details())
    wrong = {n: (got, exp, d) for n, (got, exp, d) in results.items() if got != exp}
    assert wrong == {}
    assert all(d and "internal" not in d.lower() for _, _, d in results.values())
    with pytest.raises(grpc.RpcError) as info:
        _no_client_cert(world).Challenge(pb.ChallengeRequest(node_id="n1", job_id="j"),
                                         timeout=10)
    assert info.value.code() == C.UNAVAILABLE  # the TLS handshake refuses the connection
    assert _snapshot(world) == before
    # audited as denials: the malformed evidence, and the refusals naming an unknown session
    # and a garbage token (every refusal at attest and release is audited); malformed,
    # oversized and unauthenticated-peer requests write nothing
    # (signed checkpoints are written on a timer, whenever anything was appended: not counted)
    new = world.broker.actions()[audit_before:]
    assert [(r["event"], r["outcome"]) for r in new] == [
        ("attest", "denied"), ("attest", "denied"), ("release", "denied")]
    assert "NotFound" in new[1]["reason"] and "Unauthenticated" in new[2]["reason"]
    # the server keeps serving: health and a full valid release right after
    health = health_pb2_grpc.HealthStub(_health_channel(world))
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == \
        health_pb2.HealthCheckResponse.SERVING
    with world.broker.key_client("n1", world.job_id) as client:
        client.fetch_dek(tenant_id="acme", dataset_id="ds1", key_version=1).dek.zeroize()
    assert world.broker.proc.poll() is None


def _health_channel(world: World):
    from kms_broker.rpc import open_channel

    return open_channel(world.broker.endpoint("node", "n1"))
