"""Security state (consumed nonces, revocations, leases) is durable before an answer leaves:
the broker's SQLite connection commits with ``synchronous=FULL`` (NORMAL in WAL mode may lose
the last commits on power loss, undoing a revocation whose audit record was already synced).
Two writes skip the wait, because losing them only makes a later step fail closed: a new
session and its verified claims. Kill -9 at every phase is shown by test_kill_faults.py."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from kms_broker.domain.errors import AlreadyExists
from kms_broker.domain.model import Node, Session
from kms_broker.state.sqlite import SqliteRepository

DEADLINE_S = 60  # a guard on waits, never an assertion about speed


def test_every_commit_is_synced(tmp_path: Path) -> None:
    repo = SqliteRepository(tmp_path / "broker.db")
    try:
        assert repo._db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert repo._db.execute("PRAGMA synchronous").fetchone() == (2,)  # FULL
    finally:
        repo.close()


def test_unsynced_writes_leave_the_connection_synced(tmp_path: Path) -> None:
    """A session and its claims commit without waiting for the disk; every other write
    (a consumed nonce among them) still does, also after one of them failed."""
    repo = SqliteRepository(tmp_path / "broker.db")
    try:
        repo.put_node(Node(node_id="n1", tenant_scope="", ak_public=b"ak", ek_certificate=b"ek",
                           revoked=False, enrolled_ms=0))
        session = Session(session_id="s1", node_id="n1", job_id="j", nonce=b"n" * 32,
                          expires_ms=10**15)
        repo.add_session(session)
        assert repo._db.execute("PRAGMA synchronous").fetchone() == (2,)
        with pytest.raises(AlreadyExists):
            repo.add_session(session)  # the same id again: refused, and FULL again after
        assert repo._db.execute("PRAGMA synchronous").fetchone() == (2,)
        repo.put_session_claims("s1", b"{}")
        assert repo._db.execute("PRAGMA synchronous").fetchone() == (2,)
        assert repo.get_session_claims("s1") == b"{}"
        consumed = repo.consume_session("s1", "n1")
        assert consumed is not None and not consumed.used
        assert repo.consume_session("s1", "n1").used  # type: ignore[union-attr]
    finally:
        repo.close()


def test_release_path_writers_take_turns_across_connections(tmp_path: Path) -> None:
    """Two repositories on one file (as two broker workers have): while one holds its writer
    turn, the other's release-path writes (a session, a consumed nonce) wait for it rather
    than for SQLite's busy handler, then commit once it is released; a read needs no turn."""
    first = SqliteRepository(tmp_path / "broker.db")
    second = SqliteRepository(tmp_path / "broker.db")
    try:
        first.put_node(Node(node_id="n1", tenant_scope="", ak_public=b"ak",
                            ek_certificate=b"ek", revoked=False, enrolled_ms=0))
        session = Session(session_id="s1", node_id="n1", job_id="j", nonce=b"n" * 32,
                          expires_ms=10**15)
        done = threading.Event()

        def write() -> None:
            second.add_session(session)
            second.consume_session("s1", "n1", durable=True)
            done.set()

        with first._lock, first._writer_turn():
            writer = threading.Thread(target=write)
            writer.start()
            reader = SqliteRepository(tmp_path / "broker.db")  # a third worker
            try:
                assert reader.get_node("n1") is not None  # reads go on meanwhile
            finally:
                reader.close()
            assert not done.wait(0.3)  # still waiting for the turn
            assert first.get_session("s1") is None
        writer.join(DEADLINE_S)
        assert done.is_set()
        stored = first.get_session("s1")
        assert stored is not None and stored.used
        assert (tmp_path / "broker.db.writers").exists()
    finally:
        first.close()
        second.close()
