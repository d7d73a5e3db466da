"""Object labels in the HSM and checks on the values every backend accepts.

    tenant/<tenant_id>/kek/v<n>   tenant KEK, AES-256 (CKA_ID = b"tenant/<tenant_id>")
    import/<import_id>            import key pair, EC P-256
    broker/signing                broker signing key pair, EC P-256
    ctrain/token-marker           data object whose presence proves the token's objects are
                                  readable (told apart from "this key does not exist")

Identifiers follow ``sealed.keys.validate_identifier`` so labels cannot be forged by an id
containing ``/``. Versions are 1 .. 2**32-1.

Share binding. A wrapped share is bound to the place it belongs: (tenant, dataset, key
version, share index). Inside the HSM the tenant KEK is never used to wrap directly; each
share is wrapped under a key derived from the KEK and the binding
(``kms_broker.hsm.interface`` gives the construction), so a wrapped share copied to another
dataset's row, key version or share index does not unwrap. The binding is encoded like a
sealing transcript (``kms_broker.sealing``), byte by byte::

    BE16 23 || "ctrain/share-binding/v1"
    BE32 len || tenant_id (UTF-8)
    BE32 len || dataset_id (UTF-8)
    BE32 4   || BE32 key_version
    BE32 4   || BE32 share_index

and the derivation input is its SHA-256 (:meth:`ShareBinding.digest`).
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

from sealed.keys import validate_identifier

__all__ = [
    "ANCHOR_LABEL",
    "MARKER_LABEL",
    "SIGNING_LABEL",
    "WRAPPED_SHARE_SIZE",
    "ShareBinding",
    "check_version",
    "check_wrapped_share",
    "decode_anchor",
    "encode_anchor",
    "import_label",
    "kek_id",
    "kek_label",
    "kek_prefix",
]

SIGNING_LABEL = "broker/signing"
MARKER_LABEL = "ctrain/token-marker"
ANCHOR_LABEL = "ctrain/audit-anchor"  # data object: the audit log's anchored head
WRAPPED_SHARE_SIZE = 40  # AES-KWP of a 32-byte share


def check_version(version: int) -> int:
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version < 2**32:
        raise ValueError("key version must be an integer from 1 to 2**32-1")
    return version


def kek_prefix(tenant_id: str) -> str:
    return f"tenant/{validate_identifier('tenant', tenant_id)}/kek/"


def kek_label(tenant_id: str, version: int) -> str:
    return f"{kek_prefix(tenant_id)}v{check_version(version)}"


def kek_id(tenant_id: str) -> bytes:
    return f"tenant/{validate_identifier('tenant', tenant_id)}".encode()


def import_label(import_id: str) -> str:
    return f"import/{validate_identifier('import', import_id)}"


def check_wrapped_share(wrapped_share: bytes) -> bytes:
    if not isinstance(wrapped_share, bytes | bytearray):
        raise TypeError("wrapped share must be bytes")
    if len(wrapped_share) != WRAPPED_SHARE_SIZE:
        raise ValueError(
            f"wrapped share must be exactly {WRAPPED_SHARE_SIZE} bytes, got {len(wrapped_share)}"
        )
    return bytes(wrapped_share)


_BINDING_LABEL = b"ctrain/share-binding/v1"


def _u32(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**32:
        raise ValueError(f"{name} must be an integer from 0 to 2**32-1")
    return value


@dataclass(frozen=True, slots=True, kw_only=True)
class ShareBinding:
    """Where a wrapped share belongs; checked on construction (``ValueError`` otherwise)."""

    tenant_id: str
    dataset_id: str
    key_version: int
    share_index: int

    def __post_init__(self) -> None:
        validate_identifier("tenant", self.tenant_id)
        validate_identifier("dataset", self.dataset_id)
        _u32("key_version", self.key_version)
        _u32("share_index", self.share_index)

    def encode(self) -> bytes:
        def field(raw: bytes) -> bytes:
            return struct.pack(">I", len(raw)) + raw

        return (
            struct.pack(">H", len(_BINDING_LABEL)) + _BINDING_LABEL
            + field(self.tenant_id.encode()) + field(self.dataset_id.encode())
            + field(struct.pack(">I", self.key_version))
            + field(struct.pack(">I", self.share_index))
        )

    def digest(self) -> bytes:
        return hashlib.sha256(self.encode()).digest()


def encode_anchor(seq: int, record_hash: bytes) -> bytes:
    """Audit anchor value: BE64 seq || 32-byte SHA-256 record hash (40 bytes)."""
    if isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq < 2**63:
        raise ValueError("anchor seq must be a non-negative 63-bit integer")
    if not isinstance(record_hash, bytes | bytearray) or len(record_hash) != 32:
        raise ValueError("anchor hash must be 32 bytes")
    return struct.pack(">Q", seq) + bytes(record_hash)


def decode_anchor(value: bytes) -> tuple[int, bytes]:
    if len(value) != 40:
        raise ValueError("audit anchor object is not 40 bytes")
    return struct.unpack(">Q", value[:8])[0], bytes(value[8:])
