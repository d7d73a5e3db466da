"""PostgreSQL implementation of :class:`kms_broker.state.repository.Repository` (psycopg 3).

``state: postgresql://user@host:port/db?passfile=/etc/kms-broker/pgpass`` in broker.yaml
selects it. Several ``kms-broker serve`` replicas (on one host or several) share one database
and one HSM token; every check that must hold across them is one statement or one
transaction in the database, never a check in a process's memory:

- single-use nonces: ``UPDATE sessions SET used=1 WHERE ... AND used=0`` (the row lock makes
  the second of two concurrent consumers see ``used=1`` and update nothing);
- lease room: :meth:`take_lease` takes a transaction-scoped advisory lock on the grant
  (``pg_advisory_xact_lock``) before counting holders and inserting, so two replicas cannot
  both take the last place;
- sticky node revocation: the upsert of :meth:`put_node` refuses a revoked row in the same
  statement (``ON CONFLICT ... DO UPDATE ... WHERE nodes.revoked <> 1``);
- revocations to every replica's watch streams: :meth:`add_revocation_events` stores the
  events and sends ``NOTIFY kms_broker_revocations`` in the same transaction (delivered only
  if it commits); :meth:`wait_revocations` blocks on ``LISTEN`` so a relay wakes at once
  instead of waiting for its next poll. Event ids come from a sequence, and inserts are
  serialised by an advisory lock held to commit, so ids become visible in increasing order
  and a reader that remembers the highest id it saw never skips a later commit.

Every write commits before it returns (``synchronous_commit`` is the server's, ``on`` by
default: the commit is flushed to the WAL), except inside a unit of work
(:meth:`PostgresRepository.unit_of_work`): there every repository call and every audit append
(:mod:`kms_broker.audit_pg` shares :class:`PgTransactions`) made by the calling thread joins
one transaction on one connection, committed when the block ends and rolled back, all of it,
when the block raises or the commit fails (or the process dies before it). The domain wraps an
action and its audit record in one, so neither commits without the other. A unit of work ends
at its first error (PostgreSQL aborts the transaction): callers do not catch inside one.

``psycopg.OperationalError`` (server down, connection lost, pool exhausted for
``POOL_TIMEOUT_S``) becomes ``Unavailable`` so callers fail closed; the pool checks a
connection before handing it out and opens new ones as the server comes back (each request
retries the connection), so a broker recovers from a database restart without being
restarted.
Unique and foreign-key violations become ``AlreadyExists``, as in SQLite; a value PostgreSQL
cannot store (a NUL character in TEXT) becomes ``InvalidArgument``.

The schema mirrors :mod:`kms_broker.state.sqlite` (BYTEA for BLOB, BIGINT for INTEGER),
versioned in ``schema_migrations``; replicas starting together migrate under an advisory
lock. Credentials never sit in the URL: use a libpq ``passfile`` (mode 0600) or a client
certificate; :func:`safe_dsn` is what logs and errors show.
"""

from __future__ import annotations

import contextlib
import functools
import json
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import psycopg
from psycopg import errors as pg_errors
from psycopg_pool import ConnectionPool, PoolTimeout

from kms_broker.domain.errors import AlreadyExists, InvalidArgument, Unavailable
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

__all__ = ["PgTransactions", "PostgresRepository", "safe_dsn"]

POOL_MAX = 8
POOL_TIMEOUT_S = 5.0
CONNECT_TIMEOUT_S = 5
NOTIFY_CHANNEL = "kms_broker_revocations"
# advisory lock keys (one namespace, two 32-bit halves): schema migration, revocation inserts
_LOCK_NS = 0x6B6D73  # "kms"
_LOCK_MIGRATE, _LOCK_EVENTS = 1, 2

MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE tenants (
        tenant_id TEXT PRIMARY KEY, signing_public_key BYTEA NOT NULL,
        kek_version BIGINT NOT NULL, status TEXT NOT NULL, created_ms BIGINT NOT NULL,
        binding_sig BYTEA NOT NULL DEFAULT '');
    CREATE TABLE datasets (
        tenant_id TEXT NOT NULL REFERENCES tenants(tenant_id), dataset_id TEXT NOT NULL,
        share_index BIGINT NOT NULL, share_count BIGINT NOT NULL,
        manifest_name TEXT NOT NULL, store_uri TEXT NOT NULL, holders TEXT NOT NULL,
        status TEXT NOT NULL, created_ms BIGINT NOT NULL,
        PRIMARY KEY (tenant_id, dataset_id));
    CREATE TABLE dataset_shares (
        tenant_id TEXT NOT NULL, dataset_id TEXT NOT NULL, key_version BIGINT NOT NULL,
        kek_version BIGINT NOT NULL, wrapped_share BYTEA NOT NULL,
        PRIMARY KEY (tenant_id, dataset_id, key_version),
        FOREIGN KEY (tenant_id, dataset_id) REFERENCES datasets(tenant_id, dataset_id)
            ON DELETE CASCADE);
    CREATE TABLE uploads (
        upload_id TEXT PRIMARY KEY, tenant_id TEXT NOT NULL REFERENCES tenants(tenant_id),
        dataset_id TEXT NOT NULL, key_version BIGINT NOT NULL, share_index BIGINT NOT NULL,
        share_count BIGINT NOT NULL, expires_ms BIGINT NOT NULL, committed SMALLINT NOT NULL,
        import_public_key BYTEA NOT NULL);
    CREATE INDEX uploads_by_expiry ON uploads(expires_ms);
    CREATE INDEX uploads_by_tenant ON uploads(tenant_id, committed, expires_ms);
    CREATE TABLE nodes (
        node_id TEXT PRIMARY KEY, tenant_scope TEXT NOT NULL, ak_public BYTEA NOT NULL,
        ek_certificate BYTEA NOT NULL, revoked SMALLINT NOT NULL, enrolled_ms BIGINT NOT NULL,
        binding_sig BYTEA NOT NULL DEFAULT '');
    CREATE TABLE sessions (
        session_id TEXT PRIMARY KEY, node_id TEXT NOT NULL REFERENCES nodes(node_id),
        job_id TEXT NOT NULL, nonce BYTEA NOT NULL, expires_ms BIGINT NOT NULL,
        used SMALLINT NOT NULL, claims BYTEA);
    CREATE INDEX sessions_by_expiry ON sessions(expires_ms);
    CREATE INDEX sessions_by_node ON sessions(node_id, used, expires_ms);
    CREATE TABLE policies (
        tenant_id TEXT NOT NULL REFERENCES tenants(tenant_id), digest TEXT NOT NULL,
        text TEXT NOT NULL, PRIMARY KEY (tenant_id, digest));
    CREATE TABLE grants (
        grant_id TEXT NOT NULL, tenant_id TEXT NOT NULL REFERENCES tenants(tenant_id),
        dataset_id TEXT NOT NULL, job_id TEXT NOT NULL, policy_digest TEXT NOT NULL,
        max_nodes BIGINT NOT NULL, expires_ms BIGINT NOT NULL, revoked SMALLINT NOT NULL,
        document BYTEA NOT NULL, signature BYTEA NOT NULL, PRIMARY KEY (tenant_id, grant_id));
    CREATE INDEX grants_by_job ON grants(job_id, dataset_id);
    CREATE TABLE leases (
        lease_id TEXT PRIMARY KEY, node_id TEXT NOT NULL, grant_id TEXT NOT NULL,
        tenant_id TEXT NOT NULL, dataset_id TEXT NOT NULL, expires_ms BIGINT NOT NULL,
        revoked SMALLINT NOT NULL);
    CREATE INDEX leases_by_grant_node ON leases(grant_id, node_id, expires_ms);
    CREATE INDEX leases_by_expiry ON leases(expires_ms);
    CREATE TABLE revocation_events (
        id BIGSERIAL PRIMARY KEY, origin TEXT NOT NULL, node_id TEXT NOT NULL,
        lease_id TEXT NOT NULL, tenant_id TEXT NOT NULL, dataset_id TEXT NOT NULL,
        reason TEXT NOT NULL, created_ms BIGINT NOT NULL);
    """,
    # which key version the registered manifest belongs to (as state.sqlite's migration 5)
    """
    ALTER TABLE datasets ADD COLUMN manifest_key_version BIGINT NOT NULL DEFAULT 0;
    UPDATE datasets d SET manifest_key_version = s.v FROM (
        SELECT tenant_id, dataset_id, MIN(key_version) AS v FROM dataset_shares
        GROUP BY tenant_id, dataset_id HAVING COUNT(*) = 1) s
    WHERE d.manifest_name != '' AND s.tenant_id = d.tenant_id AND s.dataset_id = d.dataset_id;
    """,
)

# nodes.revoked: as in state.sqlite (0 active, 1 revoked and sticky, 2 reinstated)
NODE_ACTIVE, NODE_REVOKED, NODE_REINSTATED = 0, 1, 2

T = TypeVar("T")


def safe_dsn(dsn: str) -> str:
    """The DSN with any password removed, for logs and error messages."""
    try:
        params = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "<unparseable postgresql DSN>"
    params.pop("password", None)
    return psycopg.conninfo.make_conninfo(**{k: v for k, v in params.items() if v is not None})


class PgTransactions:
    """Where a statement runs: in the calling thread's unit of work when one is open, else in a
    transaction of its own on a pooled connection (committed on return, rolled back on any
    error). Shared by the repository and the audit log on the same pool."""

    def __init__(self, pool: ConnectionPool) -> None:
        self.pool = pool
        self._local = threading.local()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[psycopg.Connection]:
        joined = getattr(self._local, "conn", None)
        if joined is not None:  # committed or rolled back with the unit of work
            yield joined
            return
        with self.pool.connection() as conn, conn.transaction():
            yield conn

    @contextlib.contextmanager
    def unit_of_work(self) -> Iterator[None]:
        """One transaction for everything this thread does inside the block (a nested block
        is part of the outer one). ``Unavailable`` when it cannot start or commit."""
        if getattr(self._local, "conn", None) is not None:
            yield
            return
        try:
            with self.pool.connection() as conn, conn.transaction():
                self._local.conn = conn
                try:
                    yield
                finally:
                    self._local.conn = None
        except (psycopg.OperationalError, psycopg.InterfaceError, PoolTimeout) as exc:
            raise Unavailable(f"state store unavailable: {type(exc).__name__}") from None


def _guarded(fn: Callable[..., T]) -> Callable[..., T]:
    """Run the method in one transaction (its own, or the thread's unit of work) and map
    database errors to domain errors."""

    @functools.wraps(fn)
    def wrapper(self: PostgresRepository, *args: Any, **kwargs: Any) -> T:
        try:
            with self._tx.transaction() as conn:
                return fn(self, conn, *args, **kwargs)
        except pg_errors.IntegrityError as exc:
            raise AlreadyExists(f"already exists or violates a reference: "
                                f"{exc.diag.message_primary}") from None
        except psycopg.DataError as exc:  # e.g. a NUL character, which TEXT cannot hold
            raise InvalidArgument(f"a value the state store cannot hold: "
                                  f"{exc.diag.message_primary}") from None
        except (psycopg.OperationalError, PoolTimeout) as exc:
            raise Unavailable(f"state store unavailable: {type(exc).__name__}") from None
        except psycopg.InterfaceError as exc:  # a connection closed under us
            raise Unavailable(f"state store unavailable: {type(exc).__name__}") from None
        except psycopg.Error as exc:  # anything else the server refused (a trigger, ...)
            raise Unavailable(f"state store refused the change: {type(exc).__name__}") from None

    return wrapper


class PostgresRepository:
    def __init__(self, dsn: str, *, pool_max: int = POOL_MAX,
                 pool_timeout_s: float = POOL_TIMEOUT_S) -> None:
        self._dsn = dsn
        self._pool = ConnectionPool(
            dsn, min_size=1, max_size=pool_max, timeout=pool_timeout_s, open=False,
            kwargs={"connect_timeout": CONNECT_TIMEOUT_S, "autocommit": True},
            check=ConnectionPool.check_connection, name="kms-broker-state",
            # a failed background connect is not retried on a timer: while the server is
            # down each request waits at most pool_timeout_s and fails closed (Unavailable),
            # and the next request tries to connect again (so recovery needs no restart)
            reconnect_timeout=0,
        )
        try:
            self._pool.open(wait=True, timeout=pool_timeout_s * 2)
        except PoolTimeout:
            self._pool.close()
            raise Unavailable(f"state store unavailable: cannot connect to "
                              f"{safe_dsn(dsn)}") from None
        self._tx = PgTransactions(self._pool)
        self._listen_lock = threading.Lock()
        self._listener: psycopg.Connection | None = None
        try:
            self._migrate()
        except BaseException:
            self._pool.close()
            raise

    @property
    def pool(self) -> ConnectionPool:
        """The connection pool."""
        return self._pool

    @property
    def transactions(self) -> PgTransactions:
        """Where statements run (the audit log in the same database shares it, so its
        appends join the repository's units of work)."""
        return self._tx

    def unit_of_work(self) -> contextlib.AbstractContextManager[None]:
        """One transaction for the repository calls and audit appends made by this thread
        inside the block (see the module docstring)."""
        return self._tx.unit_of_work()

    def close(self) -> None:
        with self._listen_lock:
            if self._listener is not None:
                self._listener.close()
                self._listener = None
        self._pool.close()

    def _migrate(self) -> None:
        try:
            with self._pool.connection() as conn, conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", (_LOCK_NS, _LOCK_MIGRATE))
                conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations "
                             "(version INTEGER PRIMARY KEY)")
                done = {r[0] for r in conn.execute("SELECT version FROM schema_migrations")}
                for version, script in enumerate(MIGRATIONS, start=1):
                    if version not in done:  # the step and its record commit together
                        conn.execute(script)  # a constant script: nothing from outside
                        conn.execute("INSERT INTO schema_migrations VALUES (%s)", (version,))
        except psycopg.OperationalError as exc:
            raise Unavailable(f"state store unavailable: {type(exc).__name__}") from None

    @_guarded
    def schema_version(self, c: psycopg.Connection) -> int:
        return c.execute("SELECT MAX(version) FROM schema_migrations").fetchone()[0]

    # ------------------------------------------------------------------ tenants
    @_guarded
    def add_tenant(self, c: psycopg.Connection, t: Tenant) -> None:
        c.execute("INSERT INTO tenants VALUES (%s,%s,%s,%s,%s,%s)",
                  (t.tenant_id, t.signing_public_key, t.kek_version, t.status, t.created_ms,
                   t.binding_sig))

    @staticmethod
    def _tenant(r: tuple) -> Tenant:
        return Tenant(tenant_id=r[0], signing_public_key=bytes(r[1]), kek_version=r[2],
                      status=r[3], created_ms=r[4], binding_sig=bytes(r[5]))

    @_guarded
    def get_tenant(self, c: psycopg.Connection, tenant_id: str) -> Tenant | None:
        return self._get_tenant(c, tenant_id)

    def _get_tenant(self, c: psycopg.Connection, tenant_id: str) -> Tenant | None:
        r = c.execute("SELECT * FROM tenants WHERE tenant_id=%s", (tenant_id,)).fetchone()
        return None if r is None else self._tenant(r)

    @_guarded
    def set_tenant_kek_version(self, c: psycopg.Connection, tenant_id: str, version: int) -> None:
        c.execute("UPDATE tenants SET kek_version=%s WHERE tenant_id=%s", (version, tenant_id))

    @_guarded
    def set_tenant_status(self, c: psycopg.Connection, tenant_id: str, status: str) -> None:
        c.execute("UPDATE tenants SET status=%s WHERE tenant_id=%s", (status, tenant_id))

    # ------------------------------------------------------------ uploads etc.
    @_guarded
    def add_upload(self, c: psycopg.Connection, u: Upload) -> None:
        c.execute("INSERT INTO uploads VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s)",
                  (u.upload_id, u.tenant_id, u.dataset_id, u.key_version, u.share_index,
                   u.share_count, u.expires_ms, int(u.committed), u.import_public_key))

    @_guarded
    def get_upload(self, c: psycopg.Connection, upload_id: str) -> Upload | None:
        r = c.execute("SELECT * FROM uploads WHERE upload_id=%s", (upload_id,)).fetchone()
        return None if r is None else Upload(
            upload_id=r[0], tenant_id=r[1], dataset_id=r[2], key_version=r[3], share_index=r[4],
            share_count=r[5], expires_ms=r[6], committed=bool(r[7]),
            import_public_key=bytes(r[8]))

    @_guarded
    def set_upload_public_key(self, c: psycopg.Connection, upload_id: str,
                              public_key: bytes) -> None:
        c.execute("UPDATE uploads SET import_public_key=%s WHERE upload_id=%s",
                  (public_key, upload_id))

    @_guarded
    def mark_upload_committed(self, c: psycopg.Connection, upload_id: str) -> bool:
        return c.execute("UPDATE uploads SET committed=1 WHERE upload_id=%s AND committed=0",
                         (upload_id,)).rowcount == 1

    @_guarded
    def pending_uploads(self, c: psycopg.Connection, tenant_id: str, now_ms: int,
                        limit: int) -> int:
        return c.execute(
            "SELECT COUNT(*) FROM (SELECT 1 FROM uploads WHERE tenant_id=%s AND committed=0 "
            "AND expires_ms>%s LIMIT %s) AS p", (tenant_id, now_ms, limit)).fetchone()[0]

    @_guarded
    def put_dataset(self, c: psycopg.Connection, d: Dataset) -> None:
        c.execute(
            "INSERT INTO datasets VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s) "
            "ON CONFLICT (tenant_id, dataset_id) DO UPDATE SET "
            "manifest_name=excluded.manifest_name, store_uri=excluded.store_uri, "
            "holders=excluded.holders, status=excluded.status, "
            "manifest_key_version=excluded.manifest_key_version",
            (d.tenant_id, d.dataset_id, d.share_index, d.share_count, d.manifest_name,
             d.store_uri, json.dumps(list(d.holders)), d.status, d.created_ms,
             d.manifest_key_version))

    @staticmethod
    def _dataset(r: tuple) -> Dataset:
        return Dataset(tenant_id=r[0], dataset_id=r[1], share_index=r[2], share_count=r[3],
                       manifest_name=r[4], store_uri=r[5], holders=tuple(json.loads(r[6])),
                       status=r[7], created_ms=r[8], manifest_key_version=r[9])

    @_guarded
    def get_dataset(self, c: psycopg.Connection, tenant_id: str,
                    dataset_id: str) -> Dataset | None:
        return self._get_dataset(c, tenant_id, dataset_id)

    def _get_dataset(self, c: psycopg.Connection, tenant_id: str,
                     dataset_id: str) -> Dataset | None:
        r = c.execute("SELECT * FROM datasets WHERE tenant_id=%s AND dataset_id=%s",
                      (tenant_id, dataset_id)).fetchone()
        return None if r is None else self._dataset(r)

    @_guarded
    def list_datasets(self, c: psycopg.Connection, tenant_id: str) -> list[Dataset]:
        rows = c.execute("SELECT * FROM datasets WHERE tenant_id=%s ORDER BY dataset_id",
                         (tenant_id,))
        return [self._dataset(r) for r in rows]

    @_guarded
    def delete_dataset(self, c: psycopg.Connection, tenant_id: str, dataset_id: str) -> bool:
        return c.execute("DELETE FROM datasets WHERE tenant_id=%s AND dataset_id=%s",
                         (tenant_id, dataset_id)).rowcount == 1

    @_guarded
    def put_share(self, c: psycopg.Connection, s: DatasetShare) -> None:
        c.execute("INSERT INTO dataset_shares VALUES (%s,%s,%s,%s,%s)",
                  (s.tenant_id, s.dataset_id, s.key_version, s.kek_version, s.wrapped_share))

    @_guarded
    def replace_share(self, c: psycopg.Connection, s: DatasetShare) -> None:
        c.execute("UPDATE dataset_shares SET kek_version=%s, wrapped_share=%s "
                  "WHERE tenant_id=%s AND dataset_id=%s AND key_version=%s",
                  (s.kek_version, s.wrapped_share, s.tenant_id, s.dataset_id, s.key_version))

    @staticmethod
    def _share(r: tuple) -> DatasetShare:
        return DatasetShare(tenant_id=r[0], dataset_id=r[1], key_version=r[2],
                            kek_version=r[3], wrapped_share=bytes(r[4]))

    @_guarded
    def get_share(self, c: psycopg.Connection, tenant_id: str, dataset_id: str,
                  key_version: int) -> DatasetShare | None:
        return self._get_share(c, tenant_id, dataset_id, key_version)

    def _get_share(self, c: psycopg.Connection, tenant_id: str, dataset_id: str,
                   key_version: int) -> DatasetShare | None:
        r = c.execute("SELECT * FROM dataset_shares WHERE tenant_id=%s AND dataset_id=%s "
                      "AND key_version=%s", (tenant_id, dataset_id, key_version)).fetchone()
        return None if r is None else self._share(r)

    @_guarded
    def list_shares(self, c: psycopg.Connection, tenant_id: str,
                    dataset_id: str | None = None) -> list[DatasetShare]:
        if dataset_id is None:
            rows = c.execute("SELECT * FROM dataset_shares WHERE tenant_id=%s "
                             "ORDER BY dataset_id, key_version", (tenant_id,))
        else:
            rows = c.execute("SELECT * FROM dataset_shares WHERE tenant_id=%s AND "
                             "dataset_id=%s ORDER BY dataset_id, key_version",
                             (tenant_id, dataset_id))
        return [self._share(r) for r in rows]

    # ------------------------------------------------------------ nodes, sessions
    @_guarded
    def put_node(self, c: psycopg.Connection, n: Node) -> bool:
        """Insert or re-enrol a node; False (nothing written) if the id names a revoked node
        that no operator has reinstated: revocation is sticky across replicas."""
        return c.execute(
            "INSERT INTO nodes VALUES (%s,%s,%s,%s,%s,%s,%s) ON CONFLICT (node_id) DO UPDATE "
            "SET tenant_scope=excluded.tenant_scope, ak_public=excluded.ak_public, "
            "ek_certificate=excluded.ek_certificate, revoked=0, "
            "enrolled_ms=excluded.enrolled_ms, binding_sig=excluded.binding_sig "
            "WHERE nodes.revoked <> %s",
            (n.node_id, n.tenant_scope, n.ak_public, n.ek_certificate, int(n.revoked),
             n.enrolled_ms, n.binding_sig, NODE_REVOKED)).rowcount == 1

    @_guarded
    def get_node(self, c: psycopg.Connection, node_id: str) -> Node | None:
        return self._get_node(c, node_id)

    def _get_node(self, c: psycopg.Connection, node_id: str) -> Node | None:
        r = c.execute("SELECT * FROM nodes WHERE node_id=%s", (node_id,)).fetchone()
        return None if r is None else self._node(r)

    @staticmethod
    def _node(r: tuple) -> Node:
        return Node(
            node_id=r[0], tenant_scope=r[1], ak_public=bytes(r[2]), ek_certificate=bytes(r[3]),
            revoked=r[4] != NODE_ACTIVE, reinstated=r[4] == NODE_REINSTATED, enrolled_ms=r[5],
            binding_sig=bytes(r[6]))

    @_guarded
    def list_nodes(self, c: psycopg.Connection) -> list[Node]:
        # kms-broker node list on a replica: was missing here (AttributeError: INTERNAL)
        return [self._node(r) for r in c.execute("SELECT * FROM nodes ORDER BY node_id")]

    @_guarded
    def revoke_node(self, c: psycopg.Connection, node_id: str) -> bool:
        return c.execute("UPDATE nodes SET revoked=%s WHERE node_id=%s",
                         (NODE_REVOKED, node_id)).rowcount == 1

    @_guarded
    def reinstate_node(self, c: psycopg.Connection, node_id: str) -> bool:
        return c.execute("UPDATE nodes SET revoked=%s WHERE node_id=%s AND revoked=%s",
                         (NODE_REINSTATED, node_id, NODE_REVOKED)).rowcount == 1

    @_guarded
    def add_session(self, c: psycopg.Connection, s: Session) -> None:
        c.execute("INSERT INTO sessions VALUES (%s,%s,%s,%s,%s,%s,NULL)",
                  (s.session_id, s.node_id, s.job_id, s.nonce, s.expires_ms, int(s.used)))

    @staticmethod
    def _session(r: tuple) -> Session:
        return Session(session_id=r[0], node_id=r[1], job_id=r[2], nonce=bytes(r[3]),
                       expires_ms=r[4], used=bool(r[5]))

    @_guarded
    def get_session(self, c: psycopg.Connection, session_id: str) -> Session | None:
        r = c.execute("SELECT * FROM sessions WHERE session_id=%s", (session_id,)).fetchone()
        return None if r is None else self._session(r)

    @_guarded
    def consume_session(self, c: psycopg.Connection, session_id: str,
                        node_id: str, *, durable: bool = True) -> Session | None:
        """Mark the session used if it belongs to ``node_id``; the session as it was before.
        The conditional UPDATE is the single-use check: of two replicas consuming one
        session at once, the second waits on the row lock, re-reads ``used=1`` and updates
        nothing. Every commit here is durable, ``durable`` or not."""
        won = c.execute("UPDATE sessions SET used=1 WHERE session_id=%s AND node_id=%s "
                        "AND used=0", (session_id, node_id)).rowcount == 1
        r = c.execute("SELECT * FROM sessions WHERE session_id=%s", (session_id,)).fetchone()
        if r is None:
            return None
        session = self._session(r)
        if session.node_id != node_id:
            return session
        return Session(session_id=session.session_id, node_id=session.node_id,
                       job_id=session.job_id, nonce=session.nonce,
                       expires_ms=session.expires_ms, used=not won)

    @_guarded
    def mark_session_used(self, c: psycopg.Connection, session_id: str) -> None:
        c.execute("UPDATE sessions SET used=1 WHERE session_id=%s", (session_id,))

    @_guarded
    def pending_sessions(self, c: psycopg.Connection, node_id: str, now_ms: int,
                         limit: int) -> int:
        return c.execute(
            "SELECT COUNT(*) FROM (SELECT 1 FROM sessions WHERE node_id=%s AND used=0 "
            "AND expires_ms>%s LIMIT %s) AS p", (node_id, now_ms, limit)).fetchone()[0]

    @_guarded
    def put_session_claims(self, c: psycopg.Connection, session_id: str,
                           claims_json: bytes) -> None:
        c.execute("UPDATE sessions SET claims=%s WHERE session_id=%s", (claims_json, session_id))

    @_guarded
    def release_reads(
        self, c: psycopg.Connection, *, node_id: str, tenant_id: str, dataset_id: str,
        key_version: int, session_id: str,
    ) -> tuple[Node | None, Tenant | None, Dataset | None, DatasetShare | None,
               Session | None, bytes | None]:
        """The rows one release checks, read in one transaction on one connection."""
        session, claims = self._session_and_claims(c, session_id)
        return (self._get_node(c, node_id), self._get_tenant(c, tenant_id),
                self._get_dataset(c, tenant_id, dataset_id),
                self._get_share(c, tenant_id, dataset_id, key_version), session, claims)

    @_guarded
    def get_session_and_claims(self, c: psycopg.Connection,
                               session_id: str) -> tuple[Session | None, bytes | None]:
        return self._session_and_claims(c, session_id)

    def _session_and_claims(self, c: psycopg.Connection,
                            session_id: str) -> tuple[Session | None, bytes | None]:
        r = c.execute("SELECT * FROM sessions WHERE session_id=%s", (session_id,)).fetchone()
        if r is None:
            return None, None
        return self._session(r), None if r[6] is None else bytes(r[6])

    @_guarded
    def get_session_claims(self, c: psycopg.Connection, session_id: str) -> bytes | None:
        r = c.execute("SELECT claims FROM sessions WHERE session_id=%s",
                      (session_id,)).fetchone()
        return None if r is None or r[0] is None else bytes(r[0])

    # ------------------------------------------------------------ policies, grants
    @_guarded
    def put_policy(self, c: psycopg.Connection, tenant_id: str, digest: str, text: str) -> None:
        c.execute("INSERT INTO policies VALUES (%s,%s,%s) ON CONFLICT DO NOTHING",
                  (tenant_id, digest, text))

    @_guarded
    def get_policy(self, c: psycopg.Connection, tenant_id: str, digest: str) -> str | None:
        r = c.execute("SELECT text FROM policies WHERE tenant_id=%s AND digest=%s",
                      (tenant_id, digest)).fetchone()
        return None if r is None else r[0]

    @_guarded
    def add_grant(self, c: psycopg.Connection, g: Grant, document: bytes,
                  signature: bytes) -> None:
        c.execute("INSERT INTO grants VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)",
                  (g.grant_id, g.tenant_id, g.dataset_id, g.job_id, g.policy_digest,
                   g.max_nodes, g.expires_ms, int(g.revoked), document, signature))

    @staticmethod
    def _grant(r: tuple) -> Grant:
        return Grant(grant_id=r[0], tenant_id=r[1], dataset_id=r[2], job_id=r[3],
                     policy_digest=r[4], max_nodes=r[5], expires_ms=r[6], revoked=bool(r[7]))

    @_guarded
    def get_grant(self, c: psycopg.Connection, tenant_id: str, grant_id: str) -> Grant | None:
        r = c.execute("SELECT * FROM grants WHERE tenant_id=%s AND grant_id=%s",
                      (tenant_id, grant_id)).fetchone()
        return None if r is None else self._grant(r)

    @_guarded
    def grant_document(self, c: psycopg.Connection, tenant_id: str,
                       grant_id: str) -> tuple[bytes, bytes] | None:
        r = c.execute("SELECT document, signature FROM grants WHERE tenant_id=%s AND "
                      "grant_id=%s", (tenant_id, grant_id)).fetchone()
        return None if r is None else (bytes(r[0]), bytes(r[1]))

    @_guarded
    def grants_for(self, c: psycopg.Connection, *, job_id: str,
                   dataset_id: str | None = None) -> list[Grant]:
        if dataset_id is None:
            rows = c.execute("SELECT * FROM grants WHERE job_id=%s ORDER BY grant_id",
                             (job_id,))
        else:
            rows = c.execute("SELECT * FROM grants WHERE job_id=%s AND dataset_id=%s "
                             "ORDER BY grant_id", (job_id, dataset_id))
        return [self._grant(r) for r in rows]

    @_guarded
    def grants_with_documents(self, c: psycopg.Connection, *, job_id: str,
                              dataset_id: str) -> list[tuple[Grant, tuple[bytes, bytes]]]:
        rows = c.execute("SELECT * FROM grants WHERE job_id=%s AND dataset_id=%s "
                         "ORDER BY grant_id", (job_id, dataset_id))
        return [(self._grant(r), (bytes(r[8]), bytes(r[9]))) for r in rows]

    @_guarded
    def revoke_grant(self, c: psycopg.Connection, tenant_id: str, grant_id: str) -> bool:
        return c.execute("UPDATE grants SET revoked=1 WHERE tenant_id=%s AND grant_id=%s",
                         (tenant_id, grant_id)).rowcount == 1

    # ------------------------------------------------------------------ leases
    @_guarded
    def add_lease(self, c: psycopg.Connection, le: Lease) -> None:
        self._insert_lease(c, le)

    @staticmethod
    def _insert_lease(c: psycopg.Connection, le: Lease) -> None:
        c.execute("INSERT INTO leases VALUES (%s,%s,%s,%s,%s,%s,%s)",
                  (le.lease_id, le.node_id, le.grant_id, le.tenant_id, le.dataset_id,
                   le.expires_ms, int(le.revoked)))

    @staticmethod
    def _lease(r: tuple) -> Lease:
        return Lease(lease_id=r[0], node_id=r[1], grant_id=r[2], tenant_id=r[3],
                     dataset_id=r[4], expires_ms=r[5], revoked=bool(r[6]))

    @_guarded
    def get_lease(self, c: psycopg.Connection, lease_id: str) -> Lease | None:
        r = c.execute("SELECT * FROM leases WHERE lease_id=%s", (lease_id,)).fetchone()
        return None if r is None else self._lease(r)

    @_guarded
    def extend_lease(self, c: psycopg.Connection, lease_id: str, expires_ms: int) -> None:
        c.execute("UPDATE leases SET expires_ms=%s WHERE lease_id=%s", (expires_ms, lease_id))

    @_guarded
    def drop_lease(self, c: psycopg.Connection, lease_id: str) -> None:
        c.execute("DELETE FROM leases WHERE lease_id=%s", (lease_id,))

    @_guarded
    def active_lease_nodes(self, c: psycopg.Connection, tenant_id: str, grant_id: str,
                           now_ms: int) -> set[str]:
        rows = c.execute("SELECT DISTINCT node_id FROM leases WHERE grant_id=%s AND "
                         "tenant_id=%s AND revoked=0 AND expires_ms>%s",
                         (grant_id, tenant_id, now_ms))
        return {r[0] for r in rows}

    @_guarded
    def lease_room(self, c: psycopg.Connection, tenant_id: str, grant_id: str, node_id: str,
                   now_ms: int, max_nodes: int) -> bool:
        return self._room(c, tenant_id, grant_id, node_id, now_ms, max_nodes)

    @_guarded
    def take_lease(self, c: psycopg.Connection, lease: Lease, *, now_ms: int,
                   max_nodes: int) -> bool:
        """Insert ``lease`` if its grant has room for its node, as one transaction holding
        an advisory lock on (tenant, grant) until commit: replicas take turns per grant."""
        c.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))",
                  (f"lease:{len(lease.tenant_id)}:{lease.tenant_id}:{lease.grant_id}",))
        if not self._room(c, lease.tenant_id, lease.grant_id, lease.node_id, now_ms, max_nodes):
            return False
        self._insert_lease(c, lease)
        return True

    @staticmethod
    def _room(c: psycopg.Connection, tenant_id: str, grant_id: str, node_id: str, now_ms: int,
              max_nodes: int) -> bool:
        if c.execute("SELECT 1 FROM leases WHERE grant_id=%s AND node_id=%s AND tenant_id=%s "
                     "AND revoked=0 AND expires_ms>%s LIMIT 1",
                     (grant_id, node_id, tenant_id, now_ms)).fetchone() is not None:
            return True
        n = c.execute("SELECT COUNT(*) FROM (SELECT DISTINCT node_id FROM leases WHERE "
                      "grant_id=%s AND tenant_id=%s AND revoked=0 AND expires_ms>%s "
                      "LIMIT %s) AS h", (grant_id, tenant_id, now_ms, max(0, max_nodes))
                      ).fetchone()[0]
        return n < max_nodes

    @_guarded
    def revoke_leases(
        self, c: psycopg.Connection, *, now_ms: int, node_id: str | None = None,
        grant_id: str | None = None, tenant_id: str | None = None,
        dataset_id: str | None = None,
    ) -> list[Lease]:
        where, args = ["revoked=0", "expires_ms>%s"], [now_ms]
        for column, value in (("node_id", node_id), ("grant_id", grant_id),
                              ("tenant_id", tenant_id), ("dataset_id", dataset_id)):
            if value is not None:
                where.append(f"{column}=%s")
                args.append(value)
        # fixed column names only; values are bound parameters
        rows = c.execute(f"UPDATE leases SET revoked=1 WHERE {' AND '.join(where)} "  # noqa: S608
                         "RETURNING *", args)
        # as they were before this update (active)
        return [Lease(lease_id=r[0], node_id=r[1], grant_id=r[2], tenant_id=r[3],
                      dataset_id=r[4], expires_ms=r[5], revoked=False) for r in rows]

    # ------------------------------------------------------------------ janitor
    @_guarded
    def expired_uploads(self, c: psycopg.Connection, before_ms: int, limit: int) -> list[str]:
        rows = c.execute("SELECT upload_id FROM uploads WHERE expires_ms<%s "
                         "ORDER BY expires_ms LIMIT %s", (before_ms, limit))
        return [r[0] for r in rows]

    @_guarded
    def delete_upload(self, c: psycopg.Connection, upload_id: str) -> None:
        r = c.execute("DELETE FROM uploads WHERE upload_id=%s RETURNING tenant_id, dataset_id",
                      (upload_id,)).fetchone()
        if r is not None:
            c.execute(
                "DELETE FROM datasets WHERE tenant_id=%s AND dataset_id=%s AND "
                "status='pending' AND NOT EXISTS (SELECT 1 FROM dataset_shares s WHERE "
                "s.tenant_id=%s AND s.dataset_id=%s) AND NOT EXISTS (SELECT 1 FROM uploads u "
                "WHERE u.tenant_id=%s AND u.dataset_id=%s)", (r[0], r[1]) * 3)

    @_guarded
    def purge_expired(self, c: psycopg.Connection, before_ms: int) -> tuple[int, int]:
        sessions = c.execute("DELETE FROM sessions WHERE expires_ms<%s", (before_ms,)).rowcount
        leases = c.execute("DELETE FROM leases WHERE expires_ms<%s", (before_ms,)).rowcount
        return sessions, leases

    # ------------------------------------------------- revocations between replicas
    @_guarded
    def add_revocation_events(self, c: psycopg.Connection, origin: str,
                              events: list[tuple[str, RevocationEvent]], now_ms: int,
                              keep_ms: int) -> None:
        # held to commit: ids become visible in the order they were drawn
        c.execute("SELECT pg_advisory_xact_lock(%s, %s)", (_LOCK_NS, _LOCK_EVENTS))
        c.execute("DELETE FROM revocation_events WHERE created_ms<%s", (now_ms - keep_ms,))
        with c.cursor() as cur:
            cur.executemany(
                "INSERT INTO revocation_events (origin, node_id, lease_id, tenant_id, "
                "dataset_id, reason, created_ms) VALUES (%s,%s,%s,%s,%s,%s,%s)",
                [(origin, node, e.lease_id, e.tenant_id, e.dataset_id, e.reason, now_ms)
                 for node, e in events])
        c.execute(f"NOTIFY {NOTIFY_CHANNEL}")  # sent at commit, dropped on rollback

    @_guarded
    def revocation_events_after(
        self, c: psycopg.Connection, after_id: int, origin: str
    ) -> tuple[int, list[tuple[str, RevocationEvent]]]:
        """Events with id > ``after_id`` from other origins, and the highest id now stored
        (``after_id < 0``: only that id, no events)."""
        last = c.execute("SELECT COALESCE(MAX(id), 0) FROM revocation_events").fetchone()[0]
        if after_id < 0 or last <= after_id:
            return max(last, after_id), []
        rows = c.execute(
            "SELECT node_id, lease_id, tenant_id, dataset_id, reason FROM revocation_events "
            "WHERE id>%s AND id<=%s AND origin<>%s ORDER BY id", (after_id, last, origin))
        return last, [(r[0], RevocationEvent(r[1], r[2], r[3], r[4])) for r in rows]

    def wait_revocations(self, timeout_s: float) -> bool:
        """Block until another replica commits revocation events (a NOTIFY arrives) or
        ``timeout_s`` passes; True if notified. Only the relay's thread calls this. A lost
        listening connection is reopened on the next call; meanwhile the relay polls."""
        with self._listen_lock:
            try:
                if self._listener is None or self._listener.closed:
                    self._listener = psycopg.connect(self._dsn, autocommit=True,
                                                     connect_timeout=CONNECT_TIMEOUT_S)
                    self._listener.execute(f"LISTEN {NOTIFY_CHANNEL}")
                listener = self._listener
            except psycopg.Error as exc:
                self._listener = None
                raise Unavailable(f"state store unavailable: {type(exc).__name__}") from None
        try:
            got = False
            for _ in listener.notifies(timeout=timeout_s, stop_after=1):
                got = True
            return got
        except psycopg.Error as exc:
            with self._listen_lock:
                if self._listener is listener:
                    listener.close()
                    self._listener = None
            raise Unavailable(f"state store unavailable: {type(exc).__name__}") from None
