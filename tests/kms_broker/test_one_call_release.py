"""The one-call release (an Attest that carries a ReleaseTarget) against a real broker
subprocess (both evidence kinds: the test composition, and ``kms-broker serve`` verifying swtpm
quotes), side by side with DESIGN.md's three calls, which keep working.

What it must keep: the same checks as Attest then Release (a passing attestation and every
release check), each audited under its own event; no token issued (nothing to replay); bad
release parameters refused before the session's nonce is spent; a denied release after a
passing attestation spends the nonce and leaves no lease."""

from __future__ import annotations

import grpc
import pytest

from attest.interface import expected_report_data
from kms_broker import sealing
from kms_broker._proto.kmsbroker.v1 import broker_pb2 as pb
from sealed import derive_dek
from sealed.secrets import SecretBuffer
from tests.kms_broker.conftest import World, make_world
from tests.kms_broker.evidence import every_evidence  # noqa: F401 - fixture

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def world(broker_factory, tmp_path_factory) -> World:
    return make_world(broker_factory("one-call"), tmp_path_factory.mktemp("one-call"),
                      nodes=("n1", "n2"))


def _expected_dek(world: World) -> SecretBuffer:
    return derive_dek([SecretBuffer.from_bytes(s) for s in world.shares],
                      tenant_id=world.tenant_id, dataset_id=world.dataset_id, key_version=1)


def _request(world: World, stub, node: str, target: pb.ReleaseTarget | None):
    ch = stub.Challenge(pb.ChallengeRequest(node_id=node, job_id=world.job_id), timeout=30)
    private, pub = sealing.generate_node_key()
    kind, payload = world.broker.evidence(node)(
        expected_report_data(ch.nonce, ch.session_id, pub))
    request = pb.AttestRequest(node_id=node, session_id=ch.session_id,
                               evidence=pb.Evidence(kind=kind, payload=payload),
                               node_public_key=pub, release=target)
    return request, ch, private, pub


def _leases(world: World) -> int:
    with world.broker.db() as db:
        return db.execute("SELECT COUNT(*) FROM leases").fetchone()[0]


def test_fetch_dek_releases_in_one_call_per_broker(world: World) -> None:
    before = len(world.broker.actions())
    with world.broker.key_client("n1", world.job_id) as client:
        released = client.fetch_dek(tenant_id=world.tenant_id, dataset_id=world.dataset_id,
                                    key_version=1)
    with released.dek as dek, _expected_dek(world) as expected:
        assert dek.equals(expected)
    assert len(released.leases) == 1 and released.leases[0].lease_id
    address = released.leases[0].broker
    assert [name for name, _ in released.timings] == [
        "challenge", "evidence", f"attest+release {address}", f"open {address}", "derive"]
    # both steps audited under their own event, the attestation first
    events = [(r["event"], r["outcome"]) for r in world.broker.actions()[before:]]
    assert events == [("attest", "allowed"), ("release", "allowed")], events


def test_the_three_call_flow_still_releases(world: World) -> None:
    from kms_broker.client import KeyClient

    with KeyClient([world.broker.endpoint("node", "n1")], node_id="n1", job_id=world.job_id,
                   evidence_for=world.broker.evidence("n1"),
                   one_call_release=False) as client:
        released = client.fetch_dek(tenant_id=world.tenant_id, dataset_id=world.dataset_id,
                                    key_version=1)
        with released.dek as dek, _expected_dek(world) as expected:
            assert dek.equals(expected)
        address = released.leases[0].broker
        assert [name for name, _ in released.timings] == [
            "challenge", "evidence", f"attest {address}", f"release {address}", "derive"]
        assert client.renew() > 0  # renewal attests afresh for a token, in either flow


def test_one_call_answer_carries_the_share_and_no_token(world: World) -> None:
    stub = world.broker.node_stub("n1")
    target = pb.ReleaseTarget(tenant_id=world.tenant_id, dataset_id=world.dataset_id,
                              key_version=1)
    request, ch, private, pub = _request(world, stub, "n1", target)
    reply = stub.Attest(request, timeout=30)
    assert reply.allowed and reply.token == b"" and reply.HasField("release")
    assert reply.rules and all(r.passed for r in reply.rules)
    transcript = sealing.release_transcript(
        session_id=ch.session_id, nonce=ch.nonce, tenant_id=world.tenant_id,
        dataset_id=world.dataset_id, key_version=1, broker_id=ch.broker_id,
        node_public_key=pub)
    assert reply.release.transcript == transcript
    with sealing.open_sealed_share(private, reply.release.sealed_share, transcript) as share, \
            share.view() as v:
        assert bytes(v) == world.shares[reply.release.share_index]
    # the session is spent: the same request again is a reused nonce, audited
    with pytest.raises(grpc.RpcError) as info:
        stub.Attest(request, timeout=30)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "nonce.reused" in info.value.details()


def test_a_bad_release_target_changes_nothing(world: World) -> None:
    stub = world.broker.node_stub("n1")
    bad = pb.ReleaseTarget(tenant_id=world.tenant_id, dataset_id=world.dataset_id,
                           key_version=0)
    request, *_ = _request(world, stub, "n1", bad)
    audited, leases = len(world.broker.actions()), _leases(world)
    with pytest.raises(grpc.RpcError) as info:
        stub.Attest(request, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "key_version" in info.value.details()
    assert len(world.broker.actions()) == audited and _leases(world) == leases
    # the nonce was not spent: the same session still attests (for a token, three-call)
    request.ClearField("release")
    assert stub.Attest(request, timeout=30).token


def test_a_denied_release_after_a_passing_attestation(world: World) -> None:
    stub = world.broker.node_stub("n2")
    nowhere = pb.ReleaseTarget(tenant_id=world.tenant_id, dataset_id="no-such-dataset",
                               key_version=1)
    request, *_ = _request(world, stub, "n2", nowhere)
    audited, leases = len(world.broker.actions()), _leases(world)
    with pytest.raises(grpc.RpcError) as info:
        stub.Attest(request, timeout=30)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert "no-such-dataset" in info.value.details()
    events = [(r["event"], r["outcome"]) for r in world.broker.actions()[audited:]]
    assert events == [("attest", "allowed"), ("release", "denied")], events
    assert _leases(world) == leases
    with pytest.raises(grpc.RpcError) as again:  # the attestation spent the nonce
        request.ClearField("release")
        stub.Attest(request, timeout=30)
    assert "nonce.reused" in again.value.details()


def test_a_failed_attestation_releases_nothing(world: World) -> None:
    stub = world.broker.node_stub("n1")
    target = pb.ReleaseTarget(tenant_id=world.tenant_id, dataset_id=world.dataset_id,
                              key_version=1)
    ch = stub.Challenge(pb.ChallengeRequest(node_id="n1", job_id=world.job_id), timeout=30)
    _, pub = sealing.generate_node_key()
    _, other = sealing.generate_node_key()
    # evidence bound to another key than the one the share would be sealed to
    kind, payload = world.broker.evidence("n1")(
        expected_report_data(ch.nonce, ch.session_id, other))
    audited, leases = len(world.broker.actions()), _leases(world)
    with pytest.raises(grpc.RpcError) as info:
        stub.Attest(pb.AttestRequest(node_id="n1", session_id=ch.session_id,
                                     evidence=pb.Evidence(kind=kind, payload=payload),
                                     node_public_key=pub, release=target), timeout=30)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert world.broker.binding_failure in info.value.details()
    events = [(r["event"], r["outcome"]) for r in world.broker.actions()[audited:]]
    assert events == [("attest", "denied")], events
    assert _leases(world) == leases


def test_a_broker_that_ignores_the_release_field_gets_a_release_call(world: World,
                                                                      monkeypatch) -> None:
    """A broker from before the releasing Attest drops the unknown field and answers with a
    token: the client then releases with that token (Release), as in the three-call flow."""
    from kms_broker.client import KeyClient

    sent: list[str] = []
    real_call = KeyClient._call

    def as_an_old_broker(self, broker, method, request, **kwargs):  # type: ignore[no-untyped-def]
        if method == "Attest":
            request.ClearField("release")  # what an old broker's parser would see
        sent.append(method)
        return real_call(self, broker, method, request, **kwargs)

    monkeypatch.setattr(KeyClient, "_call", as_an_old_broker)
    with world.broker.key_client("n1", world.job_id) as client:
        released = client.fetch_dek(tenant_id=world.tenant_id, dataset_id=world.dataset_id,
                                    key_version=1)
    with released.dek as dek, _expected_dek(world) as expected:
        assert dek.equals(expected)
    assert sent == ["Challenge", "Attest", "Release"]
    address = released.leases[0].broker
    assert [name for name, _ in released.timings] == [
        "challenge", "evidence", f"attest {address}", f"release {address}", "derive"]
