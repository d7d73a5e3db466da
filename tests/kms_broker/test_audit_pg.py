"""The audit log in PostgreSQL (kms_broker.audit_pg) on a real server: one chain from several
appenders (replicas), signed checkpoints, verification through the file log's verifier, the
HSM anchor, and fail-closed appends (a bad last record, the database down)."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import psycopg
import pytest

from compose.postgres import LocalPostgres
from kms_broker.app import open_pg_audit
from kms_broker.audit import Anchor, AuditTruncated, check_anchor, tail_log, verify_log
from kms_broker.audit_pg import PgAuditLog
from kms_broker.domain.errors import Unavailable
from kms_broker.hsm.fake import FakeHsm
from kms_broker.state.postgres import PostgresRepository
from tests.kms_broker.pg_fixtures import fresh_database, postgres_cluster  # noqa: F401


@pytest.fixture
def repos(postgres_cluster) -> Iterator[tuple[PostgresRepository, PostgresRepository]]:  # noqa: F811
    dsn = fresh_database(postgres_cluster)
    a, b = PostgresRepository(dsn), PostgresRepository(dsn)
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def _log(repo: PostgresRepository, hsm: FakeHsm, every: int = 8) -> PgAuditLog:
    return PgAuditLog(repo.pool, now_ms=lambda: 1000, sign=hsm.sign, checkpoint_every=every,
                      anchor=lambda s, h: hsm.set_audit_anchor(s, bytes.fromhex(h)))


def test_two_appenders_write_one_verifiable_chain(repos) -> None:
    hsm = FakeHsm()
    logs = [_log(repos[0], hsm), _log(repos[1], hsm)]

    def appender(i: int) -> None:
        for n in range(25):
            logs[i % 2].append("release", actor=f"node:n{i}", subject=f"s{n}",
                               outcome="allowed")

    threads = [threading.Thread(target=appender, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    seq = logs[0].seal()
    records = tail_log(logs[1].path, 10_000)
    assert [r["seq"] for r in records] == list(range(1, seq + 1))
    assert sum(r["event"] == "release" for r in records) == 100
    assert sum(r["event"] == "checkpoint" for r in records) >= 100 // 8
    result = verify_log(logs[0].path, hsm.signing_public_key(),
                        Anchor(*_held(hsm)))
    assert result.ok and result.authenticated, result.problem
    assert _held(hsm)[0] == seq


def _held(hsm: FakeHsm) -> tuple[int, str]:
    seq, digest = hsm.audit_anchor()
    return seq, digest.hex()


def test_edits_and_cut_records_are_found(repos, postgres_cluster) -> None:  # noqa: F811
    hsm = FakeHsm()
    log = _log(repos[0], hsm, every=1000)
    for n in range(6):
        log.append("attest", actor="node:n1", subject=f"session:{n}", outcome="allowed")
    log.seal()  # anchors record 7 (a checkpoint)
    with repos[0].pool.connection() as c:
        c.execute("UPDATE audit_log SET line = convert_to(replace(convert_from(line, 'UTF8'), "
                  "'session:2', 'session:9'), 'UTF8') WHERE seq=3")
    result = verify_log(log.path, hsm.signing_public_key())
    assert not result.ok and result.first_bad_seq == 3 and "edited" in result.problem
    with repos[0].pool.connection() as c:
        c.execute("DELETE FROM audit_log WHERE seq>=3")
    assert "deleted from its end" in check_anchor(log.path, Anchor(*_held(hsm)))
    with pytest.raises(AuditTruncated, match="HSM anchor"):
        open_pg_audit(repos[1], hsm, lambda: 1000)


def test_a_bad_last_record_is_never_chained_onto(repos) -> None:
    hsm = FakeHsm()
    log = _log(repos[0], hsm)
    log.append("attest", actor="node:n1", subject="s", outcome="allowed")
    with repos[0].pool.connection() as c:
        c.execute("UPDATE audit_log SET line = 'garbage'::bytea WHERE seq=1")
    with pytest.raises(Unavailable, match="not a valid audit record"):
        log.append("attest", actor="node:n1", subject="s2", outcome="allowed")
    with repos[0].pool.connection() as c:
        assert c.execute("SELECT COUNT(*) FROM audit_log").fetchone()[0] == 1


def test_database_down_is_unavailable_then_recovers() -> None:
    pg = LocalPostgres().start()
    try:
        repo = PostgresRepository(pg.dsn, pool_timeout_s=2)
        hsm = FakeHsm()
        log = _log(repo, hsm)
        log.append("attest", actor="node:n1", subject="s1", outcome="allowed")
        pg.stop("fast")
        with pytest.raises(Unavailable):
            log.append("attest", actor="node:n1", subject="s2", outcome="allowed")
        pg.start()
        for _ in range(200):  # the pool reconnects in the background (hang guard only)
            try:
                log.append("attest", actor="node:n1", subject="s3", outcome="allowed")
                break
            except Unavailable:
                threading.Event().wait(0.1)
        with psycopg.connect(pg.dsn) as c:
            subjects = [r[0] for r in c.execute(
                "SELECT convert_from(line, 'UTF8')::json->>'subject' FROM audit_log "
                "ORDER BY seq")]
        assert subjects == ["s1", "s3"]  # nothing half-written while it was down
        assert verify_log(log.path).ok
        repo.close()
    finally:
        pg.destroy()
