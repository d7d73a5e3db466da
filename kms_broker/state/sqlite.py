"""SQLite implementation of :class:`kms_broker.state.repository.Repository`.

WAL journal with ``synchronous=FULL`` (every commit is durable before it returns, so state a
caller answers on cannot be undone by a power loss; two writes whose loss only makes a later
step fail closed, a new session and its verified claims, skip the wait: :func:`_unsynced`),
foreign keys on, schema versioned in
``schema_migrations``. One connection guarded by a lock (the gRPC thread pool shares it);
``sqlite3.OperationalError`` (disk full, locked, unreadable) becomes ``Unavailable`` so
callers fail closed. Several broker worker processes may share the file (``kms-broker serve
--workers N``): every write transaction begins IMMEDIATE, and checks that must hold across
processes (single-use nonces, lease room) are single statements or one IMMEDIATE transaction.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from kms_broker.domain.errors import AlreadyExists, Unavailable
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
from kms_broker.state.repository import check_still_authorized

__all__ = ["SqliteRepository"]

MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE tenants (
        tenant_id TEXT PRIMARY KEY, signing_public_key BLOB NOT NULL,
        kek_version INTEGER NOT NULL, status TEXT NOT NULL, created_ms INTEGER NOT NULL);
    CREATE TABLE datasets (
        tenant_id TEXT NOT NULL REFERENCES tenants(tenant_id), dataset_id TEXT NOT NULL,
        share_index INTEGER NOT NULL, share_count INTEGER NOT NULL,
        manifest_name TEXT NOT NULL, store_uri TEXT NOT NULL, holders TEXT NOT NULL,
        status TEXT NOT NULL, created_ms INTEGER NOT NULL,
        PRIMARY KEY (tenant_id, dataset_id));
    CREATE TABLE dataset_shares (
        tenant_id TEXT NOT NULL, dataset_id TEXT NOT NULL, key_version INTEGER NOT NULL,
        kek_version INTEGER NOT NULL, wrapped_share BLOB NOT NULL,
        PRIMARY KEY (tenant_id, dataset_id, key_version),
        FOREIGN KEY (tenant_id, dataset_id) REFERENCES datasets(tenant_id, dataset_id)
            ON DELETE CASCADE);
    CREATE TABLE uploads (
        upload_id TEXT PRIMARY KEY, tenant_id TEXT NOT NULL REFERENCES tenants(tenant_id),
        dataset_id TEXT NOT NULL, key_version INTEGER NOT NULL, share_index INTEGER NOT NULL,
        share_count INTEGER NOT NULL, expires_ms INTEGER NOT NULL, committed INTEGER NOT NULL,
        import_public_key BLOB NOT NULL);
    CREATE TABLE nodes (
        node_id TEXT PRIMARY KEY, tenant_scope TEXT NOT NULL, ak_public BLOB NOT NULL,
        ek_certificate BLOB NOT NULL, revoked INTEGER NOT NULL, enrolled_ms INTEGER NOT NULL);
    CREATE TABLE sessions (
        session_id TEXT PRIMARY KEY, node_id TEXT NOT NULL REFERENCES nodes(node_id),
        job_id TEXT NOT NULL, nonce BLOB NOT NULL, expires_ms INTEGER NOT NULL,
        used INTEGER NOT NULL, claims BLOB);
    CREATE TABLE policies (
        tenant_id TEXT NOT NULL REFERENCES tenants(tenant_id), digest TEXT NOT NULL,
        text TEXT NOT NULL, PRIMARY KEY (tenant_id, digest));
    CREATE TABLE grants (
        grant_id TEXT PRIMARY KEY, tenant_id TEXT NOT NULL REFERENCES tenants(tenant_id),
        dataset_id TEXT NOT NULL, job_id TEXT NOT NULL, policy_digest TEXT NOT NULL,
        max_nodes INTEGER NOT NULL, expires_ms INTEGER NOT NULL, revoked INTEGER NOT NULL,
        document BLOB NOT NULL, signature BLOB NOT NULL);
    CREATE INDEX grants_by_job ON grants(job_id, dataset_id);
    CREATE TABLE leases (
        lease_id TEXT PRIMARY KEY, node_id TEXT NOT NULL, grant_id TEXT NOT NULL,
        tenant_id TEXT NOT NULL, dataset_id TEXT NOT NULL, expires_ms INTEGER NOT NULL,
        revoked INTEGER NOT NULL);
    CREATE INDEX leases_by_grant ON leases(grant_id, expires_ms);
    """,
    """
    CREATE TABLE revocation_events (
        id INTEGER PRIMARY KEY AUTOINCREMENT, origin TEXT NOT NULL, node_id TEXT NOT NULL,
        lease_id TEXT NOT NULL, tenant_id TEXT NOT NULL, dataset_id TEXT NOT NULL,
        reason TEXT NOT NULL, created_ms INTEGER NOT NULL);
    """,
    """
    ALTER TABLE tenants ADD COLUMN binding_sig BLOB NOT NULL DEFAULT x'';
    ALTER TABLE nodes ADD COLUMN binding_sig BLOB NOT NULL DEFAULT x'';
    """,
    # grant ids are scoped per tenant: two tenants may each have a grant "g1", and creating
    # one never tells a tenant that another tenant's id exists
    """
    CREATE TABLE grants_by_tenant (
        grant_id TEXT NOT NULL, tenant_id TEXT NOT NULL REFERENCES tenants(tenant_id),
        dataset_id TEXT NOT NULL, job_id TEXT NOT NULL, policy_digest TEXT NOT NULL,
        max_nodes INTEGER NOT NULL, expires_ms INTEGER NOT NULL, revoked INTEGER NOT NULL,
        document BLOB NOT NULL, signature BLOB NOT NULL, PRIMARY KEY (tenant_id, grant_id));
    INSERT INTO grants_by_tenant SELECT * FROM grants;
    DROP TABLE grants;
    ALTER TABLE grants_by_tenant RENAME TO grants;
    CREATE INDEX grants_by_job ON grants(job_id, dataset_id);
    CREATE INDEX sessions_by_expiry ON sessions(expires_ms);
    CREATE INDEX sessions_by_node ON sessions(node_id, used, expires_ms);
    CREATE INDEX uploads_by_expiry ON uploads(expires_ms);
    CREATE INDEX uploads_by_tenant ON uploads(tenant_id, committed, expires_ms);
    CREATE INDEX leases_by_expiry ON leases(expires_ms);
    """,
    # which key version the registered manifest belongs to, so a node can learn the manifest
    # from the broker (ChallengeResponse.manifest_name); an older row is known only when the
    # dataset has a single key version
    """
    ALTER TABLE datasets ADD COLUMN manifest_key_version INTEGER NOT NULL DEFAULT 0;
    UPDATE datasets SET manifest_key_version = (
        SELECT MIN(s.key_version) FROM dataset_shares s
        WHERE s.tenant_id = datasets.tenant_id AND s.dataset_id = datasets.dataset_id)
    WHERE manifest_name != '' AND (
        SELECT COUNT(*) FROM dataset_shares s
        WHERE s.tenant_id = datasets.tenant_id AND s.dataset_id = datasets.dataset_id) = 1;
    """,
)

# nodes.revoked: 0 active, 1 revoked (sticky: re-enrolment refused), 2 revoked and reinstated
# by an operator (still refused every request; the next enrolment replaces the row)
NODE_ACTIVE, NODE_REVOKED, NODE_REINSTATED = 0, 1, 2

T = TypeVar("T")


def _mapped(exc: sqlite3.Error) -> Exception:
    """SQLite's errors as the domain's: a constraint -> AlreadyExists, anything operational
    (locked, disk, I/O) -> Unavailable; any other SQLite error is returned unchanged."""
    if isinstance(exc, sqlite3.IntegrityError):
        return AlreadyExists(f"already exists or violates a reference: {exc}")
    if isinstance(exc, sqlite3.OperationalError):
        return Unavailable(f"state store unavailable: {exc}")
    return exc


def _guarded(fn: Callable[..., T]) -> Callable[..., T]:
    """One transaction (``with self._db``: committed on success, rolled back on an error)
    under the connection lock, SQLite's errors mapped (:func:`_mapped`)."""

    @functools.wraps(fn)
    def wrapper(self: SqliteRepository, *args: Any, **kwargs: Any) -> T:
        with self._lock:
            try:
                with self._db:
                    return fn(self, *args, **kwargs)
            except (sqlite3.IntegrityError, sqlite3.OperationalError) as exc:
                raise _mapped(exc) from None

    return wrapper


def _writes(fn: Callable[..., T]) -> Callable[..., T]:
    """As :func:`_guarded`, for a write on the release path: the transaction runs in this
    process's writer turn (:meth:`SqliteRepository._writer_turn`), so writers in several
    broker workers queue on a lock that wakes the next one as soon as the current one
    commits, instead of polling SQLite's write lock with the busy handler's sleeps (1, 2, 5,
    10 ms ...) while another worker's commit syncs the disk."""

    @functools.wraps(fn)
    def wrapper(self: SqliteRepository, *args: Any, **kwargs: Any) -> T:
        with self._lock:
            try:
                with self._writer_turn(), self._db:
                    return fn(self, *args, **kwargs)
            except (sqlite3.IntegrityError, sqlite3.OperationalError) as exc:
                raise _mapped(exc) from None

    return wrapper


def _unsynced(fn: Callable[..., T]) -> Callable[..., T]:
    """As :func:`_guarded`, but this one transaction commits without waiting for the disk
    (``synchronous=NORMAL``; FULL again right after). Only for writes whose loss in a power
    cut makes a later step fail closed and loosens nothing: a challenge's session (its Attest
    then finds no session) and a session's verified claims (its Release then finds no claims,
    "claims.digest"), or for a write the caller makes durable itself with a later synced
    commit before it answers (a releasing Attest's consumed session: the lease's commit, or
    ``mark_session_used``). WAL frames are written in order, so the next synced commit (or
    the audit log's own sync of the answer that follows) does not undo them on a clean run."""

    @functools.wraps(fn)
    def wrapper(self: SqliteRepository, *args: Any, **kwargs: Any) -> T:
        with self._lock:
            try:
                self._db.execute("PRAGMA synchronous=NORMAL")
                try:
                    with self._writer_turn(), self._db:
                        return fn(self, *args, **kwargs)
                finally:
                    self._db.execute("PRAGMA synchronous=FULL")
            except (sqlite3.IntegrityError, sqlite3.OperationalError) as exc:
                raise _mapped(exc) from None

    return wrapper


class SqliteRepository:
    def __init__(self, path: Path | str) -> None:
        self._lock = threading.RLock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        # the writer-turn lock file beside a database file (none for ":memory:"); the turn
        # is only a queue (see _writer_turn), so without the file writers just do not queue
        self._turn_fd = -1
        if str(path) != ":memory:" and not str(path).startswith("file:"):
            with contextlib.suppress(OSError):
                self._turn_fd = os.open(f"{path}.writers", os.O_RDWR | os.O_CREAT, 0o600)
        # implicit transactions, committed by `with self._db`, begun with BEGIN IMMEDIATE so a
        # writer takes SQLite's write lock (waiting up to busy_timeout) before reading: broker
        # worker processes share this file, and a deferred read-then-write transaction could
        # fail with SQLITE_BUSY_SNAPSHOT instead of waiting
        self._db.isolation_level = "IMMEDIATE"
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit is on disk before it returns, so security state (a consumed nonce, a
        # revocation, a lease) survives a power loss once the answer has left (NORMAL in WAL
        # mode may lose the last commits, which could undo a revocation already audited)
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._migrate()
        # a lookup index for the per-release lease-room check (is this node already a holder?);
        # derived data only, so it is created idempotently outside the versioned migrations
        with self._lock, self._db:
            self._db.execute("CREATE INDEX IF NOT EXISTS leases_by_grant_node "
                             "ON leases(grant_id, node_id, expires_ms)")

    @contextlib.contextmanager
    def _writer_turn(self) -> Iterator[None]:
        """An exclusive ``flock`` on ``<database>.writers`` for one write transaction (taken
        under ``_lock``, so one thread of this process at a time holds it): the broker's
        workers take turns for the hot-path writes (:func:`_writes`, :func:`_unsynced`).
        Only a queue, not the guard: SQLite's own write lock still decides, so a writer
        without a turn (an operator action) stays correct and merely waits as before."""
        if self._turn_fd < 0:
            yield
            return
        try:
            fcntl.flock(self._turn_fd, fcntl.LOCK_EX)
        except OSError as exc:
            raise sqlite3.OperationalError(f"writer lock: {exc.strerror or exc}") from None
        try:
            yield
        finally:
            fcntl.flock(self._turn_fd, fcntl.LOCK_UN)

    def close(self) -> None:
        with self._lock:
            self._db.close()
            if self._turn_fd >= 0:
                os.close(self._turn_fd)
                self._turn_fd = -1

    def _migrate(self) -> None:
        with self._lock, self._db:
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY)"
            )
            done = {r[0] for r in self._db.execute("SELECT version FROM schema_migrations")}
        for version, script in enumerate(MIGRATIONS, start=1):
            if version in done:
                continue
            with self._lock:  # the step and its record commit together, or neither does
                self._db.executescript(  # constant scripts and an int: nothing from outside
                    f"BEGIN IMMEDIATE;{script};"  # noqa: S608
                    f"INSERT INTO schema_migrations VALUES ({int(version)});COMMIT;")

    def schema_version(self) -> int:
        return self._db.execute("SELECT MAX(version) FROM schema_migrations").fetchone()[0]

    # ------------------------------------------------------------------ tenants
    @_guarded
    def add_tenant(self, t: Tenant) -> None:
        self._db.execute(
            "INSERT INTO tenants VALUES (?,?,?,?,?,?)",
            (t.tenant_id, t.signing_public_key, t.kek_version, t.status, t.created_ms,
             t.binding_sig),
        )

    @_guarded
    def get_tenant(self, tenant_id: str) -> Tenant | None:
        return self._read_tenant(tenant_id)

    def _read_tenant(self, tenant_id: str) -> Tenant | None:
        r = self._db.execute("SELECT * FROM tenants WHERE tenant_id=?", (tenant_id,)).fetchone()
        return None if r is None else Tenant(
            tenant_id=r[0], signing_public_key=r[1], kek_version=r[2], status=r[3], created_ms=r[4],
            binding_sig=bytes(r[5]),
        )

    @_guarded
    def set_tenant_kek_version(self, tenant_id: str, version: int) -> None:
        self._db.execute("UPDATE tenants SET kek_version=? WHERE tenant_id=?", (version, tenant_id))

    @_guarded
    def set_tenant_status(self, tenant_id: str, status: str) -> None:
        self._db.execute("UPDATE tenants SET status=? WHERE tenant_id=?", (status, tenant_id))

    # ------------------------------------------------------------ uploads etc.
    @_guarded
    def add_upload(self, u: Upload) -> None:
        self._db.execute(
            "INSERT INTO uploads VALUES (?,?,?,?,?,?,?,?,?)",
            (u.upload_id, u.tenant_id, u.dataset_id, u.key_version, u.share_index,
             u.share_count, u.expires_ms, int(u.committed), u.import_public_key),
        )

    @_guarded
    def get_upload(self, upload_id: str) -> Upload | None:
        r = self._db.execute("SELECT * FROM uploads WHERE upload_id=?", (upload_id,)).fetchone()
        return None if r is None else Upload(
            upload_id=r[0], tenant_id=r[1], dataset_id=r[2], key_version=r[3], share_index=r[4],
            share_count=r[5], expires_ms=r[6], committed=bool(r[7]),
            import_public_key=bytes(r[8]),
        )

    @_guarded
    def set_upload_public_key(self, upload_id: str, public_key: bytes) -> None:
        self._db.execute("UPDATE uploads SET import_public_key=? WHERE upload_id=?",
                         (public_key, upload_id))

    @_guarded
    def mark_upload_committed(self, upload_id: str) -> bool:
        cur = self._db.execute(
            "UPDATE uploads SET committed=1 WHERE upload_id=? AND committed=0", (upload_id,)
        )
        return cur.rowcount == 1

    @_guarded
    def put_dataset(self, d: Dataset) -> None:
        self._db.execute(
            "INSERT INTO datasets VALUES (?,?,?,?,?,?,?,?,?,?) ON CONFLICT(tenant_id, dataset_id) "
            "DO UPDATE SET manifest_name=excluded.manifest_name, store_uri=excluded.store_uri, "
            "holders=excluded.holders, status=excluded.status, "
            "manifest_key_version=excluded.manifest_key_version",
            (d.tenant_id, d.dataset_id, d.share_index, d.share_count, d.manifest_name,
             d.store_uri, json.dumps(list(d.holders)), d.status, d.created_ms,
             d.manifest_key_version),
        )

    @staticmethod
    def _dataset(r: tuple) -> Dataset:
        return Dataset(
            tenant_id=r[0], dataset_id=r[1], share_index=r[2], share_count=r[3],
            manifest_name=r[4], store_uri=r[5], holders=tuple(json.loads(r[6])), status=r[7],
            created_ms=r[8], manifest_key_version=r[9],
        )

    @_guarded
    def get_dataset(self, tenant_id: str, dataset_id: str) -> Dataset | None:
        return self._read_dataset(tenant_id, dataset_id)

    def _read_dataset(self, tenant_id: str, dataset_id: str) -> Dataset | None:
        r = self._db.execute(
            "SELECT * FROM datasets WHERE tenant_id=? AND dataset_id=?", (tenant_id, dataset_id)
        ).fetchone()
        return None if r is None else self._dataset(r)

    @_guarded
    def list_datasets(self, tenant_id: str) -> list[Dataset]:
        rows = self._db.execute(
            "SELECT * FROM datasets WHERE tenant_id=? ORDER BY dataset_id", (tenant_id,)
        )
        return [self._dataset(r) for r in rows]

    @_guarded
    def delete_dataset(self, tenant_id: str, dataset_id: str) -> bool:
        cur = self._db.execute(
            "DELETE FROM datasets WHERE tenant_id=? AND dataset_id=?", (tenant_id, dataset_id)
        )
        return cur.rowcount == 1

    @_guarded
    def put_share(self, s: DatasetShare) -> None:
        self._db.execute(
            "INSERT INTO dataset_shares VALUES (?,?,?,?,?)",
            (s.tenant_id, s.dataset_id, s.key_version, s.kek_version, s.wrapped_share),
        )

    @_guarded
    def replace_share(self, s: DatasetShare) -> None:
        self._db.execute(
            "UPDATE dataset_shares SET kek_version=?, wrapped_share=? "
            "WHERE tenant_id=? AND dataset_id=? AND key_version=?",
            (s.kek_version, s.wrapped_share, s.tenant_id, s.dataset_id, s.key_version),
        )

    @staticmethod
    def _share(r: tuple) -> DatasetShare:
        return DatasetShare(
            tenant_id=r[0], dataset_id=r[1], key_version=r[2], kek_version=r[3],
            wrapped_share=bytes(r[4]),
        )

    @_guarded
    def get_share(self, tenant_id: str, dataset_id: str, key_version: int) -> DatasetShare | None:
        return self._read_share(tenant_id, dataset_id, key_version)

    def _read_share(self, tenant_id: str, dataset_id: str,
                    key_version: int) -> DatasetShare | None:
        r = self._db.execute(
            "SELECT * FROM dataset_shares WHERE tenant_id=? AND dataset_id=? AND key_version=?",
            (tenant_id, dataset_id, key_version),
        ).fetchone()
        return None if r is None else self._share(r)

    @_guarded
    def list_shares(self, tenant_id: str, dataset_id: str | None = None) -> list[DatasetShare]:
        sql, args = "SELECT * FROM dataset_shares WHERE tenant_id=?", [tenant_id]
        if dataset_id is not None:
            sql, args = sql + " AND dataset_id=?", [*args, dataset_id]
        rows = self._db.execute(sql + " ORDER BY dataset_id, key_version", args)
        return [self._share(r) for r in rows]

    # ------------------------------------------------------------ nodes, sessions
    @_guarded
    def put_node(self, n: Node) -> bool:
        """Insert or re-enrol a node; False (nothing written) if the id names a revoked node
        that no operator has reinstated: revocation is sticky, also across processes."""
        return self._db.execute(
            "INSERT INTO nodes VALUES (?,?,?,?,?,?,?) ON CONFLICT(node_id) DO UPDATE SET "
            "tenant_scope=excluded.tenant_scope, ak_public=excluded.ak_public, "
            "ek_certificate=excluded.ek_certificate, revoked=0, enrolled_ms=excluded.enrolled_ms, "
            "binding_sig=excluded.binding_sig WHERE nodes.revoked != ?",
            (n.node_id, n.tenant_scope, n.ak_public, n.ek_certificate, int(n.revoked),
             n.enrolled_ms, n.binding_sig, NODE_REVOKED),
        ).rowcount == 1

    @_guarded
    def get_node(self, node_id: str) -> Node | None:
        return self._read_node(node_id)

    def _read_node(self, node_id: str) -> Node | None:
        r = self._db.execute("SELECT * FROM nodes WHERE node_id=?", (node_id,)).fetchone()
        return None if r is None else Node(
            node_id=r[0], tenant_scope=r[1], ak_public=bytes(r[2]), ek_certificate=bytes(r[3]),
            revoked=r[4] != NODE_ACTIVE, reinstated=r[4] == NODE_REINSTATED, enrolled_ms=r[5],
            binding_sig=bytes(r[6]),
        )

    @_guarded
    def list_nodes(self) -> list[Node]:
        rows = self._db.execute("SELECT * FROM nodes ORDER BY node_id").fetchall()
        return [Node(node_id=r[0], tenant_scope=r[1], ak_public=bytes(r[2]),
                     ek_certificate=bytes(r[3]), revoked=r[4] != NODE_ACTIVE,
                     reinstated=r[4] == NODE_REINSTATED, enrolled_ms=r[5],
                     binding_sig=bytes(r[6])) for r in rows]

    @_guarded
    def revoke_node(self, node_id: str) -> bool:
        return self._db.execute(
            "UPDATE nodes SET revoked=? WHERE node_id=?", (NODE_REVOKED, node_id)
        ).rowcount == 1

    @_guarded
    def reinstate_node(self, node_id: str) -> bool:
        """Allow the next enrolment of a revoked node (the node itself stays refused)."""
        return self._db.execute(
            "UPDATE nodes SET revoked=? WHERE node_id=? AND revoked=?",
            (NODE_REINSTATED, node_id, NODE_REVOKED)
        ).rowcount == 1

    @_unsynced
    def add_session(self, s: Session) -> None:
        self._db.execute(
            "INSERT INTO sessions VALUES (?,?,?,?,?,?,NULL)",
            (s.session_id, s.node_id, s.job_id, s.nonce, s.expires_ms, int(s.used)),
        )

    @staticmethod
    def _session(r: tuple) -> Session:
        return Session(
            session_id=r[0], node_id=r[1], job_id=r[2], nonce=bytes(r[3]), expires_ms=r[4],
            used=bool(r[5]),
        )

    @_guarded
    def get_session(self, session_id: str) -> Session | None:
        r = self._db.execute("SELECT * FROM sessions WHERE session_id=?", (session_id,)).fetchone()
        return None if r is None else self._session(r)

    def consume_session(self, session_id: str, node_id: str, *,
                        durable: bool = True) -> Session | None:
        """Mark the session used if it belongs to ``node_id``; the session as it was before.

        A session of another node is returned unchanged (``used`` as stored), so a node naming
        another node's session cannot burn its nonce. The conditional UPDATE is the single-use
        check, atomic even across processes. ``durable=False``: the commit does not wait for
        the disk; the caller's next durable commit on this connection (WAL frames are written
        in order) or :meth:`mark_session_used` makes it durable before the answer leaves."""
        if durable:
            return self._consume_durably(session_id, node_id)
        return self._consume_unsynced(session_id, node_id)

    @_writes
    def mark_session_used(self, session_id: str) -> None:
        # an unconditional write, so this commit has frames to sync, with any earlier ones
        self._db.execute("UPDATE sessions SET used=1 WHERE session_id=?", (session_id,))

    @_writes
    def _consume_durably(self, session_id: str, node_id: str) -> Session | None:
        return self._consume(session_id, node_id)

    @_unsynced
    def _consume_unsynced(self, session_id: str, node_id: str) -> Session | None:
        return self._consume(session_id, node_id)

    def _consume(self, session_id: str, node_id: str) -> Session | None:
        # the winner gets its row back from the conditional UPDATE itself (one statement);
        # only a refusal (unknown, another node's, already used) reads the row
        won = self._db.execute(
            "UPDATE sessions SET used=1 WHERE session_id=? AND node_id=? AND used=0 "
            "RETURNING session_id, node_id, job_id, nonce, expires_ms",
            (session_id, node_id),
        ).fetchall()
        if won:
            r = won[0]
            return Session(session_id=r[0], node_id=r[1], job_id=r[2], nonce=bytes(r[3]),
                           expires_ms=r[4], used=False)
        r = self._db.execute("SELECT * FROM sessions WHERE session_id=?", (session_id,)).fetchone()
        if r is None:
            return None
        session = self._session(r)
        if session.node_id != node_id:
            return session  # another node's session, unchanged
        return Session(session_id=session.session_id, node_id=session.node_id,
                       job_id=session.job_id, nonce=session.nonce,
                       expires_ms=session.expires_ms, used=True)

    @_guarded
    def pending_sessions(self, node_id: str, now_ms: int, limit: int) -> int:
        """Unused, unexpired sessions of ``node_id``, counted up to ``limit``."""
        return self._db.execute(
            "SELECT COUNT(*) FROM (SELECT 1 FROM sessions WHERE node_id=? AND used=0 "
            "AND expires_ms>? LIMIT ?)", (node_id, now_ms, limit)).fetchone()[0]

    @_guarded
    def pending_uploads(self, tenant_id: str, now_ms: int, limit: int) -> int:
        """Uncommitted, unexpired uploads of ``tenant_id``, counted up to ``limit``."""
        return self._db.execute(
            "SELECT COUNT(*) FROM (SELECT 1 FROM uploads WHERE tenant_id=? AND committed=0 "
            "AND expires_ms>? LIMIT ?)", (tenant_id, now_ms, limit)).fetchone()[0]

    @_unsynced
    def put_session_claims(self, session_id: str, claims_json: bytes) -> None:
        self._db.execute(
            "UPDATE sessions SET claims=? WHERE session_id=?", (claims_json, session_id)
        )

    @_guarded
    def release_reads(
        self, *, node_id: str, tenant_id: str, dataset_id: str, key_version: int,
        session_id: str,
    ) -> tuple[Node | None, Tenant | None, Dataset | None, DatasetShare | None,
               Session | None, bytes | None]:
        """The rows one release checks, read under one hold of the connection lock (no write
        from this process lands between them):
        node, tenant, dataset, share, the token's session and its stored claims."""
        return (self._read_node(node_id), self._read_tenant(tenant_id),
                self._read_dataset(tenant_id, dataset_id),
                self._read_share(tenant_id, dataset_id, key_version),
                *self._read_session_and_claims(session_id))

    @_guarded
    def get_session_and_claims(self, session_id: str) -> tuple[Session | None, bytes | None]:
        return self._read_session_and_claims(session_id)

    def _read_session_and_claims(
        self, session_id: str
    ) -> tuple[Session | None, bytes | None]:
        r = self._db.execute("SELECT * FROM sessions WHERE session_id=?", (session_id,)).fetchone()
        if r is None:
            return None, None
        return self._session(r), None if r[6] is None else bytes(r[6])

    @_guarded
    def get_session_claims(self, session_id: str) -> bytes | None:
        r = self._db.execute(
            "SELECT claims FROM sessions WHERE session_id=?", (session_id,)
        ).fetchone()
        return None if r is None or r[0] is None else bytes(r[0])

    # ------------------------------------------------------------ policies, grants
    @_guarded
    def put_policy(self, tenant_id: str, digest: str, text: str) -> None:
        self._db.execute("INSERT OR IGNORE INTO policies VALUES (?,?,?)", (tenant_id, digest, text))

    @_guarded
    def get_policy(self, tenant_id: str, digest: str) -> str | None:
        r = self._db.execute(
            "SELECT text FROM policies WHERE tenant_id=? AND digest=?", (tenant_id, digest)
        ).fetchone()
        return None if r is None else r[0]

    @_guarded
    def add_grant(self, g: Grant, document: bytes, signature: bytes) -> None:
        self._db.execute(
            "INSERT INTO grants VALUES (?,?,?,?,?,?,?,?,?,?)",
            (g.grant_id, g.tenant_id, g.dataset_id, g.job_id, g.policy_digest, g.max_nodes,
             g.expires_ms, int(g.revoked), document, signature),
        )

    @staticmethod
    def _grant(r: tuple) -> Grant:
        return Grant(
            grant_id=r[0], tenant_id=r[1], dataset_id=r[2], job_id=r[3], policy_digest=r[4],
            max_nodes=r[5], expires_ms=r[6], revoked=bool(r[7]),
        )

    @_guarded
    def get_grant(self, tenant_id: str, grant_id: str) -> Grant | None:
        r = self._db.execute("SELECT * FROM grants WHERE tenant_id=? AND grant_id=?",
                             (tenant_id, grant_id)).fetchone()
        return None if r is None else self._grant(r)

    @_guarded
    def grant_document(self, tenant_id: str, grant_id: str) -> tuple[bytes, bytes] | None:
        r = self._db.execute(
            "SELECT document, signature FROM grants WHERE tenant_id=? AND grant_id=?",
            (tenant_id, grant_id),
        ).fetchone()
        return None if r is None else (bytes(r[0]), bytes(r[1]))

    @_guarded
    def grants_for(self, *, job_id: str, dataset_id: str | None = None) -> list[Grant]:
        sql, args = "SELECT * FROM grants WHERE job_id=?", [job_id]
        if dataset_id is not None:
            sql, args = sql + " AND dataset_id=?", [*args, dataset_id]
        return [self._grant(r) for r in self._db.execute(sql + " ORDER BY grant_id", args)]

    @_guarded
    def grants_with_documents(
        self, *, job_id: str, dataset_id: str
    ) -> list[tuple[Grant, tuple[bytes, bytes]]]:
        rows = self._db.execute(
            "SELECT * FROM grants WHERE job_id=? AND dataset_id=? ORDER BY grant_id",
            (job_id, dataset_id),
        )
        return [(self._grant(r), (bytes(r[8]), bytes(r[9]))) for r in rows]

    @_guarded
    def revoke_grant(self, tenant_id: str, grant_id: str) -> bool:
        return self._db.execute(
            "UPDATE grants SET revoked=1 WHERE tenant_id=? AND grant_id=?", (tenant_id, grant_id)
        ).rowcount == 1

    # ------------------------------------------------------------------ leases
    @_guarded
    def add_lease(self, le: Lease) -> None:
        self._insert_lease(le)

    def _insert_lease(self, le: Lease) -> None:
        self._db.execute(
            "INSERT INTO leases VALUES (?,?,?,?,?,?,?)",
            (le.lease_id, le.node_id, le.grant_id, le.tenant_id, le.dataset_id, le.expires_ms,
             int(le.revoked)),
        )

    @staticmethod
    def _lease(r: tuple) -> Lease:
        return Lease(
            lease_id=r[0], node_id=r[1], grant_id=r[2], tenant_id=r[3], dataset_id=r[4],
            expires_ms=r[5], revoked=bool(r[6]),
        )

    @_guarded
    def get_lease(self, lease_id: str) -> Lease | None:
        r = self._db.execute("SELECT * FROM leases WHERE lease_id=?", (lease_id,)).fetchone()
        return None if r is None else self._lease(r)

    @_guarded
    def extend_lease(self, lease_id: str, expires_ms: int) -> None:
        self._db.execute("UPDATE leases SET expires_ms=? WHERE lease_id=?", (expires_ms, lease_id))

    @_guarded
    def drop_lease(self, lease_id: str) -> None:
        self._db.execute("DELETE FROM leases WHERE lease_id=?", (lease_id,))

    @_guarded
    def active_lease_nodes(self, tenant_id: str, grant_id: str, now_ms: int) -> set[str]:
        rows = self._db.execute(
            "SELECT DISTINCT node_id FROM leases WHERE grant_id=? AND tenant_id=? AND revoked=0 "
            "AND expires_ms>?", (grant_id, tenant_id, now_ms),
        )
        return {r[0] for r in rows}

    @_guarded
    def lease_room(self, tenant_id: str, grant_id: str, node_id: str, now_ms: int,
                   max_nodes: int) -> bool:
        """True if ``node_id`` holds an active lease of the grant or fewer than ``max_nodes``
        nodes do (``node_id in holders or len(holders) < max_nodes`` over
        :meth:`active_lease_nodes`), without reading every lease of the grant."""
        return self._room(tenant_id, grant_id, node_id, now_ms, max_nodes)

    @_writes
    def take_lease(self, lease: Lease, *, now_ms: int, max_nodes: int) -> bool:
        """Insert ``lease`` if its grant has room for its node (:meth:`lease_room`), as one
        write transaction: ``BEGIN IMMEDIATE`` takes SQLite's write lock before the check, so
        broker worker processes sharing this file cannot both take the last place. Under the
        same lock the tenant, the grant and the node are read again: a shred or revocation
        that committed after the caller's checks raises :class:`AuthorizationChanged`, and
        one that commits later sees this lease (and revokes it)."""
        self._db.execute("BEGIN IMMEDIATE")
        # the three rows in one statement; each column is NULL when its row is gone (the
        # columns read are NOT NULL, so NULL means no row)
        row = self._db.execute(
            "SELECT (SELECT status FROM tenants WHERE tenant_id=?), "
            "(SELECT revoked FROM grants WHERE tenant_id=? AND grant_id=?), "
            "(SELECT revoked FROM nodes WHERE node_id=?)",
            (lease.tenant_id, lease.tenant_id, lease.grant_id, lease.node_id)).fetchone()
        check_still_authorized(lease, *(None if v is None else (v,) for v in row))
        if not self._room(lease.tenant_id, lease.grant_id, lease.node_id, now_ms, max_nodes):
            return False
        self._insert_lease(lease)
        return True

    def _room(self, tenant_id: str, grant_id: str, node_id: str, now_ms: int,
              max_nodes: int) -> bool:
        if self._db.execute(
            "SELECT 1 FROM leases WHERE grant_id=? AND node_id=? AND tenant_id=? AND revoked=0 "
            "AND expires_ms>? LIMIT 1", (grant_id, node_id, tenant_id, now_ms),
        ).fetchone() is not None:
            return True
        n = self._db.execute(
            "SELECT COUNT(*) FROM (SELECT DISTINCT node_id FROM leases WHERE grant_id=? "
            "AND tenant_id=? AND revoked=0 AND expires_ms>? LIMIT ?)",
            (grant_id, tenant_id, now_ms, max(0, max_nodes)),
        ).fetchone()[0]
        return n < max_nodes

    @_guarded
    def revoke_leases(
        self,
        *,
        now_ms: int,
        node_id: str | None = None,
        grant_id: str | None = None,
        tenant_id: str | None = None,
        dataset_id: str | None = None,
    ) -> list[Lease]:
        where, args = ["revoked=0", "expires_ms>?"], [now_ms]
        for column, value in (("node_id", node_id), ("grant_id", grant_id),
                              ("tenant_id", tenant_id), ("dataset_id", dataset_id)):
            if value is not None:
                where.append(f"{column}=?")
                args.append(value)
        clause = " AND ".join(where)
        # the clause joins fixed column names only; values are bound parameters
        rows = self._db.execute(f"SELECT * FROM leases WHERE {clause}", args)  # noqa: S608
        leases = [self._lease(r) for r in rows]
        self._db.execute(f"UPDATE leases SET revoked=1 WHERE {clause}", args)  # noqa: S608
        return leases

    # ------------------------------------------------------------------ janitor
    @_guarded
    def expired_uploads(self, before_ms: int, limit: int) -> list[str]:
        """Ids of uploads (committed or not) that expired before ``before_ms``."""
        rows = self._db.execute(
            "SELECT upload_id FROM uploads WHERE expires_ms<? ORDER BY expires_ms LIMIT ?",
            (before_ms, limit))
        return [r[0] for r in rows]

    @_guarded
    def delete_upload(self, upload_id: str) -> None:
        """Drop an upload row, and its dataset row if that is still pending with no share and
        no other upload (an upload that was opened and never committed)."""
        r = self._db.execute("SELECT tenant_id, dataset_id FROM uploads WHERE upload_id=?",
                             (upload_id,)).fetchone()
        self._db.execute("DELETE FROM uploads WHERE upload_id=?", (upload_id,))
        if r is not None:
            self._db.execute(
                "DELETE FROM datasets WHERE tenant_id=? AND dataset_id=? AND status='pending' "
                "AND NOT EXISTS (SELECT 1 FROM dataset_shares s WHERE s.tenant_id=? "
                "AND s.dataset_id=?) AND NOT EXISTS (SELECT 1 FROM uploads u WHERE "
                "u.tenant_id=? AND u.dataset_id=?)", (r[0], r[1]) * 3)

    @_guarded
    def purge_expired(self, before_ms: int) -> tuple[int, int]:
        """Delete sessions and leases that expired before ``before_ms``: (sessions, leases)."""
        sessions = self._db.execute("DELETE FROM sessions WHERE expires_ms<?",
                                    (before_ms,)).rowcount
        leases = self._db.execute("DELETE FROM leases WHERE expires_ms<?", (before_ms,)).rowcount
        return sessions, leases

    # ------------------------------------------------- revocations between workers
    @_guarded
    def add_revocation_events(self, origin: str, events: list[tuple[str, RevocationEvent]],
                              now_ms: int, keep_ms: int) -> None:
        self._db.execute("DELETE FROM revocation_events WHERE created_ms<?", (now_ms - keep_ms,))
        self._db.executemany(
            "INSERT INTO revocation_events (origin, node_id, lease_id, tenant_id, dataset_id, "
            "reason, created_ms) VALUES (?,?,?,?,?,?,?)",
            [(origin, node, e.lease_id, e.tenant_id, e.dataset_id, e.reason, now_ms)
             for node, e in events],
        )

    @_guarded
    def revocation_events_after(
        self, after_id: int, origin: str
    ) -> tuple[int, list[tuple[str, RevocationEvent]]]:
        """Events with id > ``after_id`` from other origins, and the highest id now stored
        (``after_id < 0``: only that id, no events)."""
        last = self._db.execute("SELECT MAX(id) FROM revocation_events").fetchone()[0] or 0
        if after_id < 0 or last <= after_id:
            return max(last, after_id), []
        rows = self._db.execute(
            "SELECT node_id, lease_id, tenant_id, dataset_id, reason FROM revocation_events "
            "WHERE id>? AND id<=? AND origin!=? ORDER BY id", (after_id, last, origin))
        return last, [(r[0], RevocationEvent(r[1], r[2], r[3], r[4])) for r in rows]
