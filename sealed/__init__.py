"""Sealed dataset format: encrypted shards and manifests that tenants write, trainers read."""

from sealed.keys import DEK_SIZE, SHARE_SIZE, derive_dek, validate_identifier
from sealed.secrets import SecretBuffer, zeroize

__all__ = [
    "DEK_SIZE",
    "SHARE_SIZE",
    "SecretBuffer",
    "derive_dek",
    "validate_identifier",
    "zeroize",
]
