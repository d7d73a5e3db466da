"""The hash-chained audit log in PostgreSQL, shared by broker replicas (``state:
postgresql://...``; :mod:`kms_broker.audit` is the file log, and the record format, chain,
checkpoints and anchors are the same).

Table ``audit_log``::

    seq   BIGINT PRIMARY KEY    1, 2, 3, ... without gaps
    hash  TEXT NOT NULL         the record's hash (hex), for the head lookup
    line  BYTEA NOT NULL        the record exactly as the file log writes it: canonical JSON
                                of seq, time_ms, prev, event, actor, subject, outcome,
                                reason[, sig], hash (see kms_broker.audit), without "\\n"

An append takes a transaction-scoped advisory lock (replicas append in turn), reads the head
(the last row, re-checked: its hash must match its content, or nothing is chained onto it and
the append fails with ``Unavailable``) and inserts the next record. Outside a unit of work it
is one transaction of its own, durable (``synchronous_commit`` on) before
:meth:`PgAuditLog.append` returns (write-before-act, as with the file log). Inside the
repository's unit of work (:meth:`kms_broker.state.postgres.PostgresRepository.unit_of_work`,
the same :class:`~kms_broker.state.postgres.PgTransactions`), the record joins the
transaction of the action it records: the action's state change and its record commit
together or not at all (the lock is held to that commit, so the domain appends last). Any
database error, a refusing trigger included, is ``Unavailable`` (fail closed).

Every ``checkpoint_every`` records, and at :meth:`seal`, a checkpoint signed by the HSM over
the head is inserted under the same lock; :meth:`seal` then stores the head as the HSM
anchor (``Hsm.set_audit_anchor``, never moving back), which the broker checks at start
(:func:`kms_broker.app.check_audit_anchor` works on this log through
:meth:`PgAuditLog.lines`).

Table ``audit_anchor`` (one row, ``id = 1``) holds the head last anchored on the HSM, signed
by the broker key over :func:`kms_broker.audit.anchor_message` (``seq BIGINT, hash TEXT,
sig BYTEA``; it only moves forward), the counterpart of the file log's ``audit.anchor`` for
offline ``kms-broker audit verify --state postgresql://...`` (:func:`read_pg_audit`).

:func:`kms_broker.audit.verify_log`, ``check_anchor`` and ``tail_log`` read this log through
``PgAuditLog.path`` (an object with ``lines()``), so ``VerifyAudit``/``TailAudit`` and
``kms-broker audit verify --broker`` work unchanged.

Deleting or editing rows needs write access to the database: an edit breaks the chain at that
record, deleting rows from the end is caught by the HSM anchor up to the last seal, as for the
file log.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
from psycopg_pool import PoolTimeout

from kms_broker.audit import GENESIS, Anchor, _record_hash, anchor_message, checkpoint_message
from kms_broker.domain.errors import Unavailable
from kms_broker.encoding import canonical_json
from kms_broker.state.postgres import PgTransactions

__all__ = ["PgAuditLog", "read_pg_audit"]

_LOCK_NS, _LOCK_AUDIT = 0x6B6D73, 3  # kms_broker.state.postgres uses 1 and 2
SCHEMA = """
CREATE TABLE IF NOT EXISTS audit_log (
    seq BIGINT PRIMARY KEY, hash TEXT NOT NULL, line BYTEA NOT NULL);
CREATE TABLE IF NOT EXISTS audit_anchor (
    id SMALLINT PRIMARY KEY CHECK (id = 1), seq BIGINT NOT NULL, hash TEXT NOT NULL,
    sig BYTEA NOT NULL)
"""


class _Lines:
    """What verify_log/check_anchor/tail_log read: the records, one line each, in order."""

    def __init__(self, log: PgAuditLog) -> None:
        self._log = log

    def lines(self) -> Iterator[bytes]:
        return self._log.lines()

    def __str__(self) -> str:
        return "audit_log (PostgreSQL)"


class PgAuditLog:
    def __init__(self, transactions: PgTransactions, *, now_ms: Callable[[], int],
                 sign: Callable[[bytes], bytes] | None = None, checkpoint_every: int = 64,
                 anchor: Callable[[int, str], None] | None = None) -> None:
        self._tx = transactions
        self._now_ms = now_ms
        self._sign = sign
        self._every = checkpoint_every
        self._anchor = anchor
        self._anchored = -1
        self.path = _Lines(self)
        self._run(lambda c: c.execute(SCHEMA))

    def _run(self, fn: Callable[[psycopg.Connection], Any]) -> Any:
        try:
            with self._tx.transaction() as conn:
                return fn(conn)
        except (psycopg.Error, PoolTimeout) as exc:  # a refusing trigger too: fail closed
            raise Unavailable(f"audit log unavailable: {type(exc).__name__}") from None

    # ------------------------------------------------------------------ reading
    def lines(self) -> Iterator[bytes]:
        """Every record's line in order (fetched in pages, so a long log is not held)."""
        after = 0
        while True:
            rows = self._run(lambda c, a=after: c.execute(
                "SELECT seq, line FROM audit_log WHERE seq>%s ORDER BY seq LIMIT 1000",
                (a,)).fetchall())
            if not rows:
                return
            for seq, line in rows:
                after = seq
                yield bytes(line)

    @property
    def head(self) -> tuple[int, str]:
        return self._run(self._head)

    @staticmethod
    def _head(c: psycopg.Connection) -> tuple[int, str]:
        row = c.execute("SELECT seq, hash, line FROM audit_log ORDER BY seq DESC LIMIT 1"
                        ).fetchone()
        if row is None:
            return 0, GENESIS
        seq, stored, line = row
        try:  # never chain onto a last record that does not match its content
            rec = json.loads(bytes(line))
            if rec.pop("hash") != stored or rec["seq"] != seq or \
                    _record_hash(rec["prev"], rec) != stored:
                raise ValueError("inconsistent")
        except (ValueError, KeyError, TypeError, AttributeError):
            raise Unavailable("audit log unavailable: its last record is not a valid audit "
                              "record") from None
        return seq, stored

    # ------------------------------------------------------------------ writing
    def append(self, event: str, *, actor: str, subject: str, outcome: str,
               reason: str = "") -> int:
        """Commit one record (durable on return); ``Unavailable`` and nothing written if any
        step fails."""
        def op(c: psycopg.Connection) -> int:
            c.execute("SELECT pg_advisory_xact_lock(%s, %s)", (_LOCK_NS, _LOCK_AUDIT))
            seq, head = self._head(c)
            seq, head = self._insert(c, seq, head, event, actor, subject, outcome,
                                     reason[:1000], None)
            if self._sign is not None and self._every and seq % self._every == 0:
                self._insert_checkpoint(c, seq, head)
            return seq

        return self._run(op)

    def write(self, event: str, *, actor: str, subject: str, outcome: str,
              reason: str = "") -> int:
        """As :meth:`append` (a commit is durable already; see :meth:`wait_durable`)."""
        return self.append(event, actor=actor, subject=subject, outcome=outcome, reason=reason)

    def wait_durable(self, seq: int) -> None:
        """Nothing to wait for: :meth:`write` returned after the commit."""

    def _insert(self, c: psycopg.Connection, seq: int, head: str, event: str, actor: str,
                subject: str, outcome: str, reason: str, sig: str | None) -> tuple[int, str]:
        body: dict[str, Any] = {
            "seq": seq + 1, "time_ms": self._now_ms(), "prev": head, "event": event,
            "actor": actor, "subject": subject, "outcome": outcome, "reason": reason,
        }
        if sig is not None:
            body["sig"] = sig
        digest = _record_hash(head, body)
        c.execute("INSERT INTO audit_log VALUES (%s, %s, %s)",
                  (seq + 1, digest, canonical_json({**body, "hash": digest})))
        return seq + 1, digest

    def _insert_checkpoint(self, c: psycopg.Connection, seq: int, head: str) -> tuple[int, str]:
        assert self._sign is not None
        sig = self._sign(checkpoint_message(head, seq + 1)).hex()
        return self._insert(c, seq, head, "checkpoint", "broker", f"seq:{seq}", "ok", "", sig)

    def checkpoint(self) -> None:
        """A signed checkpoint now (e.g. at shutdown), then the head anchored (:meth:`seal`)."""
        if self._sign is None:
            return

        def op(c: psycopg.Connection) -> None:
            c.execute("SELECT pg_advisory_xact_lock(%s, %s)", (_LOCK_NS, _LOCK_AUDIT))
            self._insert_checkpoint(c, *self._head(c))

        self._run(op)
        self.seal()

    def seal(self) -> int:
        """Checkpoint the head unless the last record is a checkpoint, then anchor it on the
        HSM (inside the lock, so replicas' anchors only move forward). The anchored seq."""
        def op(c: psycopg.Connection) -> tuple[int, str]:
            c.execute("SELECT pg_advisory_xact_lock(%s, %s)", (_LOCK_NS, _LOCK_AUDIT))
            seq, head = self._head(c)
            if self._sign is not None and seq > 0:
                last = c.execute("SELECT line FROM audit_log WHERE seq=%s", (seq,)).fetchone()
                if json.loads(bytes(last[0])).get("event") != "checkpoint":
                    seq, head = self._insert_checkpoint(c, seq, head)
            return seq, head

        seq, head = self._run(op)
        if self._anchor is not None and seq > self._anchored:
            self._anchor(seq, head)
            if self._sign is not None:  # for offline verification, after the HSM anchor
                self._store_signed_anchor(Anchor(seq, head,
                                                 self._sign(anchor_message(seq, head))))
            self._anchored = seq
        return seq

    def _store_signed_anchor(self, anchor: Anchor) -> None:
        self._run(lambda c: c.execute(
            "INSERT INTO audit_anchor VALUES (1, %s, %s, %s) ON CONFLICT (id) DO UPDATE SET "
            "seq=EXCLUDED.seq, hash=EXCLUDED.hash, sig=EXCLUDED.sig "
            "WHERE audit_anchor.seq < EXCLUDED.seq", (anchor.seq, anchor.hash, anchor.sig)))

    def close(self) -> None:
        """The pool belongs to the repository; nothing of its own to close."""


class _OfflineLines:
    def __init__(self, conn: psycopg.Connection) -> None:
        self._conn = conn

    def lines(self) -> Iterator[bytes]:
        after = 0
        while True:
            rows = self._conn.execute(
                "SELECT seq, line FROM audit_log WHERE seq>%s ORDER BY seq LIMIT 1000",
                (after,)).fetchall()
            if not rows:
                return
            for seq, line in rows:
                after = seq
                yield bytes(line)

    def __str__(self) -> str:
        return "audit_log (PostgreSQL)"


def read_pg_audit(conn: psycopg.Connection) -> tuple[Any, Anchor | None]:
    """For offline verification on a connection of its own (read only, nothing created):
    the log (an object with ``lines()`` for :func:`kms_broker.audit.verify_log`) and its
    signed anchor (None when none was stored). ``ValueError`` when the database holds no
    audit log, or a malformed anchor."""
    tables = {r[0] for r in conn.execute(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = "
        "current_schema() AND table_name IN ('audit_log', 'audit_anchor')")}
    if "audit_log" not in tables:
        raise ValueError("the database holds no audit log (table audit_log)")
    anchor = None
    if "audit_anchor" in tables:
        row = conn.execute("SELECT seq, hash, sig FROM audit_anchor WHERE id=1").fetchone()
        if row is not None:
            seq, digest, sig = row
            try:
                if seq < 0 or len(bytes.fromhex(digest)) != 32:
                    raise ValueError("bad field")
            except (ValueError, TypeError):
                raise ValueError("the stored audit anchor is malformed") from None
            anchor = Anchor(seq, digest, bytes(sig))
    return _OfflineLines(conn), anchor
