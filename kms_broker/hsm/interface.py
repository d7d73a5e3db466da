"""What the broker needs from an HSM (DESIGN.md section 3). Domain code sees only this.

Implementations: ``kms_broker.hsm.fake.FakeHsm`` (fast unit tests) and
``kms_broker.hsm.pkcs11_hsm.Pkcs11Hsm`` (python-pkcs11; SoftHSM2 in tests and the embedded
default). One contract suite (tests/kms_broker/test_hsm_contract.py) runs against both.

Share custody: a share enters as a blob the tenant sealed to an import key and leaves as a
blob sealed to a node's one-time key. In between it exists only as HSM objects and as
``wrapped_share`` (stored in the broker DB). No method takes or returns a share in the clear.

Bound wrapping. ``wrapped_share`` is bound inside the HSM to its :class:`ShareBinding`
(tenant, dataset, key version, share index; encoded in ``kms_broker.hsm.labels``)::

    W          = AES-256-ECB(key = KEK tenant/<id>/kek/v<n>, data = SHA-256(binding))
                                                   (CKM_AES_ECB_ENCRYPT_DATA, a session key)
    wrapped    = AES-KWP(W, share)                 (CKM_AES_KEY_WRAP_PAD), 40 bytes

The KEK may only derive (CKA_DERIVE; CKA_WRAP and CKA_UNWRAP false), so no share can be
wrapped or unwrapped under the KEK itself, and ``W`` exists only as a non-extractable session
object for one call. A wrapped share moved to another binding (a DB edit swapping two
datasets' rows, or changing a key version or share index) fails RFC 5649's integrity check
inside the HSM: ``UnwrapFailed``, never another dataset's share.

Migration. KEKs made before bound wrapping (wrap/unwrap KEKs, CKA_DERIVE false, not
modifiable) hold shares wrapped directly under the KEK. ``seal_share`` refuses them
(:class:`LegacyWrapping`, an ``UnwrapFailed``): such a share is never released unbound.
``rewrap_share`` (KEK rotation, ``kms-broker dataset rotate``) unwraps a legacy share under
the old KEK and wraps it bound under the new KEK, so rotating a tenant once migrates it. The
binding of a legacy share is not checked while it is migrated (it never was bound): a row
edited before the migration stays wrong, which the node still detects (it derives a wrong key).

Sealing (tenant -> import key, and HSM -> node) is the same construction, mirrored on the
other side with ``cryptography`` by ``kms_broker.sealing``:

    Z        = ECDH-P256(ephemeral, recipient)            (x coordinate, CKD_NULL)
    K        = AES-256-ECB(key = Z, data = SHA-256(transcript))   (CKM_AES_ECB_ENCRYPT_DATA)
    sealed   = AES-KWP(K, share)                          (CKM_AES_KEY_WRAP_PAD)

and the wire blob is ``BE16 len(ephemeral_pub) || ephemeral_pub (SEC1 uncompressed) || sealed``
(107 bytes for a 32-byte share; ``kms_broker.sealing`` documents it byte by byte and builds the
canonical transcripts). SoftHSM 2.6.1 supports every mechanism named above, verified by the
contract suite; it has no CKM_ECDSA_SHA256, so ``sign`` hashes (public data) with SHA-256 and
signs the digest with CKM_ECDSA.

Semantics every backend keeps (the contract suite checks them):

- ``wrapped_share`` is the raw 40-byte AES-KWP output under the binding key; its KEK version
  is stored beside it, its binding is the row it sits in.
- ``create_tenant_kek`` and ``create_import_key`` are idempotent: an existing key is kept (and
  for an import key its public key returned again), so an interrupted upload can be retried.
- ``destroy_import_key`` raises ``KeyNotFound`` when there is nothing to destroy;
  ``destroy_tenant_keks`` returns 0 then.
- Input that is malformed whatever the key (wrong lengths, a public key not on P-256, bad
  identifiers or versions, a transcript over 4096 bytes) raises ``ValueError``/``TypeError``
  before the HSM is touched; a well-formed blob that does not authenticate raises
  ``UnwrapFailed``; a missing KEK or import key raises ``KeyNotFound``; an HSM that cannot be
  used raises ``HsmUnavailable`` (never ``KeyNotFound``), and the backend recovers by itself
  when the HSM comes back.
- ``close()`` releases the backend's sessions; later calls raise ``HsmUnavailable``.
"""

from __future__ import annotations

from typing import Protocol

from kms_broker.hsm.labels import ShareBinding

__all__ = [
    "Hsm", "HsmError", "HsmUnavailable", "KeyNotFound", "LegacyWrapping", "ShareBinding",
    "UnwrapFailed",
]


class HsmError(Exception):
    """Base class; messages never carry key material."""


class HsmUnavailable(HsmError):
    """The token cannot be reached or logged into: callers fail closed (gRPC UNAVAILABLE)."""


class KeyNotFound(HsmError):
    """No such key (for example a shredded tenant KEK or an expired import key)."""


class UnwrapFailed(HsmError):
    """A wrapped or sealed blob did not authenticate under the expected key."""


class LegacyWrapping(UnwrapFailed):
    """The share is wrapped under a KEK from before bound wrapping: rotate the KEK first."""


class Hsm(Protocol):
    # broker signing key (tokens, audit checkpoints)
    def signing_public_key(self) -> bytes: ...  # SEC1 uncompressed P-256
    def sign(self, data: bytes) -> bytes: ...  # ECDSA P-256 SHA-256, DER signature

    # tenant KEKs: label tenant/<id>/kek/v<n>, AES-256, non-extractable, sensitive, derive-only
    def create_tenant_kek(self, tenant_id: str, version: int) -> None: ...
    def has_tenant_kek(self, tenant_id: str, version: int) -> bool: ...
    def destroy_tenant_keks(self, tenant_id: str) -> int: ...  # crypto-shred; returns count

    # import keys: one EC P-256 key pair per upload session
    def create_import_key(self, import_id: str) -> bytes: ...  # returns public key (SEC1)
    def destroy_import_key(self, import_id: str) -> None: ...

    def import_share(
        self,
        import_id: str,
        sealed_share: bytes,
        transcript: bytes,
        binding: ShareBinding,
        kek_version: int,
    ) -> bytes: ...  # returns wrapped_share, bound to ``binding``

    def rewrap_share(
        self, wrapped_share: bytes, binding: ShareBinding, from_version: int, to_version: int
    ) -> bytes: ...

    def seal_share(
        self,
        wrapped_share: bytes,
        binding: ShareBinding,
        kek_version: int,
        node_public_key: bytes,
        transcript: bytes,
    ) -> bytes: ...  # sealed blob for the node

    # audit anchor: the head (seq, hash) of the audit log, kept on the token (data object
    # ctrain/audit-anchor, 40 bytes: BE64 seq || SHA-256 hash); None when never set
    def audit_anchor(self) -> tuple[int, bytes] | None: ...
    def set_audit_anchor(self, seq: int, record_hash: bytes) -> None: ...  # never moves back

    def health(self) -> None: ...  # raises HsmUnavailable when the token is unusable

    def close(self) -> None: ...  # added: release sessions/keys; idempotent
