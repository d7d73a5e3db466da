"""``kill -9`` of one of two broker replicas under load (one PostgreSQL, one SoftHSM token).

Two nodes fetch and renew keys in a loop through key clients that take the replica set
(both addresses, in opposite orders so both replicas carry load), and a third node keeps
asking for a place the grant does not have (``max_nodes=2``). One replica is killed with
SIGKILL mid-run. Shown: every round of both nodes succeeds (the clients fail over to the
live replica within their deadline), the third node is refused every time and never holds
a lease, every lease a client was given is in the database, no session was attested twice
(one allowed ``attest`` record per session in the audit log in PostgreSQL), and the audit
chain verifies (VerifyAudit on the surviving replica, against the HSM anchor).
"""

from __future__ import annotations

import collections
import os
import signal
import threading
import time
from collections.abc import Iterator

import psycopg
import pytest

from compose.postgres import LocalPostgres
from kms_broker.client import KeyClient
from kms_broker.rpc import PermissionDeniedError
from tests.kms_broker.conftest import BrokerProc, World
from tests.kms_broker.test_replicas_pg import pg_audit, replica_pair

pytestmark = pytest.mark.integration

WAIT_S = 180  # hang guard for the whole load phase, not a timing check
ROUNDS_BEFORE, ROUNDS_AFTER = 3, 4


@pytest.fixture(scope="module")
def pair(broker_factory, pg: LocalPostgres,
         tmp_path_factory) -> Iterator[tuple[World, BrokerProc, BrokerProc]]:
    with replica_pair(broker_factory, pg, tmp_path_factory, "fo") as replicas:
        yield replicas


def _client(world: World, node: str, replicas: list[BrokerProc], job: str) -> KeyClient:
    endpoints = [r.endpoint("node", node) for r in replicas]
    return KeyClient([endpoints], node_id=node, job_id=job,
                     evidence_for=replicas[0].evidence(node), timeout_s=10, failover_s=120)


def test_kill_9_of_one_replica_under_load(pair, pg: LocalPostgres) -> None:
    world, a, b = pair
    job = "job-load"
    with a.tenant("acme") as acme:
        world.grant(acme, grant_id="g-load", job_id=job, max_nodes=2)
    rounds: collections.Counter[str] = collections.Counter()
    leases: dict[str, set[str]] = collections.defaultdict(set)
    errors: list[str] = []
    denials: list[str] = []
    killed = threading.Event()
    after_kill: collections.Counter[str] = collections.Counter()
    stop = threading.Event()

    def holder(node: str, order: list[BrokerProc]) -> None:
        try:
            with _client(world, node, order, job) as client:
                while not stop.is_set():
                    released = client.fetch_dek(tenant_id="acme", dataset_id=world.dataset_id,
                                                key_version=1)
                    released.dek.zeroize()
                    leases[node].update(le.lease_id for le in released.leases)
                    client.renew()
                    rounds[node] += 1
                    if killed.is_set():
                        after_kill[node] += 1
        except Exception as exc:  # reported by the assertion below
            errors.append(f"{node}: {type(exc).__name__}: {exc}")

    def outsider() -> None:
        with _client(world, "n3", [b, a], job) as client:
            while not stop.is_set():
                try:
                    client.fetch_dek(tenant_id="acme", dataset_id=world.dataset_id,
                                     key_version=1).dek.zeroize()
                    errors.append("n3 was given a key beyond max_nodes")
                except PermissionDeniedError as exc:
                    denials.append(str(exc))
                except Exception as exc:
                    errors.append(f"n3: {type(exc).__name__}: {exc}")
                stop.wait(0.2)

    # the holders take both places before the outsider starts asking
    threads = [threading.Thread(target=holder, args=("n1", [a, b])),
               threading.Thread(target=holder, args=("n2", [b, a]))]
    for t in threads:
        t.start()
    deadline = time.monotonic() + WAIT_S
    while min(rounds["n1"], rounds["n2"]) < 1 and not errors:
        assert time.monotonic() < deadline, "load never got going"
        time.sleep(0.05)
    threads.append(threading.Thread(target=outsider))
    threads[-1].start()
    try:
        while min(rounds["n1"], rounds["n2"]) < ROUNDS_BEFORE and not errors:
            assert time.monotonic() < deadline, "load never got going"
            time.sleep(0.05)
        os.kill(a.pid, signal.SIGKILL)
        a.proc.wait(timeout=30)
        killed.set()
        while min(after_kill["n1"], after_kill["n2"]) < ROUNDS_AFTER and not errors:
            assert time.monotonic() < deadline, f"no progress after the kill: {after_kill}"
            time.sleep(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=WAIT_S)
    assert errors == []
    assert denials and all("lease.no_room" in d for d in denials), denials[:3]

    with psycopg.connect(pg.dsn) as db:
        rows = db.execute("SELECT lease_id, node_id FROM leases WHERE grant_id=%s",
                          ("g-load",)).fetchall()
        sessions_used = db.execute("SELECT COUNT(*) FROM sessions WHERE used=1").fetchone()[0]
    stored = collections.defaultdict(set)
    for lease_id, node_id in rows:
        stored[node_id].add(lease_id)
    assert set(stored) == {"n1", "n2"}  # never a third node
    for node in ("n1", "n2"):
        assert leases[node] <= stored[node], f"{node}: a lease it was given is gone"
    assert sessions_used > 0

    records = pg_audit(pg.dsn)
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
    with b.tenant("acme") as acme:  # the surviving replica verifies the chain and anchor
        result = acme.verify_audit()
    assert result.ok, result.problem
    allowed = collections.Counter(r["subject"] for r in records
                                  if r["event"] == "attest" and r["outcome"] == "allowed")
    assert allowed and max(allowed.values()) == 1, allowed.most_common(3)
