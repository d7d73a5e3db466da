"""Broker tokens and tenant grant documents.

* ``token``: ``TokenVerifier.verify``. Byte 0 even: the input is the whole token (length
  prefix, payload, signature), as a node sends it. Odd: the input is the payload, signed here
  with the verifier's key, so the canonical-JSON parsing and the claim checks behind the
  signature are fuzzed too. Expected error: ``InvalidToken``.
* ``grant``: ``verify_grant`` over a grant document signed here with the tenant's Ed25519 key
  (byte 0 odd), or with a signature that does not match (even). Expected errors: ``ValueError``
  (the documented error for a malformed grant) and ``InvalidGrantSignature``.

Seeds: tokens issued by ``issue_token`` and grants made by ``sign_grant``.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any

from fuzz.base import Harness
from fuzz.mutators import json_mutator

__all__ = ["HARNESSES"]

NOW_MS = 1_780_000_000_000


def _token_key() -> Any:
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.derive_private_key(0x5EED, ec.SECP256R1())


def _sign_token(payload: bytes) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    from kms_broker.tokens import TOKEN_DOMAIN

    return _token_key().sign(TOKEN_DOMAIN + payload, ec.ECDSA(hashes.SHA256()))


_VERIFIER: list[Any] = []


def _token(data: bytes) -> None:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    from kms_broker.tokens import TokenVerifier

    if not _VERIFIER:
        pub = _token_key().public_key().public_bytes(Encoding.X962,
                                                     PublicFormat.UncompressedPoint)
        _VERIFIER.append(TokenVerifier(pub))
    if not data:
        return
    body = data[1:]
    token = body if data[0] % 2 == 0 else (struct.pack(">H", len(body) & 0xFFFF) + body
                                           + _sign_token(body))
    _VERIFIER[0].verify(token, now_ms=NOW_MS)


def _token_seeds() -> Iterator[tuple[str, bytes]]:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    from kms_broker.tokens import TokenClaims, issue_token

    claims = TokenClaims(session_id="s" * 32, node_id="n1", node_key=b"\x04" + bytes(64),
                         job_id="j", tenant_scope="", claims_digest="ab" * 32,
                         iat=NOW_MS - 1000, exp=NOW_MS + 60_000)
    key = _token_key()
    yield "token", b"\x00" + issue_token(claims, lambda m: key.sign(m, ec.ECDSA(hashes.SHA256())))
    yield "payload", b"\x01" + claims.payload()


def _grant_key() -> Any:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return Ed25519PrivateKey.from_private_bytes(bytes(range(32)))


def _grant(data: bytes) -> None:
    from kms_broker.grants import GRANT_DOMAIN, verify_grant

    if not data:
        return
    key = _grant_key()
    body = data[1:]
    sig = key.sign(GRANT_DOMAIN + body) if data[0] % 2 else bytes(64)
    verify_grant(body, sig, key.public_key().public_bytes_raw())


def _grant_seeds() -> Iterator[tuple[str, bytes]]:
    from kms_broker.grants import GrantDocument, sign_grant

    doc, _ = sign_grant(GrantDocument(
        grant_id="g1", tenant_id="acme", dataset_id="ds1", job_id="j", policy_digest="ab" * 32,
        max_nodes=2, expires_unix_ms=NOW_MS + 86_400_000), _grant_key())
    yield "grant", b"\x01" + doc
    yield "grant-bad-signature", b"\x00" + doc


def _harnesses() -> list[Harness]:
    from kms_broker.grants import InvalidGrantSignature
    from kms_broker.tokens import InvalidToken

    return [
        Harness("token", "kms_broker.tokens.TokenVerifier.verify (framing, signature, payload)",
                _token, (InvalidToken,), _token_seeds, max_len=8192,
                mutator=json_mutator(prefix=1, canonical=True)),
        Harness("grant", "kms_broker.grants.verify_grant (canonical JSON, fields, signature)",
                _grant, (ValueError, InvalidGrantSignature), _grant_seeds, max_len=8192,
                mutator=json_mutator(prefix=1, canonical=True)),
    ]


HARNESSES = _harnesses
