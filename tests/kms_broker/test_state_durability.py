"""Security state (consumed nonces, revocations, leases) is durable before an answer leaves:
the broker's SQLite connection commits with ``synchronous=FULL`` (NORMAL in WAL mode may lose
the last commits on power loss, undoing a revocation whose audit record was already synced).
Kill -9 at every phase is shown by test_kill_faults.py."""

from __future__ import annotations

from pathlib import Path

from kms_broker.state.sqlite import SqliteRepository


def test_every_commit_is_synced(tmp_path: Path) -> None:
    repo = SqliteRepository(tmp_path / "broker.db")
    try:
        assert repo._db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert repo._db.execute("PRAGMA synchronous").fetchone() == (2,)  # FULL
    finally:
        repo.close()
