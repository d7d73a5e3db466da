"""One evidence for several sessions (``AttestRequest.report_data_set``), on both kinds of
evidence: a broker accepts evidence over the combined report data only when its own session's
report data is in the set, and the set's size and items are checked before anything is used."""

from __future__ import annotations

import grpc
import pytest

from attest.interface import MAX_REPORT_DATA_SET, combined_report_data, expected_report_data
from kms_broker import sealing
from kms_broker._proto.kmsbroker.v1 import broker_pb2 as pb
from tests.kms_broker.conftest import World, make_world
from tests.kms_broker.evidence import every_evidence  # noqa: F401 - fixture

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def world(broker_factory, tmp_path_factory) -> World:
    return make_world(broker_factory("rdset"), tmp_path_factory.mktemp("rdset"))


def _session(world: World):  # type: ignore[no-untyped-def]
    stub = world.broker.node_stub("n1")
    ch = stub.Challenge(pb.ChallengeRequest(node_id="n1", job_id=world.job_id), timeout=10)
    _, pub = sealing.generate_node_key()
    return stub, ch, pub, expected_report_data(ch.nonce, ch.session_id, pub)


def _attest(world: World, items: list[bytes], *, quoted: list[bytes] | None = None):  # type: ignore[no-untyped-def]
    stub, ch, pub, own = _session(world)
    items = [own if i == b"OWN" else i for i in items]
    quoted = items if quoted is None else quoted
    kind, payload = world.broker.evidence("n1")(combined_report_data(quoted))
    return stub.Attest(pb.AttestRequest(
        node_id="n1", session_id=ch.session_id, node_public_key=pub,
        evidence=pb.Evidence(kind=kind, payload=payload), report_data_set=items), timeout=30)


def test_evidence_over_a_set_holding_this_session_is_accepted(world: World) -> None:
    other = bytes(range(32))  # another broker's (or rank's) session: opaque to this broker
    assert _attest(world, [other, b"OWN"]).token


def test_a_set_without_this_session_is_denied(world: World) -> None:
    others = [bytes([i]) * 32 for i in range(3)]
    with pytest.raises(grpc.RpcError) as err:
        _attest(world, others)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "evidence.report_data_set" in err.value.details()
    denied = [r for r in world.broker.audit() if r["outcome"] == "denied"]
    assert denied and "evidence.report_data_set" in denied[-1]["reason"]


def test_evidence_over_another_set_fails_the_binding(world: World) -> None:
    other = bytes(range(32))
    with pytest.raises(grpc.RpcError) as err:
        _attest(world, [other, b"OWN"], quoted=[other])  # the quote does not cover the set
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert world.broker.binding_failure in err.value.details()


def test_bad_sets_are_refused_before_the_session_is_used(world: World) -> None:
    stub, ch, pub, own = _session(world)
    kind, payload = world.broker.evidence("n1")(own)
    for items, code in (([own, b"short"], grpc.StatusCode.INVALID_ARGUMENT),
                        ([own] * (MAX_REPORT_DATA_SET + 1), grpc.StatusCode.RESOURCE_EXHAUSTED)):
        with pytest.raises(grpc.RpcError) as err:
            stub.Attest(pb.AttestRequest(
                node_id="n1", session_id=ch.session_id, node_public_key=pub,
                evidence=pb.Evidence(kind=kind, payload=payload), report_data_set=items),
                timeout=30)
        assert err.value.code() == code, err.value.details()
    # the session was not consumed: the plain form still attests with it
    assert stub.Attest(pb.AttestRequest(
        node_id="n1", session_id=ch.session_id, node_public_key=pub,
        evidence=pb.Evidence(kind=kind, payload=payload)), timeout=30).token
