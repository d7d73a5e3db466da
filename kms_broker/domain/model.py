"""Records the broker keeps (DESIGN.md sections 3 and 5). Plain frozen dataclasses."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

__all__ = [
    "Dataset",
    "DatasetShare",
    "Grant",
    "Lease",
    "Node",
    "Session",
    "Tenant",
    "Upload",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class Tenant:
    tenant_id: str
    signing_public_key: bytes  # raw Ed25519
    kek_version: int
    status: Literal["active", "shredded"] = "active"
    created_ms: int = 0
    binding_sig: bytes = b""  # broker signature over (tenant_id, key): domain.bindings


@dataclass(frozen=True, slots=True, kw_only=True)
class Dataset:
    tenant_id: str
    dataset_id: str
    share_index: int
    share_count: int
    manifest_name: str = ""
    # the key version manifest_name belongs to (0: not recorded: a row from before the column)
    manifest_key_version: int = 0
    store_uri: str = ""
    holders: tuple[str, ...] = ()
    status: Literal["pending", "active"] = "pending"
    created_ms: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class DatasetShare:
    tenant_id: str
    dataset_id: str
    key_version: int
    kek_version: int
    wrapped_share: bytes = field(repr=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class Upload:
    upload_id: str
    tenant_id: str
    dataset_id: str
    key_version: int
    share_index: int
    share_count: int
    expires_ms: int
    import_public_key: bytes
    committed: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Node:
    node_id: str
    tenant_scope: str  # "" means any tenant
    ak_public: bytes
    ek_certificate: bytes
    revoked: bool = False
    reinstated: bool = False  # revoked, and an operator allowed its next enrolment
    enrolled_ms: int = 0
    binding_sig: bytes = b""  # broker signature over (node_id, scope, AK, EK cert)


@dataclass(frozen=True, slots=True, kw_only=True)
class Session:
    session_id: str
    node_id: str
    job_id: str
    nonce: bytes
    expires_ms: int
    used: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Grant:
    grant_id: str
    tenant_id: str
    dataset_id: str
    job_id: str
    policy_digest: str
    max_nodes: int
    expires_ms: int
    revoked: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Lease:
    lease_id: str
    node_id: str
    grant_id: str
    tenant_id: str
    dataset_id: str
    expires_ms: int
    revoked: bool = False
