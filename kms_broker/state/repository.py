"""What the broker needs from its state store. SQLite implements it (``state.sqlite``), and
PostgreSQL (``state.postgres``) for replicated brokers (DESIGN.md section 8); one contract
suite (tests/kms_broker/test_repository_contract.py) runs against both.

Every method is atomic. Methods that create raise ``AlreadyExists`` on a taken id; lookups
return ``None`` for unknown ids; a store that cannot be reached raises ``Unavailable``.
"""

from __future__ import annotations

from typing import Any, Protocol

from kms_broker.domain.errors import AuthorizationChanged
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

__all__ = ["Repository", "check_still_authorized"]


def check_still_authorized(lease: Lease, tenant: Any, grant: Any, node: Any) -> None:
    """Raise :class:`AuthorizationChanged` unless the rows (status,), (revoked,), (revoked,)
    read for ``lease`` say its tenant is active, its grant and its node not revoked."""
    if tenant is None or tenant[0] != "active":
        raise AuthorizationChanged(f"tenant.shredded: tenant {lease.tenant_id} has been "
                                   f"shredded")
    if grant is None or grant[0]:
        raise AuthorizationChanged(f"grant.revoked: grant {lease.grant_id} has been revoked")
    if node is None or node[0] != 0:  # 0: NODE_ACTIVE in both stores
        raise AuthorizationChanged(f"node.revoked: node {lease.node_id} has been revoked")


class Repository(Protocol):
    # tenants
    def add_tenant(self, tenant: Tenant) -> None: ...
    def get_tenant(self, tenant_id: str) -> Tenant | None: ...
    def set_tenant_kek_version(self, tenant_id: str, version: int) -> None: ...
    def set_tenant_status(self, tenant_id: str, status: str) -> None: ...

    # uploads, datasets and wrapped shares
    def add_upload(self, upload: Upload) -> None: ...
    def get_upload(self, upload_id: str) -> Upload | None: ...
    def set_upload_public_key(self, upload_id: str, public_key: bytes) -> None: ...
    def mark_upload_committed(self, upload_id: str) -> bool: ...  # False if already committed
    def pending_uploads(self, tenant_id: str, now_ms: int, limit: int) -> int: ...
    def put_dataset(self, dataset: Dataset) -> None: ...  # insert or replace while pending
    def get_dataset(self, tenant_id: str, dataset_id: str) -> Dataset | None: ...
    def list_datasets(self, tenant_id: str) -> list[Dataset]: ...
    def delete_dataset(self, tenant_id: str, dataset_id: str) -> bool: ...
    def put_share(self, share: DatasetShare) -> None: ...
    def get_share(
        self, tenant_id: str, dataset_id: str, key_version: int
    ) -> DatasetShare | None: ...
    def list_shares(self, tenant_id: str, dataset_id: str | None = None) -> list[DatasetShare]: ...
    def replace_share(self, share: DatasetShare) -> None: ...

    # nodes and sessions
    def put_node(self, node: Node) -> bool: ...  # False: a revoked node not reinstated
    def get_node(self, node_id: str) -> Node | None: ...
    def revoke_node(self, node_id: str) -> bool: ...
    def reinstate_node(self, node_id: str) -> bool: ...  # False unless revoked
    def list_nodes(self) -> list[Node]: ...  # every enrolled node, by node id
    def add_session(self, session: Session) -> None: ...
    # marks used atomically, only if the session is node_id's (another node's is not burnt);
    # durable=False: atomic and visible to every process at once, but on disk only with the
    # next durable write (the caller makes one, e.g. mark_session_used, before it answers)
    def consume_session(self, session_id: str, node_id: str, *,
                        durable: bool = True) -> Session | None: ...
    def mark_session_used(self, session_id: str) -> None: ...  # durably, idempotent
    def pending_sessions(self, node_id: str, now_ms: int, limit: int) -> int: ...
    def get_session(self, session_id: str) -> Session | None: ...
    def put_session_claims(self, session_id: str, claims_json: bytes) -> None: ...
    def get_session_claims(self, session_id: str) -> bytes | None: ...
    def release_reads(
        self, *, node_id: str, tenant_id: str, dataset_id: str, key_version: int,
        session_id: str,
    ) -> tuple[Node | None, Tenant | None, Dataset | None, DatasetShare | None,
               Session | None, bytes | None]: ...
    def get_session_and_claims(
        self, session_id: str
    ) -> tuple[Session | None, bytes | None]: ...

    # policies and grants
    def put_policy(self, tenant_id: str, digest: str, text: str) -> None: ...
    def get_policy(self, tenant_id: str, digest: str) -> str | None: ...
    def add_grant(self, grant: Grant, document: bytes, signature: bytes) -> None: ...
    # grant ids are scoped per tenant
    def get_grant(self, tenant_id: str, grant_id: str) -> Grant | None: ...
    def grant_document(
        self, tenant_id: str, grant_id: str
    ) -> tuple[bytes, bytes] | None: ...  # (doc, sig)
    def grants_for(self, *, job_id: str, dataset_id: str | None = None) -> list[Grant]: ...
    def grants_with_documents(
        self, *, job_id: str, dataset_id: str
    ) -> list[tuple[Grant, tuple[bytes, bytes]]]: ...  # each with its (document, signature)
    def revoke_grant(self, tenant_id: str, grant_id: str) -> bool: ...

    # leases
    def add_lease(self, lease: Lease) -> None: ...
    def get_lease(self, lease_id: str) -> Lease | None: ...
    def extend_lease(self, lease_id: str, expires_ms: int) -> None: ...
    def drop_lease(self, lease_id: str) -> None: ...  # a reservation that never took effect
    def active_lease_nodes(self, tenant_id: str, grant_id: str, now_ms: int) -> set[str]: ...
    def lease_room(self, tenant_id: str, grant_id: str, node_id: str, now_ms: int,
                   max_nodes: int) -> bool: ...
    def take_lease(
        self, lease: Lease, *, now_ms: int, max_nodes: int
    ) -> bool: ...  # lease_room + add_lease as one step, atomic across broker processes;
    # AuthorizationChanged if the tenant, grant or node no longer allow it (read in the step)
    def revoke_leases(
        self,
        *,
        now_ms: int,
        node_id: str | None = None,
        grant_id: str | None = None,
        tenant_id: str | None = None,
        dataset_id: str | None = None,
    ) -> list[Lease]: ...  # the active leases it revoked

    # janitor: expired state is deleted, so state stays bounded under sustained load
    def expired_uploads(self, before_ms: int, limit: int) -> list[str]: ...
    def delete_upload(self, upload_id: str) -> None: ...
    def purge_expired(self, before_ms: int) -> tuple[int, int]: ...  # (sessions, leases)
