"""Tenant-signed grants: which job may receive which dataset's share, under which policy.

Wire format (``CreateGrantRequest.grant``) is a canonical JSON object (see
:mod:`kms_broker.encoding`), at most 4096 bytes::

    {"dataset_id": str, "expires_unix_ms": int, "grant_id": str, "job_id": str,
     "max_nodes": int (1-1024), "policy_digest": str (64 hex), "tenant_id": str,
     "type": "kmsbroker.grant/v1"}

The signature is raw Ed25519 (64 bytes) by the tenant's own key over
``b"kmsbroker/v1/grant\\x00" || grant``. The broker only ever holds the public key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from kms_broker.encoding import canonical_json, parse_canonical_json
from sealed.keys import validate_identifier

__all__ = ["MAX_GRANT_SIZE", "GrantDocument", "InvalidGrantSignature", "sign_grant", "verify_grant"]

MAX_GRANT_SIZE = 4096
SIGNATURE_SIZE = 64
GRANT_DOMAIN = b"kmsbroker/v1/grant\x00"
GRANT_TYPE = "kmsbroker.grant/v1"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_FIELDS = {
    "dataset_id", "expires_unix_ms", "grant_id", "job_id", "max_nodes", "policy_digest",
    "tenant_id", "type",
}


class InvalidGrantSignature(Exception):
    """The signature is not the named tenant's."""


@dataclass(frozen=True, slots=True, kw_only=True)
class GrantDocument:
    grant_id: str
    tenant_id: str
    dataset_id: str
    job_id: str
    policy_digest: str
    max_nodes: int
    expires_unix_ms: int

    def __post_init__(self) -> None:
        for kind in ("grant", "tenant", "dataset", "job"):
            validate_identifier(kind, getattr(self, f"{kind}_id"))
        if not isinstance(self.policy_digest, str) or not _HEX64.match(self.policy_digest):
            raise ValueError("policy_digest must be 64 lowercase hex characters")
        if not isinstance(self.max_nodes, int) or not 1 <= self.max_nodes <= 1024:
            raise ValueError("max_nodes must be an integer from 1 to 1024")
        if not isinstance(self.expires_unix_ms, int) or not 0 < self.expires_unix_ms < 2**53:
            raise ValueError("expires_unix_ms must be a positive integer")

    def encode(self) -> bytes:
        return canonical_json(
            {
                "dataset_id": self.dataset_id,
                "expires_unix_ms": self.expires_unix_ms,
                "grant_id": self.grant_id,
                "job_id": self.job_id,
                "max_nodes": self.max_nodes,
                "policy_digest": self.policy_digest,
                "tenant_id": self.tenant_id,
                "type": GRANT_TYPE,
            }
        )

    @classmethod
    def decode(cls, data: bytes) -> GrantDocument:
        obj = parse_canonical_json(data, what="grant", max_size=MAX_GRANT_SIZE)
        if set(obj) != _FIELDS:
            missing, extra = sorted(_FIELDS - set(obj)), sorted(set(obj) - _FIELDS)
            raise ValueError(f"grant fields wrong: missing {missing}, unexpected {extra}")
        if obj.pop("type") != GRANT_TYPE:
            raise ValueError(f"grant type must be {GRANT_TYPE!r}")
        return cls(**obj)


def sign_grant(grant: GrantDocument, key: Ed25519PrivateKey) -> tuple[bytes, bytes]:
    """Tenant side: returns (grant bytes, signature)."""
    data = grant.encode()
    return data, key.sign(GRANT_DOMAIN + data)


def verify_grant(data: bytes, signature: bytes, public_key: bytes) -> GrantDocument:
    """Broker side: parse and check the signature. ValueError for malformed input."""
    if len(signature) != SIGNATURE_SIZE:
        raise ValueError(f"grant signature must be {SIGNATURE_SIZE} bytes")
    grant = GrantDocument.decode(data)
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, GRANT_DOMAIN + data)
    except InvalidSignature:
        raise InvalidGrantSignature("grant signature is not by the tenant's key") from None
    return grant
