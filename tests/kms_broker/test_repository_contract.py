"""The repository contract (:class:`kms_broker.state.repository.Repository`), one suite run
against SQLite and against a real PostgreSQL started from the system binaries.

``repo_pair`` gives two repository instances on the same store (two connections to one
SQLite file, two pools on one PostgreSQL database): what holds across broker worker
processes and replicas is shown by racing threads through both."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kms_broker.domain.errors import AlreadyExists, AuthorizationChanged
from kms_broker.domain.model import (
    Dataset,
    DatasetShare,
    Grant,
    Lease,
    Node,
    Session,
    Tenant,
    Upload,
)
from kms_broker.domain.revocations import RevocationEvent
from kms_broker.state.postgres import PostgresRepository
from kms_broker.state.sqlite import SqliteRepository
from tests.kms_broker.pg_fixtures import fresh_database, postgres_cluster  # noqa: F401

NOW = 1_000_000


@pytest.fixture(params=["sqlite", "postgresql"])
def open_repo(request: pytest.FixtureRequest,
              tmp_path: Path) -> Iterator[Callable[[], Any]]:
    """A factory of repository instances that all share one fresh store."""
    opened: list[Any] = []
    if request.param == "sqlite":
        def factory() -> Any:
            opened.append(SqliteRepository(tmp_path / "broker.db"))
            return opened[-1]
    else:
        dsn = fresh_database(request.getfixturevalue("postgres_cluster"))

        def factory() -> Any:
            opened.append(PostgresRepository(dsn))
            return opened[-1]
    yield factory
    for repo in opened:
        repo.close()


@pytest.fixture
def repo(open_repo: Callable[[], Any]) -> Any:
    return open_repo()


def _tenant(repo: Any, tenant_id: str = "acme") -> None:
    repo.add_tenant(Tenant(tenant_id=tenant_id, signing_public_key=b"k" * 32, kek_version=1,
                           created_ms=5, binding_sig=b"sig"))


def _node(node_id: str = "n1", scope: str = "") -> Node:
    return Node(node_id=node_id, tenant_scope=scope, ak_public=b"ak", ek_certificate=b"ek",
                enrolled_ms=7, binding_sig=b"b")


def _grant(grant_id: str = "g1", tenant_id: str = "acme", max_nodes: int = 2) -> Grant:
    return Grant(grant_id=grant_id, tenant_id=tenant_id, dataset_id="ds1", job_id="j1",
                 policy_digest="ab" * 32, max_nodes=max_nodes, expires_ms=NOW * 10)


def _lease(lease_id: str, node_id: str, grant_id: str = "g1", expires_ms: int = NOW + 1000,
           dataset_id: str = "ds1") -> Lease:
    return Lease(lease_id=lease_id, node_id=node_id, grant_id=grant_id, tenant_id="acme",
                 dataset_id=dataset_id, expires_ms=expires_ms)


def test_schema_is_migrated_once(open_repo) -> None:
    first = open_repo()
    version = first.schema_version()
    assert version >= 1
    assert open_repo().schema_version() == version  # a second instance migrates nothing


def test_tenants(repo) -> None:
    assert repo.get_tenant("acme") is None
    _tenant(repo)
    with pytest.raises(AlreadyExists):
        _tenant(repo)
    repo.set_tenant_kek_version("acme", 3)
    repo.set_tenant_status("acme", "shredded")
    assert repo.get_tenant("acme") == Tenant(
        tenant_id="acme", signing_public_key=b"k" * 32, kek_version=3, status="shredded",
        created_ms=5, binding_sig=b"sig")


def test_uploads_datasets_and_shares(repo) -> None:
    _tenant(repo)
    up = Upload(upload_id="u1", tenant_id="acme", dataset_id="ds1", key_version=1,
                share_index=0, share_count=2, expires_ms=NOW + 10, import_public_key=b"p")
    with pytest.raises(AlreadyExists):  # unknown tenant: a reference violation
        repo.add_upload(Upload(**{**_fields(up), "upload_id": "u0", "tenant_id": "nobody"}))
    repo.add_upload(up)
    with pytest.raises(AlreadyExists):
        repo.add_upload(up)
    assert repo.get_upload("u1") == up and repo.get_upload("nope") is None
    repo.set_upload_public_key("u1", b"q")
    assert repo.get_upload("u1").import_public_key == b"q"
    assert repo.pending_uploads("acme", NOW, 10) == 1
    assert repo.pending_uploads("acme", NOW + 10, 10) == 0  # expired
    assert repo.mark_upload_committed("u1") is True
    assert repo.mark_upload_committed("u1") is False  # once only
    assert repo.pending_uploads("acme", NOW, 10) == 0

    ds = Dataset(tenant_id="acme", dataset_id="ds1", share_index=0, share_count=2)
    repo.put_dataset(ds)
    repo.put_dataset(Dataset(**{**_fields(ds), "manifest_name": "m", "store_uri": "file:///x",
                                "holders": ("a", "b"), "status": "active"}))
    got = repo.get_dataset("acme", "ds1")
    assert (got.holders, got.status, got.manifest_name) == (("a", "b"), "active", "m")
    assert got.manifest_key_version == 0  # not given: not recorded
    repo.put_dataset(Dataset(**{**_fields(got), "manifest_name": "m2",
                                "manifest_key_version": 2}))
    got = repo.get_dataset("acme", "ds1")
    assert (got.manifest_name, got.manifest_key_version) == ("m2", 2)
    repo.put_dataset(Dataset(tenant_id="acme", dataset_id="ds0", share_index=1, share_count=2))
    assert [d.dataset_id for d in repo.list_datasets("acme")] == ["ds0", "ds1"]

    share = DatasetShare(tenant_id="acme", dataset_id="ds1", key_version=1, kek_version=1,
                         wrapped_share=b"w1")
    repo.put_share(share)
    with pytest.raises(AlreadyExists):
        repo.put_share(share)
    repo.put_share(DatasetShare(tenant_id="acme", dataset_id="ds1", key_version=2,
                                kek_version=1, wrapped_share=b"w2"))
    repo.replace_share(DatasetShare(tenant_id="acme", dataset_id="ds1", key_version=1,
                                    kek_version=2, wrapped_share=b"r1"))
    assert repo.get_share("acme", "ds1", 1) == DatasetShare(
        tenant_id="acme", dataset_id="ds1", key_version=1, kek_version=2, wrapped_share=b"r1")
    assert repo.get_share("acme", "ds1", 9) is None
    assert [s.key_version for s in repo.list_shares("acme", "ds1")] == [1, 2]
    assert len(repo.list_shares("acme")) == 2
    assert repo.delete_dataset("acme", "ds1") is True
    assert repo.list_shares("acme") == []  # shares go with their dataset
    assert repo.delete_dataset("acme", "ds1") is False


def _fields(obj: Any) -> dict[str, Any]:
    return {k: getattr(obj, k) for k in obj.__slots__}


def test_node_revocation_is_sticky_until_reinstated(repo) -> None:
    assert repo.put_node(_node()) is True
    assert repo.get_node("n1") == _node()
    assert repo.put_node(Node(**{**_fields(_node()), "ak_public": b"ak2"})) is True  # re-enrol
    assert repo.revoke_node("n1") is True and repo.revoke_node("nx") is False
    assert repo.get_node("n1").revoked is True
    assert repo.put_node(_node()) is False  # sticky: re-enrolment refused
    assert repo.get_node("n1").ak_public == b"ak2"
    assert repo.reinstate_node("n1") is True
    assert repo.reinstate_node("n1") is False  # only a revoked node
    node = repo.get_node("n1")
    assert node.revoked and node.reinstated  # still refused until it enrols again
    assert repo.put_node(_node()) is True
    assert repo.get_node("n1").revoked is False


def test_list_nodes(repo) -> None:
    assert repo.list_nodes() == []
    repo.put_node(_node("n2", scope="acme"))
    repo.put_node(_node("n1"))
    repo.revoke_node("n2")
    listed = repo.list_nodes()
    assert [(n.node_id, n.tenant_scope, n.revoked) for n in listed] == [
        ("n1", "", False), ("n2", "acme", True)]
    assert listed[0] == repo.get_node("n1")


def test_sessions_are_single_use_and_per_node(repo) -> None:
    repo.put_node(_node("n1"))
    repo.put_node(_node("n2"))
    s = Session(session_id="s1", node_id="n1", job_id="j", nonce=b"n" * 32, expires_ms=NOW)
    repo.add_session(s)
    with pytest.raises(AlreadyExists):
        repo.add_session(s)
    with pytest.raises(AlreadyExists):  # unknown node
        repo.add_session(Session(**{**_fields(s), "session_id": "s2", "node_id": "zz"}))
    assert repo.pending_sessions("n1", NOW - 1, 10) == 1
    assert repo.consume_session("s1", "n2").used is False  # another node's: not burnt
    assert repo.consume_session("s1", "n1").used is False
    assert repo.consume_session("s1", "n1").used is True
    assert repo.consume_session("nope", "n1") is None
    assert repo.pending_sessions("n1", NOW - 1, 10) == 0
    assert repo.get_session("s1").used is True
    assert repo.get_session_claims("s1") is None
    repo.put_session_claims("s1", b'{"c":1}')
    assert repo.get_session_claims("s1") == b'{"c":1}'
    # durable=False: as atomic and single-use; mark_session_used spends a session (durably)
    repo.add_session(Session(**{**_fields(s), "session_id": "s3"}))
    repo.add_session(Session(**{**_fields(s), "session_id": "s4"}))
    assert repo.consume_session("s3", "n2", durable=False).used is False  # not burnt
    assert repo.consume_session("s3", "n1", durable=False).used is False
    assert repo.consume_session("s3", "n1", durable=False).used is True
    repo.mark_session_used("s4")
    repo.mark_session_used("s4")  # idempotent
    assert repo.consume_session("s4", "n1").used is True
    session, claims = repo.get_session_and_claims("s1")
    assert session.session_id == "s1" and claims == b'{"c":1}'
    assert repo.get_session_and_claims("nope") == (None, None)


def test_release_reads(repo) -> None:
    _tenant(repo)
    repo.put_node(_node())
    repo.put_dataset(Dataset(tenant_id="acme", dataset_id="ds1", share_index=0, share_count=1))
    repo.put_share(DatasetShare(tenant_id="acme", dataset_id="ds1", key_version=1,
                                kek_version=1, wrapped_share=b"w"))
    repo.add_session(Session(session_id="s1", node_id="n1", job_id="j", nonce=b"n" * 32,
                             expires_ms=NOW))
    repo.put_session_claims("s1", b"{}")
    node, tenant, ds, share, session, claims = repo.release_reads(
        node_id="n1", tenant_id="acme", dataset_id="ds1", key_version=1, session_id="s1")
    assert (node.node_id, tenant.tenant_id, ds.dataset_id, share.wrapped_share,
            session.session_id, claims) == ("n1", "acme", "ds1", b"w", "s1", b"{}")
    assert repo.release_reads(node_id="x", tenant_id="y", dataset_id="z", key_version=1,
                              session_id="w") == (None,) * 6


def test_policies_and_grants_scoped_per_tenant(repo) -> None:
    _tenant(repo)
    _tenant(repo, "other")
    repo.put_policy("acme", "d1", "text")
    repo.put_policy("acme", "d1", "ignored")  # content-addressed: first text stays
    assert repo.get_policy("acme", "d1") == "text" and repo.get_policy("other", "d1") is None
    repo.add_grant(_grant(), b"doc", b"sig")
    repo.add_grant(_grant(tenant_id="other"), b"doc2", b"sig2")  # same id, other tenant
    with pytest.raises(AlreadyExists):
        repo.add_grant(_grant(), b"doc", b"sig")
    repo.add_grant(_grant("g0"), b"doc0", b"sig0")
    assert repo.get_grant("acme", "g1") == _grant()
    assert repo.grant_document("other", "g1") == (b"doc2", b"sig2")
    assert repo.grant_document("acme", "gx") is None
    assert [(g.tenant_id, g.grant_id) for g in repo.grants_for(job_id="j1", dataset_id="ds1")
            if g.tenant_id == "acme"] == [("acme", "g0"), ("acme", "g1")]
    assert repo.grants_for(job_id="j2") == []
    docs = [(g.grant_id, d) for g, d in repo.grants_with_documents(job_id="j1",
                                                                   dataset_id="ds1")
            if g.tenant_id == "acme"]
    assert docs == [("g0", (b"doc0", b"sig0")), ("g1", (b"doc", b"sig"))]
    assert repo.revoke_grant("acme", "g1") is True
    assert repo.get_grant("acme", "g1").revoked is True
    assert repo.get_grant("other", "g1").revoked is False
    assert repo.revoke_grant("acme", "nope") is False


def _lease_world(repo: Any, nodes: int, grants: tuple[str, ...] = ("g1",)) -> None:
    """The rows a lease is taken under: tenant acme, its grants and nodes n0..n{nodes-1}."""
    _tenant(repo)
    for g in grants:
        repo.add_grant(_grant(g), b"doc", b"sig")
    for i in range(nodes):
        repo.put_node(_node(f"n{i}"))


def test_leases_room_and_revocation(repo) -> None:
    _lease_world(repo, 4)
    repo.add_lease(_lease("l1", "n1"))
    with pytest.raises(AlreadyExists):
        repo.add_lease(_lease("l1", "n1"))
    assert repo.get_lease("l1") == _lease("l1", "n1") and repo.get_lease("x") is None
    assert repo.take_lease(_lease("l2", "n2"), now_ms=NOW, max_nodes=2) is True
    assert repo.take_lease(_lease("l3", "n3"), now_ms=NOW, max_nodes=2) is False  # full
    assert repo.take_lease(_lease("l4", "n1"), now_ms=NOW, max_nodes=2) is True  # a holder
    assert repo.active_lease_nodes("acme", "g1", NOW) == {"n1", "n2"}
    assert repo.lease_room("acme", "g1", "n3", NOW, 2) is False
    assert repo.lease_room("acme", "g1", "n3", NOW, 3) is True
    assert repo.lease_room("acme", "g1", "n3", NOW + 1000, 2) is True  # all expired
    repo.extend_lease("l2", NOW + 5000)
    assert repo.get_lease("l2").expires_ms == NOW + 5000
    repo.drop_lease("l4")
    assert repo.get_lease("l4") is None
    repo.add_lease(_lease("l5", "n5", grant_id="g2", dataset_id="ds2"))
    revoked = repo.revoke_leases(now_ms=NOW, grant_id="g1")
    assert sorted(le.lease_id for le in revoked) == ["l1", "l2"]
    assert all(not le.revoked for le in revoked)  # as they were: active
    assert repo.get_lease("l1").revoked is True and repo.get_lease("l5").revoked is False
    assert repo.revoke_leases(now_ms=NOW, grant_id="g1") == []  # already revoked
    assert repo.lease_room("acme", "g1", "n3", NOW, 2) is True
    assert [le.lease_id for le in repo.revoke_leases(now_ms=NOW, tenant_id="acme",
                                                     dataset_id="ds2")] == ["l5"]
    repo.add_lease(_lease("l6", "n6"))
    assert [le.lease_id for le in repo.revoke_leases(now_ms=NOW, node_id="n6")] == ["l6"]


def test_janitor_queries(repo) -> None:
    _tenant(repo)
    repo.put_node(_node())
    for i, expires in enumerate((NOW - 10, NOW + 10)):
        repo.add_upload(Upload(upload_id=f"u{i}", tenant_id="acme", dataset_id=f"d{i}",
                               key_version=1, share_index=0, share_count=1,
                               expires_ms=expires, import_public_key=b""))
        repo.put_dataset(Dataset(tenant_id="acme", dataset_id=f"d{i}", share_index=0,
                                 share_count=1))
        repo.add_session(Session(session_id=f"s{i}", node_id="n1", job_id="j",
                                 nonce=b"n" * 32, expires_ms=expires))
        repo.add_lease(_lease(f"l{i}", "n1", expires_ms=expires))
    assert repo.expired_uploads(NOW, 10) == ["u0"]
    repo.delete_upload("u0")
    assert repo.get_upload("u0") is None
    assert repo.get_dataset("acme", "d0") is None  # pending, never committed: gone too
    assert repo.get_dataset("acme", "d1") is not None
    assert repo.purge_expired(NOW) == (1, 1)
    assert repo.get_session("s0") is None and repo.get_session("s1") is not None
    assert repo.get_lease("l0") is None and repo.get_lease("l1") is not None


def test_revocation_events_pass_between_instances(open_repo) -> None:
    a, b = open_repo(), open_repo()
    start, events = b.revocation_events_after(-1, "B")
    assert events == []
    e1 = RevocationEvent("l1", "acme", "ds1", "grant revoked")
    a.add_revocation_events("A", [("n1", e1)], now_ms=NOW, keep_ms=1000)
    b.add_revocation_events("B", [("n2", RevocationEvent("l2", "acme", "ds1", "x"))],
                            now_ms=NOW, keep_ms=1000)
    last, events = b.revocation_events_after(start, "B")
    assert events == [("n1", e1)]  # not its own
    assert b.revocation_events_after(last, "B") == (last, [])
    # old events are dropped by the next insert
    a.add_revocation_events("A", [("n3", e1)], now_ms=NOW + 5000, keep_ms=1000)
    assert [n for n, _ in b.revocation_events_after(start, "B")[1]] == ["n3"]


def test_nonce_is_consumed_once_across_instances(open_repo) -> None:
    """Eight threads over two instances (two processes' connections) race for one session
    per round: exactly one wins each round."""
    repos = [open_repo(), open_repo()]
    repos[0].put_node(_node())
    rounds, threads_n = 10, 8
    wins = [0] * rounds
    lock = threading.Lock()
    for r in range(rounds):
        repos[0].add_session(Session(session_id=f"s{r}", node_id="n1", job_id="j",
                                     nonce=b"n" * 32, expires_ms=NOW))
    barrier = threading.Barrier(threads_n)

    def worker(i: int) -> None:
        repo = repos[i % 2]
        for r in range(rounds):
            barrier.wait(timeout=60)
            if repo.consume_session(f"s{r}", "n1").used is False:
                with lock:
                    wins[r] += 1

    _run_threads(worker, threads_n)
    assert wins == [1] * rounds


def test_lease_room_holds_across_instances(open_repo) -> None:
    """Twelve nodes race for a grant of max_nodes=3 through two instances: 3 get leases."""
    repos = [open_repo(), open_repo()]
    nodes, granted = 12, []
    _lease_world(repos[0], nodes)
    lock = threading.Lock()
    barrier = threading.Barrier(nodes)

    def worker(i: int) -> None:
        barrier.wait(timeout=60)
        if repos[i % 2].take_lease(_lease(f"l{i}", f"n{i}"), now_ms=NOW, max_nodes=3):
            with lock:
                granted.append(i)

    _run_threads(worker, nodes)
    assert len(granted) == 3
    assert repos[0].active_lease_nodes("acme", "g1", NOW) == {f"n{i}" for i in granted}


@pytest.mark.parametrize("change", ["grant", "node", "tenant"])
def test_a_lease_is_refused_under_what_was_revoked_since_the_checks(repo, change) -> None:
    """A release checks the grant, the node and the tenant, then takes its lease; a revocation
    or shred committed in between (by another request or replica) is seen when the lease is
    taken: refused with the rule, and no lease left."""
    _lease_world(repo, 2)
    assert repo.take_lease(_lease("l1", "n1"), now_ms=NOW, max_nodes=2) is True
    {"grant": lambda: repo.revoke_grant("acme", "g1"),
     "node": lambda: repo.revoke_node("n0"),
     "tenant": lambda: repo.set_tenant_status("acme", "shredded")}[change]()
    rule = {"grant": "grant.revoked", "node": "node.revoked", "tenant": "tenant.shredded"}
    with pytest.raises(AuthorizationChanged, match=rf"^{rule[change]}: "):
        repo.take_lease(_lease("l2", "n0"), now_ms=NOW, max_nodes=2)
    assert repo.get_lease("l2") is None


def test_a_revocation_in_flight_waits_for_a_lease_being_taken_and_revokes_it(open_repo):
    """Two instances: one takes a lease while the other revokes the grant; whichever commits
    first, the lease ends up refused or revoked, never active under a revoked grant."""
    a, b = open_repo(), open_repo()
    _lease_world(a, 8)
    outcomes: list[str] = []
    barrier = threading.Barrier(2)

    def take(i: int) -> None:
        barrier.wait(timeout=60)
        if i == 0:
            try:
                outcomes.append("taken" if a.take_lease(_lease("l1", "n1"), now_ms=NOW,
                                                        max_nodes=8) else "full")
            except AuthorizationChanged:
                outcomes.append("refused")
        else:
            b.revoke_grant("acme", "g1")
            b.revoke_leases(now_ms=NOW, grant_id="g1", tenant_id="acme")

    _run_threads(take, 2)
    lease = a.get_lease("l1")
    assert outcomes in (["taken"], ["refused"])
    assert lease is None or lease.revoked, "an active lease under a revoked grant"


def _run_threads(target: Callable[[int], None], n: int) -> None:
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            target(i)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert errors == []


def test_postgresql_wakes_the_relay_with_notify(postgres_cluster) -> None:  # noqa: F811
    """wait_revocations returns as soon as another instance commits events (LISTEN/NOTIFY),
    and False after its timeout when none came."""
    dsn = fresh_database(postgres_cluster)
    a, b = PostgresRepository(dsn), PostgresRepository(dsn)
    try:
        assert b.wait_revocations(0.05) is False  # listening now, nothing sent
        woke: list[bool] = []
        waiter = threading.Thread(target=lambda: woke.append(b.wait_revocations(120)))
        waiter.start()
        a.add_revocation_events("A", [("n1", RevocationEvent("l1", "acme", "ds1", "r"))],
                                now_ms=NOW, keep_ms=1000)
        waiter.join(timeout=150)
        assert woke == [True]  # woken by the commit, long before the 120 s timeout
    finally:
        a.close()
        b.close()


def test_a_value_postgresql_cannot_hold_is_invalid_and_changes_nothing(
        postgres_cluster) -> None:  # noqa: F811
    from kms_broker.domain.errors import InvalidArgument

    repo = PostgresRepository(fresh_database(postgres_cluster))
    try:
        _tenant(repo)
        with pytest.raises(InvalidArgument, match="cannot hold"):
            repo.put_policy("acme", "d1", "text with a \x00 NUL")
        assert repo.get_policy("acme", "d1") is None
    finally:
        repo.close()


def test_postgresql_migration_records_the_manifest_key_version_only_when_unambiguous(
        postgres_cluster) -> None:  # noqa: F811
    """A PostgreSQL state store from before the manifest's key version was recorded (every
    migration but the last applied): a dataset with one key version gets it; one with several
    stays unknown (0: the broker then names no manifest, and the job must); one without a
    manifest stays 0. As the SQLite store's migration (test_units.py)."""
    import psycopg

    from kms_broker.state.postgres import MIGRATIONS

    dsn = fresh_database(postgres_cluster)
    with psycopg.connect(dsn, autocommit=True) as conn, conn.transaction():
        conn.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY)")
        for version, script in enumerate(MIGRATIONS[:-1], start=1):
            conn.execute(script)
            conn.execute("INSERT INTO schema_migrations VALUES (%s)", (version,))
        conn.execute("INSERT INTO tenants VALUES ('acme', '\\x00', 1, 'active', 0, '')")
        for ds, manifest, versions in (("one", "manifests/m1", (1,)),
                                       ("two", "manifests/m2", (1, 2)),
                                       ("bare", "", (1,))):
            conn.execute("INSERT INTO datasets VALUES ('acme', %s, 0, 1, %s, '', '[]', "
                         "'active', 0)", (ds, manifest))
            for v in versions:
                conn.execute("INSERT INTO dataset_shares VALUES ('acme', %s, %s, 1, '\\x00')",
                             (ds, v))
    repo = PostgresRepository(dsn)
    try:
        assert repo.schema_version() == len(MIGRATIONS)
        got = {ds: repo.get_dataset("acme", ds) for ds in ("one", "two", "bare")}
        assert got["one"].manifest_key_version == 1
        assert got["one"].manifest_name == "manifests/m1"
        assert got["two"].manifest_key_version == 0
        assert got["bare"].manifest_key_version == 0
    finally:
        repo.close()
