"""Short-lived attestation tokens, signed by the broker's HSM key.

Wire format::

    BE16 len(payload) || payload || signature

``payload`` is canonical JSON (at most 2048 bytes)::

    {"claims_digest": hex SHA-256 of canonical claims, "exp": unix ms, "iat": unix ms,
     "job_id": str, "node_id": str, "node_key": hex SEC1 P-256 point, "session_id": str,
     "tenant_scope": str, "type": "kmsbroker.token/v1"}

``signature`` is ECDSA P-256 / SHA-256 (DER, at most 72 bytes) by the broker signing key over
``b"kmsbroker/v1/token\\x00" || payload``. The whole token is at most 4096 bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from kms_broker.encoding import canonical_json, parse_canonical_json

__all__ = ["MAX_TOKEN_SIZE", "InvalidToken", "TokenClaims", "TokenVerifier", "issue_token"]

MAX_TOKEN_SIZE = 4096
MAX_PAYLOAD_SIZE = 2048
TOKEN_DOMAIN = b"kmsbroker/v1/token\x00"
TOKEN_TYPE = "kmsbroker.token/v1"  # noqa: S105 - a type tag, not a secret


class InvalidToken(Exception):
    """The token is malformed, not signed by this broker, or expired."""


@dataclass(frozen=True, slots=True, kw_only=True)
class TokenClaims:
    session_id: str
    node_id: str
    node_key: bytes
    job_id: str
    tenant_scope: str
    claims_digest: str
    iat: int
    exp: int

    def payload(self) -> bytes:
        return canonical_json(
            {
                "claims_digest": self.claims_digest,
                "exp": self.exp,
                "iat": self.iat,
                "job_id": self.job_id,
                "node_id": self.node_id,
                "node_key": self.node_key.hex(),
                "session_id": self.session_id,
                "tenant_scope": self.tenant_scope,
                "type": TOKEN_TYPE,
            }
        )


def issue_token(claims: TokenClaims, sign: Callable[[bytes], bytes]) -> bytes:
    payload = claims.payload()
    return struct.pack(">H", len(payload)) + payload + sign(TOKEN_DOMAIN + payload)


class TokenVerifier:
    """Checks tokens against the broker's signing public key (SEC1 uncompressed P-256)."""

    def __init__(self, public_key_sec1: bytes) -> None:
        self._key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), public_key_sec1)

    def verify(self, token: bytes, *, now_ms: int) -> TokenClaims:
        if not 2 < len(token) <= MAX_TOKEN_SIZE:
            raise InvalidToken("token length out of range")
        (n,) = struct.unpack(">H", token[:2])
        if n > MAX_PAYLOAD_SIZE or 2 + n >= len(token):
            raise InvalidToken("token payload length out of range")
        payload, signature = token[2 : 2 + n], token[2 + n :]
        try:
            self._key.verify(signature, TOKEN_DOMAIN + payload, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            raise InvalidToken("token signature is not this broker's") from None
        try:
            obj = parse_canonical_json(payload, what="token", max_size=MAX_PAYLOAD_SIZE)
            if obj.pop("type") != TOKEN_TYPE:
                raise ValueError("wrong token type")
            obj["node_key"] = bytes.fromhex(obj["node_key"])
            claims = TokenClaims(**obj)
            _check_types(claims)
        except (ValueError, KeyError, TypeError) as exc:
            raise InvalidToken(f"token payload malformed: {exc}") from None
        if now_ms >= claims.exp:
            raise InvalidToken("token expired")
        return claims


def _check_types(claims: TokenClaims) -> None:
    """JSON gives any type; a claim of the wrong one must not reach a comparison."""
    for name in ("session_id", "node_id", "job_id", "tenant_scope", "claims_digest"):
        if not isinstance(getattr(claims, name), str):
            raise TypeError(f"{name} is not a string")
    for name in ("iat", "exp"):
        value = getattr(claims, name)
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name} is not an integer")
