"""Broker replicas on PostgreSQL: two ``serve`` processes (their own ports and pools) on one
real PostgreSQL (started from the system binaries) and one SoftHSM token.

What holds across worker processes holds across replicas: a release through either replica
gives the right DEK; a session's nonce is single-use whichever replica sees it; the lease
room of a grant holds under races through both; a grant revoked on one replica reaches the
node's watch stream held by the other (LISTEN/NOTIFY); node revocation is sticky on both;
a tenant shredded on one is refused on the other. With PostgreSQL stopped every replica
answers UNAVAILABLE (fail closed), and once it is back they serve again without a restart.

Each replica has its own ``state_dir``: everything shared lives in the database, the audit
chain too (kms_broker.audit_pg), which verifies as one chain written by both.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator

import grpc
import psycopg
import pytest
import yaml

from compose.postgres import LocalPostgres
from kms_broker import sealing
from kms_broker._proto.kmsbroker.v1 import broker_pb2 as pb
from kms_broker._proto.kmsbroker.v1 import broker_pb2_grpc as pb_grpc
from kms_broker.rpc import PermissionDeniedError, UnavailableError, open_channel
from sealed import derive_dek
from sealed.secrets import SecretBuffer
from tests.kms_broker.conftest import BrokerProc, World, _spawn, enrol, make_world
from tests.kms_broker.test_workers import attested

pytestmark = pytest.mark.integration

WAIT_S = 90  # how long a helper polls before it gives up (a hang guard, not a timing check)


def start_replica(first: BrokerProc, name: str) -> BrokerProc:
    """Another ``serve`` process with ``first``'s config (same database, token and broker
    id) on a port and a state directory of its own."""
    root = first.state_dir.parent
    cfg = yaml.safe_load((root / f"{first.name}.yaml").read_text())
    cfg["listen"] = "127.0.0.1:0"
    state = root / f"{name}-state"
    state.mkdir()
    cfg["state_dir"] = str(state)
    cfg_path = root / f"{name}.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    proc = _spawn(root, name, cfg_path, state, first.entry)
    port = int((state / "broker.port").read_text())
    return BrokerProc(name, proc, state, f"127.0.0.1:{port}", first.pki,
                      first.token_dir, keys=first.keys, evidence_kind=first.evidence_kind,
                      tpms=first.tpms, entry=first.entry)


@contextlib.contextmanager
def replica_pair(broker_factory, pg: LocalPostgres, tmp_path_factory,
                 name: str) -> Iterator[tuple[World, BrokerProc, BrokerProc]]:
    """Two brokers on ``pg`` and one HSM token (NAME-a started by the factory, NAME-b as its
    replica) and a world of three nodes enrolled at them."""
    a = broker_factory(f"{name}-a", extra_config={"state": pg.dsn})
    b = start_replica(a, f"{name}-b")
    try:
        world = make_world(a, tmp_path_factory.mktemp(name), nodes=("n1", "n2", "n3"))
        yield world, a, b
    finally:
        b.stop()


@pytest.fixture(scope="module")
def replicas(broker_factory, pg: LocalPostgres,
             tmp_path_factory) -> Iterator[tuple[World, BrokerProc, BrokerProc]]:
    with replica_pair(broker_factory, pg, tmp_path_factory, "rep") as pair:
        yield pair


def _expected_dek(world: World) -> SecretBuffer:
    return derive_dek([SecretBuffer.from_bytes(s) for s in world.shares],
                      tenant_id=world.tenant_id, dataset_id=world.dataset_id, key_version=1)


def _wait(condition, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.02)


def test_both_replicas_release_the_right_dek(replicas) -> None:
    world, a, b = replicas
    with _expected_dek(world) as expected:
        for replica in (a, b):
            with replica.key_client("n1", world.job_id) as client:
                released = client.fetch_dek(tenant_id=world.tenant_id,
                                            dataset_id=world.dataset_id, key_version=1)
            with released.dek as dek:
                assert dek.equals(expected), f"{replica.name} released a wrong share"


def test_a_nonce_is_single_use_across_replicas(replicas) -> None:
    """Challenge on A, Attest on B (the session lives in the database), then the same session
    again on A and on B: refused."""
    world, a, b = replicas
    stub_a, stub_b = (pb_grpc.NodeServiceStub(open_channel(r.endpoint("node", "n1")))
                      for r in (a, b))
    ch = stub_a.Challenge(pb.ChallengeRequest(node_id="n1", job_id=world.job_id), timeout=10)
    _, public = sealing.generate_node_key()
    from attest.interface import expected_report_data

    kind, payload = a.evidence("n1")(expected_report_data(ch.nonce, ch.session_id, public))
    request = pb.AttestRequest(node_id="n1", session_id=ch.session_id, node_public_key=public,
                               evidence=pb.Evidence(kind=kind, payload=payload))
    assert stub_b.Attest(request, timeout=10).token
    for stub in (stub_a, stub_b):
        with pytest.raises(grpc.RpcError) as info:
            stub.Attest(request, timeout=10)
        assert info.value.code() in (grpc.StatusCode.PERMISSION_DENIED,
                                     grpc.StatusCode.FAILED_PRECONDITION), info.value
        assert "session" in info.value.details() or "nonce" in info.value.details()


def test_lease_room_holds_across_replicas(replicas, pg: LocalPostgres) -> None:
    """max_nodes=1, two nodes releasing at the same moment through different replicas:
    exactly one lease, every round."""
    world, a, b = replicas
    stubs = {0: pb_grpc.NodeServiceStub(open_channel(a.endpoint("node", "n2"))),
             1: pb_grpc.NodeServiceStub(open_channel(b.endpoint("node", "n3")))}
    brokers = {0: a, 1: b}
    with a.tenant("acme") as acme:
        for rnd in range(5):
            job = f"race-{rnd}"
            world.grant(acme, grant_id=f"g-race-{rnd}", job_id=job, max_nodes=1)
            tokens = {w: attested(brokers[w], stubs[w], f"n{w + 2}", job)[0] for w in (0, 1)}
            barrier = threading.Barrier(2)
            outcomes: dict[int, str] = {}

            def go(w: int, tokens: dict = tokens, barrier: threading.Barrier = barrier,
                   outcomes: dict = outcomes) -> None:
                barrier.wait(timeout=WAIT_S)
                try:
                    stubs[w].Release(pb.ReleaseRequest(
                        node_id=f"n{w + 2}", token=tokens[w], tenant_id="acme",
                        dataset_id=world.dataset_id, key_version=1), timeout=30)
                    outcomes[w] = "released"
                except grpc.RpcError as exc:
                    outcomes[w] = f"{exc.code().name}: {exc.details()}"

            threads = [threading.Thread(target=go, args=(w,)) for w in (0, 1)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=WAIT_S)
            released = [w for w, o in outcomes.items() if o == "released"]
            assert len(released) == 1, (rnd, outcomes)
            loser = outcomes[1 - released[0]]
            assert loser.startswith("PERMISSION_DENIED") and "lease.no_room" in loser, loser
            with psycopg.connect(pg.dsn) as db:
                leases = db.execute("SELECT COUNT(*) FROM leases WHERE grant_id=%s",
                                    (f"g-race-{rnd}",)).fetchone()[0]
            assert leases == 1


def test_grant_revoked_on_one_replica_reaches_the_stream_on_the_other(replicas) -> None:
    world, a, b = replicas
    with a.tenant("acme") as acme:
        world.grant(acme, grant_id="g-xrev", job_id="job-xrev")
    notices: list = []
    with b.key_client("n1", "job-xrev") as client:
        client.watch_revocations(notices.append)
        released = client.fetch_dek(tenant_id="acme", dataset_id=world.dataset_id,
                                    key_version=1)
        released.dek.zeroize()
        _wait(client.watching, "the watch stream on replica B")
        with a.tenant("acme") as acme:
            acme.revoke_grant("g-xrev")
        _wait(lambda: notices, "the revocation made on A at B's stream")
        assert notices[0].lease_id == released.leases[0].lease_id
        assert "g-xrev" in notices[0].reason
        with pytest.raises(PermissionDeniedError, match=r"lease\.revoked"):
            client.renew()


def test_node_revocation_is_sticky_on_every_replica(replicas) -> None:
    world, a, b = replicas
    enrol(a, "n3")
    a.operator().RevokeNode(pb.RevokeNodeRequest(node_id="n3"), timeout=10)
    for replica in (a, b):
        with replica.key_client("n3", world.job_id) as client, \
                pytest.raises(PermissionDeniedError):
            client.fetch_dek(tenant_id="acme", dataset_id=world.dataset_id, key_version=1)
        with pytest.raises(Exception, match="revoked"):
            enrol(replica, "n3")  # re-enrolment refused on both


def test_tenant_shredded_on_one_replica_is_refused_on_the_other(replicas, tmp_path) -> None:
    _, a, b = replicas
    shred = make_world(a, tmp_path, tenant_id="beta", dataset_id="dsb", job_id="jobb",
                       grant_id="gb", nodes=("n1",))
    with b.key_client("n1", "jobb") as client:
        client.fetch_dek(tenant_id="beta", dataset_id="dsb", key_version=1).dek.zeroize()
    with a.tenant("beta") as beta:
        beta.shred()
    with b.key_client("n1", "jobb") as client, \
            pytest.raises(PermissionDeniedError, match=r"tenant\.shredded"):
        client.fetch_dek(tenant_id="beta", dataset_id="dsb", key_version=1)
    assert shred.tenant_id == "beta"


def test_postgresql_down_fails_closed_and_replicas_recover(replicas, pg: LocalPostgres) -> None:
    world, a, b = replicas
    pg.stop("fast")
    try:
        for replica in (a, b):
            with replica.key_client("n1", world.job_id) as client, \
                    pytest.raises(UnavailableError):
                client.fetch_dek(tenant_id="acme", dataset_id=world.dataset_id, key_version=1)
    finally:
        pg.start()
    with _expected_dek(world) as expected:
        for replica in (a, b):
            assert replica.proc.poll() is None, f"{replica.name} exited"

            def released(replica: BrokerProc = replica) -> bool:
                with replica.key_client("n1", world.job_id) as client:
                    try:
                        got = client.fetch_dek(tenant_id="acme", dataset_id=world.dataset_id,
                                               key_version=1)
                    except UnavailableError:
                        return False  # the pool is reconnecting
                with got.dek as dek:
                    assert dek.equals(expected)
                return True

            _wait(released, f"{replica.name} to serve again")


def pg_audit(dsn: str) -> list[dict]:
    """The audit records in the database, in order."""
    with psycopg.connect(dsn) as db:
        return [json.loads(bytes(r[0])) for r in
                db.execute("SELECT line FROM audit_log ORDER BY seq")]


def test_one_audit_chain_in_postgresql_from_both_replicas(replicas, pg: LocalPostgres) -> None:
    world, a, b = replicas
    for replica in (a, b):  # traffic through both
        with replica.key_client("n1", world.job_id) as client:
            client.fetch_dek(tenant_id="acme", dataset_id=world.dataset_id,
                             key_version=1).dek.zeroize()
    assert not (a.state_dir / "audit.log").exists()
    assert not (b.state_dir / "audit.log").exists()
    records = pg_audit(pg.dsn)
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
    assert sum(r["event"] == "release" and r["outcome"] == "allowed" for r in records) >= 2
    for replica in (a, b):  # VerifyAudit on each replica checks the shared chain and anchor
        with replica.tenant("acme") as acme:
            result = acme.verify_audit()
        assert result.ok, result.problem
        assert "chain intact" in result.problem
