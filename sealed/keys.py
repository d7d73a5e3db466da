"""Dataset key derivation from key shares (DESIGN.md section 3).

    DEK = HKDF-SHA256(ikm  = S_1 || ... || S_n,
                      salt = dataset_id (UTF-8),
                      info = b"dataset-key/v1" || 0x00 || tenant_id || 0x00 || BE32(key_version))

    K_ckpt = HKDF-SHA256(ikm = DEK, salt = empty (32 zero bytes),
                         info = b"checkpoint/v1" || 0x00 || job_id (ASCII))

(the key of a job's checkpoints, :func:`derive_checkpoint_key`: resuming needs the DEK, i.e.
a fresh attested release, and one job cannot read another's checkpoints).

Shares are ordered by their index (the position of the broker in the manifest's holder list),
each exactly :data:`SHARE_SIZE` bytes. The result is a 32-byte :class:`SecretBuffer`; the
concatenated input lives only in a locked scratch buffer that is zeroed before returning.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Sequence

from sealed._primitives import hkdf_sha256_into
from sealed.secrets import SecretBuffer

__all__ = [
    "DEK_SIZE",
    "MAX_SHARES",
    "SHARE_SIZE",
    "derive_checkpoint_key",
    "derive_dek",
    "validate_identifier",
]

SHARE_SIZE = 32
DEK_SIZE = 32
MAX_SHARES = 16
DEK_INFO_PREFIX = b"dataset-key/v1"
CHECKPOINT_INFO_PREFIX = b"checkpoint/v1\x00"
_IDENTIFIER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def validate_identifier(kind: str, value: str) -> str:
    """Tenant, dataset and job ids: 1-128 chars of [A-Za-z0-9._-], not starting with a symbol."""
    if not isinstance(value, str) or not _IDENTIFIER.fullmatch(value):
        raise ValueError(
            f"{kind} id must be 1-128 characters of letters, digits, '.', '_' or '-', "
            f"starting with a letter or digit; got {value!r:.60}"
        )
    return value


def _info(tenant_id: str, key_version: int) -> bytes:
    return (
        DEK_INFO_PREFIX + b"\x00" + tenant_id.encode() + b"\x00" + struct.pack(">I", key_version)
    )


def derive_dek(
    shares: Sequence[SecretBuffer],
    *,
    tenant_id: str,
    dataset_id: str,
    key_version: int,
) -> SecretBuffer:
    """Combine n-of-n shares into the dataset key. The shares are left untouched."""
    validate_identifier("tenant", tenant_id)
    validate_identifier("dataset", dataset_id)
    if not isinstance(key_version, int) or not 1 <= key_version < 2**32:
        raise ValueError("key_version must be an integer from 1 to 2**32-1")
    if not 1 <= len(shares) <= MAX_SHARES:
        raise ValueError(f"a dataset key needs 1 to {MAX_SHARES} shares, got {len(shares)}")
    for i, share in enumerate(shares):
        if not isinstance(share, SecretBuffer) or len(share) != SHARE_SIZE:
            raise ValueError(f"share {i} must be a {SHARE_SIZE}-byte SecretBuffer")
    with SecretBuffer(SHARE_SIZE * len(shares)) as ikm:
        with ikm.view() as out:
            for i, share in enumerate(shares):
                with share.view() as s:
                    out[i * SHARE_SIZE : (i + 1) * SHARE_SIZE] = s
        dek = SecretBuffer(DEK_SIZE)
        with ikm.view() as ikm_view, dek.view() as dek_view:
            hkdf_sha256_into(
                dek_view, ikm_view, salt=dataset_id.encode(), info=_info(tenant_id, key_version)
            )
        return dek


def derive_checkpoint_key(dek: SecretBuffer, job_id: str) -> SecretBuffer:
    """The 32-byte key of ``job_id``'s checkpoints (see the module docstring)."""
    validate_identifier("job", job_id)
    if not isinstance(dek, SecretBuffer) or len(dek) != DEK_SIZE:
        raise ValueError(f"the dataset key must be a {DEK_SIZE}-byte SecretBuffer")
    key = SecretBuffer(DEK_SIZE)
    with dek.view() as ikm, key.view() as out:
        hkdf_sha256_into(out, ikm, salt=b"", info=CHECKPOINT_INFO_PREFIX + job_id.encode("ascii"))
    return key
