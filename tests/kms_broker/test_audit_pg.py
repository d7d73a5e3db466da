"""The audit log in PostgreSQL (kms_broker.audit_pg) on a real server: one chain from several
appenders (replicas), signed checkpoints, verification through the file log's verifier, the
HSM anchor, fail-closed appends (a bad last record, the database down), appends that join the
repository's unit of work, and offline ``kms-broker audit verify|tail --state postgresql://``
(or ``--config broker.yaml``) as a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from compose.postgres import LocalPostgres
from kms_broker.app import open_pg_audit
from kms_broker.audit import Anchor, AuditTruncated, check_anchor, tail_log, verify_log
from kms_broker.audit_pg import PgAuditLog
from kms_broker.domain.errors import AlreadyExists, Unavailable
from kms_broker.domain.model import Tenant
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
    return PgAuditLog(repo.transactions, now_ms=lambda: 1000, sign=hsm.sign,
                      checkpoint_every=every,
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


def _tenant(tenant_id: str) -> Tenant:
    return Tenant(tenant_id=tenant_id, signing_public_key=b"k" * 32, kek_version=1,
                  status="active", created_ms=1)


def test_a_unit_of_work_commits_the_change_with_its_record_or_neither(repos) -> None:
    repo, other = repos
    log = _log(repo, FakeHsm())
    with repo.unit_of_work():
        repo.add_tenant(_tenant("t1"))
        log.append("register_tenant", actor="tenant:t1", subject="tenant:t1",
                   outcome="allowed")
        # another connection (another replica) sees neither before the commit
        assert other.get_tenant("t1") is None and tail_log(_log(other, FakeHsm()).path, 9) == []
    assert other.get_tenant("t1") is not None
    assert [r["subject"] for r in tail_log(log.path, 9)] == ["tenant:t1"]

    with pytest.raises(RuntimeError), repo.unit_of_work():  # fails after both
        repo.add_tenant(_tenant("t2"))
        log.append("register_tenant", actor="tenant:t2", subject="tenant:t2",
                   outcome="allowed")
        raise RuntimeError("the action failed after its record")
    with pytest.raises(AlreadyExists), repo.unit_of_work():  # the change fails after the record
        log.append("register_tenant", actor="tenant:t1", subject="tenant:t1-again",
                   outcome="allowed")
        repo.add_tenant(_tenant("t1"))
    assert other.get_tenant("t2") is None
    assert [r["subject"] for r in tail_log(log.path, 9)] == ["tenant:t1"]
    assert verify_log(log.path).ok


def test_a_unit_of_work_that_cannot_commit_is_unavailable_and_leaves_nothing() -> None:
    pg = LocalPostgres().start()
    try:
        repo = PostgresRepository(pg.dsn, pool_timeout_s=2)
        log = _log(repo, FakeHsm())
        with pytest.raises(Unavailable), repo.unit_of_work():
            repo.add_tenant(_tenant("t1"))
            log.append("register_tenant", actor="tenant:t1", subject="tenant:t1",
                       outcome="allowed")
            pg.stop("immediate")  # the server goes before the commit
        pg.start()
        with psycopg.connect(pg.dsn) as c:
            assert c.execute("SELECT count(*) FROM tenants").fetchone()[0] == 0
            assert c.execute("SELECT count(*) FROM audit_log").fetchone()[0] == 0
        repo.close()
    finally:
        pg.destroy()


# ------------------------------------------------- offline `kms-broker audit verify`
def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kms_broker.cli", "audit", *args],
                          capture_output=True, text=True, timeout=120, check=False)


def _sealed_log(repo: PostgresRepository, hsm: FakeHsm) -> PgAuditLog:
    log = _log(repo, hsm, every=4)
    for n in range(10):
        log.append("release", actor="node:n1", subject=f"dataset:acme/ds@v{n}",
                   outcome="allowed")
    log.seal()
    return log


def test_offline_verify_reads_the_postgresql_log(repos, tmp_path: Path) -> None:
    repo = repos[0]
    hsm = FakeHsm()
    _sealed_log(repo, hsm)
    dsn = repo._dsn
    key = hsm.signing_public_key().hex()
    ok = _cli("verify", "--state", dsn, "--public-key", key)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("OK:")
    unauthenticated = _cli("verify", "--state", dsn)
    assert unauthenticated.returncode == 2, unauthenticated.stderr
    # the same through the broker's own config file
    cfg = tmp_path / "broker.yaml"
    cfg.write_text(yaml_config(tmp_path, dsn))
    via_config = _cli("verify", "--config", str(cfg), "--public-key", key, "--format", "json")
    assert via_config.returncode == 0, via_config.stderr
    assert json.loads(via_config.stdout)["status"] == "OK"
    tail = _cli("tail", "--state", dsn, "--limit", "3", "--format", "json")
    assert tail.returncode == 0, tail.stderr
    assert [r["seq"] for r in json.loads(tail.stdout)["records"]] == [11, 12, 13]
    with psycopg.connect(dsn) as c:  # verification changed nothing
        assert c.execute("SELECT count(*) FROM audit_log").fetchone()[0] == 13


def yaml_config(tmp: Path, dsn: str) -> str:
    """A broker.yaml naming ``dsn`` as its state (the rest is never opened by audit verify)."""
    import yaml

    for name in ("ca.pem", "cert.pem", "key.pem"):
        (tmp / name).write_text("unused\n")
    return yaml.safe_dump({
        "listen": "127.0.0.1:0", "state_dir": str(tmp / "state"), "state": dsn,
        "tls": {"ca": str(tmp / "ca.pem"), "cert": str(tmp / "cert.pem"),
                "key": str(tmp / "key.pem")},
        "hsm": {"module": "/nonexistent.so", "token_label": "t", "pin_file": str(tmp / "pin")},
    })

def test_offline_verify_finds_edits_cut_records_and_a_forged_anchor(repos) -> None:
    repo = repos[0]
    hsm = FakeHsm()
    _sealed_log(repo, hsm)
    dsn, key = repo._dsn, hsm.signing_public_key().hex()
    with repo.pool.connection() as c:
        c.execute("UPDATE audit_log SET line = convert_to(replace(convert_from(line, 'UTF8'), "
                  "'ds@v3', 'ds@v7'), 'UTF8') WHERE seq=4")
    edited = _cli("verify", "--state", dsn, "--public-key", key)
    assert edited.returncode == 1 and edited.stdout.startswith("TAMPERED"), edited.stdout
    with repo.pool.connection() as c:  # undo the edit, then cut the anchored end
        c.execute("UPDATE audit_log SET line = convert_to(replace(convert_from(line, 'UTF8'), "
                  "'ds@v7', 'ds@v3'), 'UTF8') WHERE seq=4")
    assert _cli("verify", "--state", dsn, "--public-key", key).returncode == 0
    with repo.pool.connection() as c:
        c.execute("DELETE FROM audit_log WHERE seq >= 12")
    cut = _cli("verify", "--state", dsn, "--public-key", key)
    assert cut.returncode == 1 and "TAMPERED" in cut.stdout, cut.stdout
    with repo.pool.connection() as c:  # an anchor moved back to the new end: not signed
        c.execute("UPDATE audit_anchor SET seq = 11, hash = (SELECT hash FROM audit_log "
                  "WHERE seq = 11)")
    forged = _cli("verify", "--state", dsn, "--public-key", key)
    assert forged.returncode == 1 and "not signed" in forged.stdout, forged.stdout
    with repo.pool.connection() as c:
        c.execute("DELETE FROM audit_anchor")
    unanchored = _cli("verify", "--state", dsn, "--public-key", key)
    assert unanchored.returncode == 1 and "no signed anchor" in unanchored.stdout


def test_offline_verify_refuses_bad_state_clearly(postgres_cluster) -> None:  # noqa: F811
    empty = fresh_database(postgres_cluster)
    none = _cli("verify", "--state", empty)
    assert none.returncode == 1 and "no audit log" in none.stderr, none.stderr
    with psycopg.connect(empty) as c:  # read only: nothing created
        assert c.execute("SELECT count(*) FROM information_schema.tables WHERE "
                         "table_schema = current_schema()").fetchone()[0] == 0
    secret = _cli("verify", "--state", "postgresql://u:hunter2@127.0.0.1/db")
    assert secret.returncode == 2 and "password" in secret.stderr
    assert "hunter2" not in secret.stderr + secret.stdout
    down = _cli("verify", "--state", "postgresql://u@127.0.0.1:1/db?connect_timeout=5")
    assert down.returncode == 3 and "cannot connect" in down.stderr, down.stderr
