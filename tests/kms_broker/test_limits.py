"""Issue 11 item 1: per-identity limits. Only enrolled, unrevoked nodes may watch; streams per
node are capped and never take the whole handler pool; request rates, pending challenges and
open uploads are bounded per identity. Real broker subprocesses over mTLS."""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from kms_broker._proto.kmsbroker.v1 import broker_pb2 as pb
from kms_broker._proto.kmsbroker.v1 import broker_pb2_grpc as pb_grpc
from kms_broker.limits import HANDLER_THREADS
from kms_broker.rpc import open_channel
from tests.kms_broker.conftest import World, enrol, make_world

pytestmark = pytest.mark.integration

C = grpc.StatusCode
STREAMS = 72  # more than the broker's 64 handler threads


@pytest.fixture(scope="module")
def world(broker_factory, tmp_path_factory) -> World:
    return make_world(broker_factory("limits"), tmp_path_factory.mktemp("limits"),
                      nodes=("n1", "n2"))


def _first_event(call: grpc.Future) -> str:
    """The stream's first message ("subscribed") or its status code name."""
    try:
        return next(iter(call)).reason
    except grpc.RpcError as exc:
        return exc.code().name


def test_watch_streams_from_one_node_cannot_starve_other_nodes(world: World) -> None:
    assert STREAMS > HANDLER_THREADS
    stub = pb_grpc.NodeServiceStub(open_channel(world.broker.endpoint("node", "n1")))
    calls = [stub.WatchRevocations(pb.WatchRevocationsRequest(node_id="n1"), timeout=300)
             for _ in range(STREAMS)]
    outcomes: list[str] = []
    lock = threading.Lock()

    def first(call: grpc.Future) -> None:
        result = _first_event(call)
        with lock:
            outcomes.append(result)

    threads = [threading.Thread(target=first, args=(c,), daemon=True) for c in calls]
    try:
        for t in threads:
            t.start()
        # while n1's streams are open (or refused), another node's whole release succeeds
        with world.broker.key_client("n2", world.job_id) as client:
            released = client.fetch_dek(tenant_id="acme", dataset_id="ds1", key_version=1)
            released.dek.zeroize()
        for t in threads:
            t.join(timeout=60)
        assert len(outcomes) == STREAMS
        assert 1 <= outcomes.count("subscribed") <= 8, outcomes
        assert outcomes.count("RESOURCE_EXHAUSTED") == STREAMS - outcomes.count("subscribed")
        # and with every allowed stream still open, n2 still gets through
        with world.broker.key_client("n2", world.job_id) as client:
            client.fetch_dek(tenant_id="acme", dataset_id="ds1", key_version=1).dek.zeroize()
    finally:
        for c in calls:
            c.cancel()
    refusals = [r for r in world.broker.audit()
                if r["event"] == "watch" and r["outcome"] == "denied"]
    assert len(refusals) >= STREAMS - 8


def test_only_enrolled_unrevoked_nodes_may_watch(world: World) -> None:
    def watch(node: str) -> str:
        stub = pb_grpc.NodeServiceStub(open_channel(world.broker.endpoint("node", node)))
        call = stub.WatchRevocations(pb.WatchRevocationsRequest(node_id=node), timeout=60)
        try:
            return _first_event(call)
        finally:
            call.cancel()

    assert watch("n3") == "NOT_FOUND"  # a valid certificate, never enrolled
    enrol(world.broker, "n3")
    assert watch("n3") == "subscribed"
    world.broker.operator().RevokeNode(pb.RevokeNodeRequest(node_id="n3"), timeout=10)
    assert watch("n3") == "PERMISSION_DENIED"
    audited = [r["reason"] for r in world.broker.audit() if r["event"] == "watch"
               and r["subject"] == "node:n3" and r["outcome"] == "denied"]
    assert len(audited) == 2 and "NotFound" in audited[0] and "node.revoked" in audited[1]


@pytest.fixture(scope="module")
def tight(broker_factory, tmp_path_factory) -> World:
    """A broker with small per-identity limits (config key ``limits``)."""
    broker = broker_factory("tight", extra_config={"limits": {
        "rate_per_s": 0.2, "burst": 12, "pending_sessions_per_node": 5,
        "pending_uploads_per_tenant": 3}})
    return make_world(broker, tmp_path_factory.mktemp("tight"), nodes=("n1", "n2"))


def test_request_rate_is_bounded_per_identity(tight: World) -> None:
    n1 = pb_grpc.NodeServiceStub(open_channel(tight.broker.endpoint("node", "n1")))
    codes = []
    start = time.monotonic()
    for _ in range(40):
        try:
            n1.RenewLease(pb.RenewLeaseRequest(node_id="n1", lease_id="0" * 32,
                                               token=b"\x00" * 90), timeout=10)
        except grpc.RpcError as exc:
            codes.append(exc.code())
    elapsed = time.monotonic() - start
    exhausted = codes.count(C.RESOURCE_EXHAUSTED)
    # at most burst + rate * elapsed calls get through; the rest are refused before any handler
    assert exhausted >= 40 - (12 + int(0.2 * elapsed) + 1), (exhausted, elapsed)
    assert exhausted > 0
    # another identity is not affected by n1's empty bucket
    n2 = pb_grpc.NodeServiceStub(open_channel(tight.broker.endpoint("node", "n2")))
    ch = n2.Challenge(pb.ChallengeRequest(node_id="n2", job_id=tight.job_id), timeout=10)
    assert ch.session_id


def test_pending_challenges_and_uploads_are_bounded_per_identity(tight: World) -> None:
    n2 = pb_grpc.NodeServiceStub(open_channel(tight.broker.endpoint("node", "n2")))
    with tight.broker.db() as db:
        pending = db.execute("SELECT COUNT(*) FROM sessions WHERE node_id='n2' AND used=0"
                             ).fetchone()[0]
    codes = []
    for _ in range(6):
        try:
            n2.Challenge(pb.ChallengeRequest(node_id="n2", job_id=tight.job_id), timeout=10)
            codes.append("OK")
        except grpc.RpcError as exc:
            codes.append(exc.code().name)
            assert "unused challenges" in exc.details()
    assert codes == ["OK"] * (5 - pending) + ["RESOURCE_EXHAUSTED"] * (1 + pending)
    with tight.broker.tenant("beta") as beta:
        beta.register()
    stub = pb_grpc.TenantServiceStub(open_channel(tight.broker.endpoint("tenant", "beta")))
    codes = []
    for i in range(4):
        try:
            stub.OpenUpload(pb.OpenUploadRequest(tenant_id="beta", dataset_id=f"d{i}",
                                                 key_version=1, share_count=1), timeout=10)
            codes.append("OK")
        except grpc.RpcError as exc:
            codes.append(exc.code().name)
    assert codes == ["OK"] * 3 + ["RESOURCE_EXHAUSTED"]
    with tight.broker.db() as db:
        assert db.execute("SELECT COUNT(*) FROM uploads WHERE tenant_id='beta'"
                          ).fetchone() == (3,)
