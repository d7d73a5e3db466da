"""Raw primitives: the one module that calls AEAD, key wrap, block cipher and KDF code.

Only the recipes import it (``tests/test_crypto_tier.py`` enforces the rule by scanning the
imports of every module): :mod:`sealed.streaming` (shards, manifests and checkpoints: one
AEAD format), :mod:`sealed.keys` (the DEK and the keys derived from it),
:mod:`kms_broker.sealing` (a share sealed to a node key), :mod:`kms_broker.hsm.fake` (the
test HSM's wrapping). Everything else uses a recipe, never a primitive. (The one other module
that holds a cipher is :mod:`attest.tpm2.credential`: AES-CFB and KDFa there are the TPM 2.0
credential protocol's own construction, checked against a real TPM, not one of our formats.)

Everything here goes through ``cryptography`` (OpenSSL inside its Rust bindings); nothing
loads the system libcrypto by hand. HKDF-SHA256 (RFC 5869) writes straight into a
caller-owned buffer (``HKDF.derive_into``), so a derived key never exists as an immutable
``bytes`` object that Python would free without wiping.
"""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.keywrap import (
    InvalidUnwrap,
    aes_key_unwrap_with_padding,
    aes_key_wrap_with_padding,
)

__all__ = [
    "AESGCM",
    "InvalidUnwrap",
    "aes_ecb_encrypt_into",
    "aes_key_unwrap_with_padding",
    "aes_key_wrap_with_padding",
    "hkdf_sha256_into",
]

_HASH_LEN = 32


def hkdf_sha256_into(out: memoryview | bytearray, ikm: object, *, salt: bytes, info: bytes) -> None:
    """Fill ``out`` with HKDF-SHA256(ikm, salt, info); 1 <= len(out) <= 255 * 32.

    An empty ``salt`` means the RFC's default (32 zero bytes)."""
    out_view = memoryview(out).cast("B")
    length = len(out_view)
    if not 0 < length <= 255 * _HASH_LEN:
        raise ValueError("HKDF output length must be 1..8160 bytes")
    if out_view.readonly:
        raise ValueError("HKDF output needs a writable buffer")
    kdf = HKDF(algorithm=hashes.SHA256(), length=length, salt=bytes(salt) or None,
               info=bytes(info))
    kdf.derive_into(ikm, out_view)  # type: ignore[arg-type]


def aes_ecb_encrypt_into(key: object, data: bytes, out: bytearray | memoryview) -> int:
    """AES-ECB over whole blocks into ``out`` (one block longer than ``data``); returns the
    bytes written. A KDF step over public, block-aligned input only."""
    encryptor = Cipher(algorithms.AES(key), modes.ECB()).encryptor()  # type: ignore[arg-type] # noqa: S305
    n = encryptor.update_into(data, out)
    encryptor.finalize()
    return n
