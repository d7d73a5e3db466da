"""Object labels in the HSM and checks on the values every backend accepts.

    tenant/<tenant_id>/kek/v<n>   tenant KEK, AES-256 (CKA_ID = b"tenant/<tenant_id>")
    import/<import_id>            import key pair, EC P-256
    broker/signing                broker signing key pair, EC P-256
    ctrain/token-marker           data object whose presence proves the token's objects are
                                  readable (told apart from "this key does not exist")

Identifiers follow ``sealed.keys.validate_identifier`` so labels cannot be forged by an id
containing ``/``. Versions are 1 .. 2**32-1.
"""

from __future__ import annotations

from sealed.keys import validate_identifier

__all__ = [
    "MARKER_LABEL",
    "SIGNING_LABEL",
    "WRAPPED_SHARE_SIZE",
    "check_version",
    "check_wrapped_share",
    "import_label",
    "kek_id",
    "kek_label",
    "kek_prefix",
]

SIGNING_LABEL = "broker/signing"
MARKER_LABEL = "ctrain/token-marker"
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
