"""Sealing a key share to a P-256 public key, outside the HSM (tenants and nodes).

This is the mirror of the construction the HSM performs (``kms_broker.hsm.interface``):
a tenant seals a new share to a broker's HSM import key with :func:`seal_share_to`, and a node
opens the share the HSM sealed to its one-time key with :func:`open_sealed_share`.

Construction (ECIES-like, one ephemeral key per sealing)::

    Z      = ECDH-P256(ephemeral_private, recipient_public)    x coordinate, 32 bytes
    K      = AES-256-ECB(key = Z, data = SHA-256(transcript))  32 bytes (two AES blocks)
    sealed = AES-KWP(K, share)                                 RFC 5649, 40 bytes for 32

The KDF step is what a PKCS#11 token can do inside itself after CKM_ECDH1_DERIVE with
CKD_NULL (SoftHSM 2.6 offers no other KDF): CKM_AES_ECB_ENCRYPT_DATA over the transcript
digest. The transcript binds the sealing to its context (attestation session, nonce, dataset,
key version, tenant, broker, recipient key), so a blob opened under any other context fails.

Sealed blob, byte by byte::

    offset  size  field
    0       2     BE16 length of the ephemeral public key, must be 65
    2       65    ephemeral public key, SEC1 uncompressed (0x04 || X || Y)
    67      40    AES-KWP(K, share), share = 32 bytes

Transcripts are canonical, length-prefixed encodings (no separators to confuse)::

    transcript = BE16 len(label) || label || field_1 || ... || field_n
    field      = BE32 len(value) || value        (str values are UTF-8, ints are BE32)

with label ``ctrain/release/v1`` (:func:`release_transcript`) or ``ctrain/import/v1``
(:func:`import_transcript`) and the fields in the order the functions list them. A
transcript is at most :data:`MAX_TRANSCRIPT` bytes.

Any failure to open (wrong key, wrong transcript, modified blob) raises the one opaque
:class:`SealingError`; misuse (wrong types, lengths) raises ``TypeError``/``ValueError``.
Limits of Python: ``cryptography`` returns the ECDH secret and the unwrapped share as
``bytes`` and its key-wrap functions take the share to wrap as ``bytes``; these copies cannot
be wiped. K lives in a :class:`SecretBuffer`, the opened share is copied into one at once, and
the intermediate objects are dropped right away, which shortens but does not remove their
lifetime in memory. (The broker never runs this code: its HSM does the same inside itself.)
"""

from __future__ import annotations

import functools
import hashlib
import struct

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from sealed._primitives import (
    InvalidUnwrap,
    aes_ecb_encrypt_into,
    aes_key_unwrap_with_padding,
    aes_key_wrap_with_padding,
)
from sealed.keys import SHARE_SIZE, validate_identifier
from sealed.secrets import SecretBuffer, zeroize

__all__ = [
    "EC_PUBLIC_KEY_SIZE",
    "MAX_TRANSCRIPT",
    "SEALED_BLOB_SIZE",
    "WRAPPED_SHARE_SIZE",
    "SealingError",
    "aes_ecb_derive",
    "decode_public_key",
    "encode_sealed_blob",
    "generate_node_key",
    "import_transcript",
    "open_sealed_share",
    "parse_sealed_blob",
    "public_key_bytes",
    "release_transcript",
    "seal_share_to",
    "transcript_digest",
]

EC_PUBLIC_KEY_SIZE = 65
WRAPPED_SHARE_SIZE = SHARE_SIZE + 8  # AES-KWP of a 32-byte share
SEALED_BLOB_SIZE = 2 + EC_PUBLIC_KEY_SIZE + WRAPPED_SHARE_SIZE
MAX_TRANSCRIPT = 4096
MAX_FIELD = 1024
_RELEASE_LABEL = b"ctrain/release/v1"
_IMPORT_LABEL = b"ctrain/import/v1"


class SealingError(Exception):
    """The sealed share could not be opened. Deliberately says nothing more."""

    def __init__(self) -> None:
        super().__init__("sealed share could not be opened")


# --- public keys -------------------------------------------------------------------------------


def decode_public_key(data: bytes) -> ec.EllipticCurvePublicKey:
    """Parse a SEC1 uncompressed P-256 point; ``ValueError`` unless it is a valid curve point."""
    if not isinstance(data, bytes | bytearray):
        raise TypeError("public key must be bytes")
    if len(data) != EC_PUBLIC_KEY_SIZE or data[0] != 0x04:
        raise ValueError("public key must be a 65-byte SEC1 uncompressed P-256 point")
    return _point(bytes(data))


@functools.lru_cache(maxsize=256)
def _point(data: bytes) -> ec.EllipticCurvePublicKey:
    """A pure function of the bytes, memoised: the broker checks a node's one-time key at
    Attest and again in the Release transcript (a bad point raises, and is not cached)."""
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), data)
    except ValueError:
        raise ValueError("public key is not a point on P-256") from None


def public_key_bytes(key: ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey) -> bytes:
    """SEC1 uncompressed encoding of a P-256 key (the public half of a private key)."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        key = key.public_key()
    if not isinstance(key.curve, ec.SECP256R1):
        raise ValueError("only P-256 keys are used for sealing")
    return key.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )


def generate_node_key() -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    """A one-time P-256 key pair for a node: (private key object, SEC1 public bytes).

    The private key stays an opaque ``cryptography`` object (OpenSSL memory, freed with it);
    drop it as soon as the shares are opened.
    """
    private = ec.generate_private_key(ec.SECP256R1())
    return private, public_key_bytes(private)


# --- blob format -------------------------------------------------------------------------------


def encode_sealed_blob(ephemeral_public: bytes, sealed: bytes) -> bytes:
    if len(ephemeral_public) != EC_PUBLIC_KEY_SIZE:
        raise ValueError("ephemeral public key must be 65 bytes")
    if len(sealed) != WRAPPED_SHARE_SIZE:
        raise ValueError(f"sealed share must be {WRAPPED_SHARE_SIZE} bytes")
    return struct.pack(">H", EC_PUBLIC_KEY_SIZE) + bytes(ephemeral_public) + bytes(sealed)


def parse_sealed_blob(blob: bytes) -> tuple[bytes, bytes]:
    """Split a sealed blob into (ephemeral public key, wrapped share); ``ValueError`` if malformed.

    The ephemeral key is checked to be a point on P-256.
    """
    if not isinstance(blob, bytes | bytearray):
        raise TypeError("sealed blob must be bytes")
    if len(blob) != SEALED_BLOB_SIZE:
        raise ValueError(f"sealed blob must be exactly {SEALED_BLOB_SIZE} bytes, got {len(blob)}")
    (key_len,) = struct.unpack_from(">H", blob, 0)
    if key_len != EC_PUBLIC_KEY_SIZE:
        raise ValueError("sealed blob names an unsupported ephemeral key length")
    ephemeral = bytes(blob[2 : 2 + key_len])
    decode_public_key(ephemeral)
    return ephemeral, bytes(blob[2 + key_len :])


# --- transcripts -------------------------------------------------------------------------------


def _field(name: str, value: bytes | str | int) -> bytes:
    if isinstance(value, bool):
        raise TypeError(f"{name} must not be a bool")
    if isinstance(value, int):
        if not 0 <= value < 2**32:
            raise ValueError(f"{name} must fit in 32 bits unsigned")
        raw = struct.pack(">I", value)
    elif isinstance(value, str):
        raw = value.encode()
    elif isinstance(value, bytes | bytearray):
        raw = bytes(value)
    else:
        raise TypeError(f"{name} must be bytes, str or int")
    if len(raw) > MAX_FIELD:
        raise ValueError(f"{name} is longer than {MAX_FIELD} bytes")
    return struct.pack(">I", len(raw)) + raw


def _transcript(label: bytes, fields: list[tuple[str, bytes | str | int]]) -> bytes:
    out = struct.pack(">H", len(label)) + label + b"".join(_field(n, v) for n, v in fields)
    if len(out) > MAX_TRANSCRIPT:
        raise ValueError(f"transcript is longer than {MAX_TRANSCRIPT} bytes")
    return out


def release_transcript(
    *,
    session_id: bytes | str,
    nonce: bytes,
    tenant_id: str,
    dataset_id: str,
    key_version: int,
    broker_id: str,
    node_public_key: bytes,
) -> bytes:
    """Context of one release: fields in the order session_id, nonce, tenant_id, dataset_id,
    key_version, broker_id, node_public_key."""
    validate_identifier("tenant", tenant_id)
    validate_identifier("dataset", dataset_id)
    decode_public_key(node_public_key)
    if not isinstance(nonce, bytes | bytearray) or not 16 <= len(nonce) <= 64:
        raise ValueError("nonce must be 16-64 bytes")
    return _transcript(
        _RELEASE_LABEL,
        [
            ("session_id", session_id),
            ("nonce", nonce),
            ("tenant_id", tenant_id),
            ("dataset_id", dataset_id),
            ("key_version", key_version),
            ("broker_id", broker_id),
            ("node_public_key", node_public_key),
        ],
    )


def import_transcript(
    *,
    import_id: str,
    tenant_id: str,
    dataset_id: str,
    key_version: int,
    share_index: int,
    broker_id: str,
    import_public_key: bytes,
) -> bytes:
    """Context of one share upload: fields in the order import_id, tenant_id, dataset_id,
    key_version, share_index, broker_id, import_public_key."""
    validate_identifier("import", import_id)
    validate_identifier("tenant", tenant_id)
    validate_identifier("dataset", dataset_id)
    decode_public_key(import_public_key)
    return _transcript(
        _IMPORT_LABEL,
        [
            ("import_id", import_id),
            ("tenant_id", tenant_id),
            ("dataset_id", dataset_id),
            ("key_version", key_version),
            ("share_index", share_index),
            ("broker_id", broker_id),
            ("import_public_key", import_public_key),
        ],
    )


def transcript_digest(transcript: bytes) -> bytes:
    """SHA-256 of a transcript after checking its type and length (the KDF input)."""
    if not isinstance(transcript, bytes | bytearray):
        raise TypeError("transcript must be bytes")
    if not 1 <= len(transcript) <= MAX_TRANSCRIPT:
        raise ValueError(f"transcript must be 1-{MAX_TRANSCRIPT} bytes")
    return hashlib.sha256(transcript).digest()


# --- sealing -----------------------------------------------------------------------------------


def aes_ecb_derive(z: bytes | bytearray | memoryview, digest: bytes) -> SecretBuffer:
    """AES-256-ECB(key = z, data = digest): the 32-byte KDF step (CKM_AES_ECB_ENCRYPT_DATA)."""
    scratch = bytearray(48)  # update_into wants room for one extra block
    try:
        n = aes_ecb_encrypt_into(z, digest, scratch)  # one KDF block pair
        if n != 32:
            raise RuntimeError("AES-ECB KDF produced an unexpected length")
        key = SecretBuffer(32)
        with key.view() as out:
            out[:] = scratch[:32]
        return key
    finally:
        zeroize(scratch)


def _agree(
    private: ec.EllipticCurvePrivateKey, peer: ec.EllipticCurvePublicKey, digest: bytes
) -> SecretBuffer:
    shared = private.exchange(ec.ECDH(), peer)
    try:
        return aes_ecb_derive(shared, digest)
    finally:
        del shared


def seal_share_to(recipient_public_key: bytes, share: SecretBuffer, transcript: bytes) -> bytes:
    """Seal a 32-byte share to a P-256 public key (a broker's HSM import key)."""
    recipient = decode_public_key(recipient_public_key)
    if not isinstance(share, SecretBuffer) or len(share) != SHARE_SIZE:
        raise ValueError(f"share must be a {SHARE_SIZE}-byte SecretBuffer")
    digest = transcript_digest(transcript)
    ephemeral = ec.generate_private_key(ec.SECP256R1())
    with _agree(ephemeral, recipient, digest) as key, key.view() as k, share.view() as s:
        sealed = aes_key_wrap_with_padding(k, bytes(s))
    return encode_sealed_blob(public_key_bytes(ephemeral), sealed)


def open_sealed_share(
    private_key: ec.EllipticCurvePrivateKey, blob: bytes, transcript: bytes
) -> SecretBuffer:
    """Open a blob sealed to ``private_key`` under ``transcript``; :class:`SealingError` if it
    does not authenticate."""
    if not isinstance(private_key, ec.EllipticCurvePrivateKey) or not isinstance(
        private_key.curve, ec.SECP256R1
    ):
        raise TypeError("private_key must be a P-256 private key")
    ephemeral, sealed = parse_sealed_blob(blob)
    digest = transcript_digest(transcript)
    with _agree(private_key, decode_public_key(ephemeral), digest) as key, key.view() as k:
        try:
            share = aes_key_unwrap_with_padding(k, sealed)
        except InvalidUnwrap:
            raise SealingError() from None
    try:
        if len(share) != SHARE_SIZE:
            raise SealingError()
        return SecretBuffer.from_bytes(share)
    finally:
        del share
