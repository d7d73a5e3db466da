"""Broker-signed bindings: who a tenant or node is, as stored in the state database.

The threat model lets an attacker edit any stored row. A tenant row binds the tenant id to
the Ed25519 key that signs its grants, and a node row binds the node id to its attestation
key (AK) and tenant scope; an edit of either would let forged grants or forged quotes
through. So each row carries ``binding_sig``: the broker's HSM signing key (ECDSA P-256, the
key that signs tokens and audit checkpoints) over a domain-separated canonical encoding of
those fields, made when the row is created. The broker verifies it wherever it relies on the
row (attest, release, renew, grant submission) and refuses, fail closed, when it does not
match: the row was edited, copied from another id, or written without the broker.

What is bound: the identity fields. Not bound: mutable state (a tenant's ``status``, a node's
``revoked`` flag, KEK versions), which an attacker with write access to the database could
roll back; revocation also ends leases at once and is in the hash-chained audit log.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from kms_broker.domain.memo import BoundedCache
from kms_broker.domain.model import Node, Tenant
from kms_broker.encoding import canonical_json

__all__ = ["BindingVerifier", "node_binding", "tenant_binding"]

TENANT_DOMAIN = b"kmsbroker/v1/tenant-binding\x00"
NODE_DOMAIN = b"kmsbroker/v1/node-binding\x00"


def tenant_binding(tenant_id: str, signing_public_key: bytes) -> bytes:
    """The message the broker signs for a tenant row."""
    return TENANT_DOMAIN + canonical_json(
        {"tenant_id": tenant_id, "signing_public_key": signing_public_key.hex()})


def node_binding(node_id: str, tenant_scope: str, ak_public: bytes,
                 ek_certificate: bytes) -> bytes:
    """The message the broker signs for a node row."""
    return NODE_DOMAIN + canonical_json({
        "node_id": node_id, "tenant_scope": tenant_scope, "ak_public": ak_public.hex(),
        "ek_certificate_sha256": hashlib.sha256(ek_certificate).hexdigest(),
    })


class BindingVerifier:
    """Checks row signatures against the broker's signing public key (SEC1 P-256); a pure
    function of its inputs, so verdicts are memoised by (message, signature)."""

    def __init__(self, public_key_sec1: bytes) -> None:
        self._key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), public_key_sec1)
        self._good = BoundedCache()

    def _verify(self, memo: tuple[object, ...], message: Callable[[], bytes],
                signature: bytes) -> bool:
        """``memo``: every input of ``message()`` and the signature (the message is a
        function of them, so a row seen verified needs no encoding or ECDSA again)."""
        if memo in self._good:
            return True
        try:
            self._key.verify(signature, message(), ec.ECDSA(hashes.SHA256()))
        except (InvalidSignature, ValueError):
            return False
        self._good.put(memo, True)
        return True

    def tenant_ok(self, tenant: Tenant) -> bool:
        return self._verify(
            ("tenant", tenant.tenant_id, bytes(tenant.signing_public_key),
             bytes(tenant.binding_sig)),
            lambda: tenant_binding(tenant.tenant_id, tenant.signing_public_key),
            tenant.binding_sig)

    def node_ok(self, node: Node) -> bool:
        return self._verify(
            ("node", node.node_id, node.tenant_scope, bytes(node.ak_public),
             bytes(node.ek_certificate), bytes(node.binding_sig)),
            lambda: node_binding(node.node_id, node.tenant_scope, node.ak_public,
                                 node.ek_certificate),
            node.binding_sig)
