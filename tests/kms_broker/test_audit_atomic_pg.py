"""On PostgreSQL an action's state change and its audit record commit in one transaction
(the domain's unit of work, ``PostgresRepository.unit_of_work``): neither without the other.

Shown on a real ``serve`` process on a real PostgreSQL, with the database itself doing the
failing:

- the broker is SIGKILLed between the lease a release takes and the release's audit record
  (the test holds the audit log's advisory lock, so the broker waits there with its lease
  inserted): afterwards neither is in the database; let through instead, both are;
- the audit append refused (a trigger on ``audit_log``): the release fails UNAVAILABLE and
  no lease is left; the renewal fails and the lease keeps its expiry;
- the action's own change refused after its record was appended (a trigger on ``grants``):
  the grant submission fails and its "allowed" record is rolled back with it (only the
  "error" record remains);
- a grant revocation whose lease revocation is refused halfway: neither the grant nor its
  lease is revoked and only the "error" record remains (before the unit of work the grant
  was revoked and recorded while its lease stayed active).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator

import grpc
import psycopg
import pytest

from compose.postgres import LocalPostgres
from kms_broker._proto.kmsbroker.v1 import broker_pb2 as pb
from kms_broker.rpc import UnavailableError
from tests.kms_broker.conftest import BrokerProc, World, make_world
from tests.kms_broker.test_workers import attested

pytestmark = pytest.mark.integration

WAIT_S = 90  # hang guard for polling, not a timing check
AUDIT_LOCK = (0x6B6D73, 3)  # kms_broker.audit_pg's advisory lock


@pytest.fixture(scope="module")
def broker(broker_factory, pg: LocalPostgres,
           tmp_path_factory) -> Iterator[tuple[World, BrokerProc]]:
    b = broker_factory("atomic", extra_config={"state": pg.dsn})
    world = make_world(b, tmp_path_factory.mktemp("atomic"), nodes=("n1", "n2"))
    yield world, b


def _db(pg: LocalPostgres) -> psycopg.Connection:
    return psycopg.connect(pg.dsn, autocommit=True)


def _leases(pg: LocalPostgres, grant_id: str) -> list[tuple]:
    with _db(pg) as db:
        return db.execute("SELECT lease_id, node_id, expires_ms FROM leases WHERE grant_id=%s",
                          (grant_id,)).fetchall()


def _records(pg: LocalPostgres, event: str, needle: str) -> list[dict]:
    with _db(pg) as db:
        rows = [json.loads(bytes(r[0])) for r in
                db.execute("SELECT line FROM audit_log ORDER BY seq")]
    return [r for r in rows if r["event"] == event and needle in r["reason"] + r["subject"]]


def _wait(condition, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + WAIT_S
    while True:
        got = condition()
        if got:
            return got
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.02)


def _refuse(db: psycopg.Connection, table: str, condition: str) -> None:
    """A trigger that makes PostgreSQL refuse inserts into ``table`` where ``condition``."""
    db.execute(f"""
        CREATE OR REPLACE FUNCTION refuse_{table}() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN IF {condition} THEN RAISE EXCEPTION 'refused by the test'; END IF;
        RETURN NEW; END $$""")
    db.execute(f"CREATE TRIGGER refuse_{table} BEFORE INSERT ON {table} FOR EACH ROW "
               f"EXECUTE FUNCTION refuse_{table}()")


def _allow(db: psycopg.Connection, table: str) -> None:
    db.execute(f"DROP TRIGGER refuse_{table} ON {table}")


def _release(broker: BrokerProc, world: World, node: str, token: bytes) -> pb.ReleaseResponse:
    return broker.node_stub(node).Release(pb.ReleaseRequest(
        node_id=node, token=token, tenant_id=world.tenant_id, dataset_id=world.dataset_id,
        key_version=1), timeout=WAIT_S)


def _blocked_release(pg: LocalPostgres, grant_id: str) -> int | None:
    """The PostgreSQL backend of a release waiting for the audit lock with its lease already
    written in its (open) transaction; -1 if a lease of ``grant_id`` is already committed
    (the lease did not wait for its record)."""
    if _leases(pg, grant_id):
        return -1
    with _db(pg) as db:
        row = db.execute(
            "SELECT a.pid FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
            "WHERE l.locktype = 'advisory' AND NOT l.granted AND l.classid = %s "
            "AND l.objid = %s AND a.backend_xid IS NOT NULL", AUDIT_LOCK).fetchone()
    return None if row is None else row[0]


def test_a_broker_killed_between_lease_and_record_leaves_neither(
    broker, pg: LocalPostgres
) -> None:
    world, b = broker
    with b.tenant(world.tenant_id) as acme:
        world.grant(acme, grant_id="g-kill", job_id="job-kill", max_nodes=1)
    token, _ = attested(b, b.node_stub("n2"), "n2", "job-kill")
    outcome: list[BaseException | pb.ReleaseResponse] = []
    holder = _db(pg)
    holder.execute("SELECT pg_advisory_lock(%s, %s)", AUDIT_LOCK)
    try:
        def call() -> None:
            try:
                outcome.append(_release(b, world, "n2", token))
            except grpc.RpcError as exc:
                outcome.append(exc)

        caller = threading.Thread(target=call, daemon=True)
        caller.start()
        backend = _wait(lambda: _blocked_release(pg, "g-kill"),
                        "the release to wait for the audit lock")
        assert backend != -1, "the lease committed before its audit record"
        b.proc.kill()  # SIGKILL: no clean-up in the broker
        b.proc.wait()
    finally:
        holder.execute("SELECT pg_advisory_unlock(%s, %s)", AUDIT_LOCK)
        holder.close()
    caller.join(WAIT_S)
    assert outcome and isinstance(outcome[0], grpc.RpcError)

    def backend_gone() -> bool:
        with _db(pg) as db:
            return db.execute("SELECT count(*) FROM pg_stat_activity WHERE pid=%s",
                              (backend,)).fetchone()[0] == 0

    _wait(backend_gone, "the killed broker's transaction to end")
    assert _leases(pg, "g-kill") == []
    assert _records(pg, "release", "grant g-kill") == []

    b.restart()  # the same state: the release goes through, lease and record together
    token, _ = attested(b, b.node_stub("n2"), "n2", "job-kill")
    assert _release(b, world, "n2", token).sealed_share
    assert len(_leases(pg, "g-kill")) == 1
    (record,) = _records(pg, "release", "grant g-kill")
    assert record["outcome"] == "allowed" and record["actor"] == "node:n2"


def test_a_release_waiting_for_its_record_commits_both_once_let_through(
    broker, pg: LocalPostgres
) -> None:
    world, b = broker
    with b.tenant(world.tenant_id) as acme:
        world.grant(acme, grant_id="g-wait", job_id="job-wait", max_nodes=1)
    token, _ = attested(b, b.node_stub("n1"), "n1", "job-wait")
    outcome: list[object] = []
    holder = _db(pg)
    holder.execute("SELECT pg_advisory_lock(%s, %s)", AUDIT_LOCK)
    try:
        caller = threading.Thread(
            target=lambda: outcome.append(_release(b, world, "n1", token)), daemon=True)
        caller.start()
        backend = _wait(lambda: _blocked_release(pg, "g-wait"),
                        "the release to wait for the audit lock")
        assert backend != -1, "the lease committed before its audit record"
        assert _leases(pg, "g-wait") == []  # not visible while its record waits
    finally:
        holder.execute("SELECT pg_advisory_unlock(%s, %s)", AUDIT_LOCK)
        holder.close()
    caller.join(WAIT_S)
    assert outcome and outcome[0].sealed_share  # type: ignore[attr-defined]
    assert len(_leases(pg, "g-wait")) == 1
    assert len(_records(pg, "release", "grant g-wait")) == 1


def test_a_refused_audit_append_rolls_the_release_and_the_renewal_back(
    broker, pg: LocalPostgres
) -> None:
    world, b = broker
    with b.tenant(world.tenant_id) as acme:
        world.grant(acme, grant_id="g-trig", job_id="job-trig", max_nodes=1)
    token, _ = attested(b, b.node_stub("n1"), "n1", "job-trig")
    with _db(pg) as db:
        _refuse(db, "audit_log", "convert_from(NEW.line, 'UTF8')::jsonb->>'event' "
                                 "IN ('release', 'renew')")
        try:
            with pytest.raises(grpc.RpcError) as info:
                _release(b, world, "n1", token)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value
            assert _leases(pg, "g-trig") == []
            assert _records(pg, "release", "grant g-trig") == []
        finally:
            _allow(db, "audit_log")
        released = _release(b, world, "n1", token)  # the broker kept serving
        (before,) = _leases(pg, "g-trig")
        _refuse(db, "audit_log", "convert_from(NEW.line, 'UTF8')::jsonb->>'event' = 'renew'")
        try:
            time.sleep(0.01)  # a renewal would move the expiry (ms clock)
            with pytest.raises(grpc.RpcError) as info:
                b.node_stub("n1").RenewLease(pb.RenewLeaseRequest(
                    node_id="n1", lease_id=released.lease_id, token=token), timeout=WAIT_S)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value
        finally:
            _allow(db, "audit_log")
    assert _leases(pg, "g-trig") == [before]
    assert [r["outcome"] for r in _records(pg, "renew", released.lease_id)] == []


def test_a_refused_change_rolls_its_allowed_record_back(broker, pg: LocalPostgres) -> None:
    """The record is appended first, then the grant row is refused: the "allowed" record
    goes with the rolled-back change, and only the failure is recorded."""
    world, b = broker
    with _db(pg) as db:
        _refuse(db, "grants", "NEW.grant_id = 'g-refused'")
        try:
            with b.tenant(world.tenant_id) as acme, pytest.raises(UnavailableError):
                world.grant(acme, grant_id="g-refused", job_id="job-refused")
        finally:
            _allow(db, "grants")
        assert db.execute("SELECT count(*) FROM grants WHERE grant_id='g-refused'"
                          ).fetchone()[0] == 0
    outcomes = [r["outcome"] for r in _records(pg, "create_grant", "grant:g-refused")]
    assert outcomes == ["error"]


def test_a_revocation_that_fails_halfway_leaves_nothing_half_done(
    broker, pg: LocalPostgres
) -> None:
    """Revoking a grant revokes its leases in the same unit of work: the leases refused
    (a trigger on ``leases``) after the grant row and the record were written leaves the
    grant, its lease and the log as they were, bar the "error" record."""
    world, b = broker
    with b.tenant(world.tenant_id) as acme:
        world.grant(acme, grant_id="g-rev", job_id="job-rev", max_nodes=1)
    token, _ = attested(b, b.node_stub("n1"), "n1", "job-rev")
    _release(b, world, "n1", token)
    with _db(pg) as db:
        db.execute("""
            CREATE OR REPLACE FUNCTION refuse_lease_revocation() RETURNS trigger
            LANGUAGE plpgsql AS $$ BEGIN
              IF NEW.revoked = 1 AND NEW.grant_id = 'g-rev' THEN
                RAISE EXCEPTION 'refused by the test'; END IF;
              RETURN NEW; END $$""")
        db.execute("CREATE TRIGGER refuse_lease_revocation BEFORE UPDATE ON leases "
                   "FOR EACH ROW EXECUTE FUNCTION refuse_lease_revocation()")
        try:
            with b.tenant(world.tenant_id) as acme, pytest.raises(UnavailableError):
                acme.revoke_grant("g-rev")
        finally:
            db.execute("DROP TRIGGER refuse_lease_revocation ON leases")

        def state() -> tuple:
            return (db.execute("SELECT revoked FROM grants WHERE grant_id='g-rev'").fetchone(),
                    db.execute("SELECT revoked FROM leases WHERE grant_id='g-rev'").fetchall())

        assert state() == ((0,), [(0,)])  # neither the grant nor its lease revoked
        assert [r["outcome"] for r in _records(pg, "revoke_grant", "grant:g-rev")] == ["error"]
        with b.tenant(world.tenant_id) as acme:
            assert acme.revoke_grant("g-rev") == 1
        assert state() == ((1,), [(1,)])
    assert [r["outcome"] for r in _records(pg, "revoke_grant", "grant:g-rev")] == [
        "error", "allowed"]
