"""An in-process :class:`~kms_broker.hsm.interface.Hsm` built on ``cryptography``.

For fast unit tests of code that uses an HSM. It performs exactly the same construction as
the real backend (same blob formats, same transcript KDF, same errors), so blobs are
interchangeable with ``kms_broker.sealing``; the contract suite runs it beside SoftHSM.
It is NOT a custody boundary: keys and, transiently, shares live in this process.

Fault injection: set ``available = False`` (every call raises ``HsmUnavailable`` until it is
set back) or call :meth:`FakeHsm.fail_next` to fail the next N calls with a given error.
"""

from __future__ import annotations

import threading

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from kms_broker import sealing
from kms_broker.hsm import labels
from kms_broker.hsm.interface import (
    HsmError,
    HsmUnavailable,
    KeyNotFound,
    ShareBinding,
    UnwrapFailed,
)
from sealed._primitives import (
    InvalidUnwrap,
    aes_key_unwrap_with_padding,
    aes_key_wrap_with_padding,
)
from sealed.keys import SHARE_SIZE
from sealed.secrets import SecretBuffer

__all__ = ["FakeHsm"]


class FakeHsm:
    def __init__(self) -> None:
        self.available = True
        self._closed = False
        self._fail: list[type[HsmError]] = []
        self._lock = threading.RLock()
        self._signing = ec.generate_private_key(ec.SECP256R1())
        self._keks: dict[str, SecretBuffer] = {}
        self._imports: dict[str, ec.EllipticCurvePrivateKey] = {}
        self._anchor: tuple[int, bytes] | None = None
        self.calls = 0

    # --- fault injection -----------------------------------------------------------------------

    def fail_next(self, count: int = 1, error: type[HsmError] = HsmUnavailable) -> None:
        """Make the next ``count`` calls raise ``error``."""
        with self._lock:
            self._fail.extend([error] * count)

    def _gate(self) -> None:
        with self._lock:
            self.calls += 1
            if self._fail:
                raise self._fail.pop(0)("injected HSM fault")
        if self._closed:
            raise HsmUnavailable("HSM backend is closed")
        if not self.available:
            raise HsmUnavailable("HSM token unavailable (fake)")

    # --- signing -------------------------------------------------------------------------------

    def signing_public_key(self) -> bytes:
        self._gate()
        return sealing.public_key_bytes(self._signing)

    def sign(self, data: bytes) -> bytes:
        self._gate()
        if not isinstance(data, bytes | bytearray):
            raise TypeError("data must be bytes")
        return self._signing.sign(bytes(data), ec.ECDSA(hashes.SHA256()))

    def verify(self, data: bytes, signature: bytes) -> bool:
        """Test convenience: check a signature made by :meth:`sign`."""
        try:
            self._signing.public_key().verify(signature, data, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            return False
        return True

    # --- tenant KEKs ---------------------------------------------------------------------------

    def create_tenant_kek(self, tenant_id: str, version: int) -> None:
        label = labels.kek_label(tenant_id, version)
        self._gate()
        with self._lock:
            if label not in self._keks:
                self._keks[label] = SecretBuffer.random(32)

    def has_tenant_kek(self, tenant_id: str, version: int) -> bool:
        label = labels.kek_label(tenant_id, version)
        self._gate()
        with self._lock:
            return label in self._keks

    def destroy_tenant_keks(self, tenant_id: str) -> int:
        prefix = labels.kek_prefix(tenant_id)
        self._gate()
        with self._lock:
            doomed = [label for label in self._keks if label.startswith(prefix)]
            for label in doomed:
                self._keks.pop(label).zeroize()
            return len(doomed)

    def _kek(self, tenant_id: str, version: int) -> SecretBuffer:
        label = labels.kek_label(tenant_id, version)
        with self._lock:
            kek = self._keks.get(label)
        if kek is None:
            raise KeyNotFound(f"no KEK {label}")
        return kek

    # --- import keys ---------------------------------------------------------------------------

    def create_import_key(self, import_id: str) -> bytes:
        label = labels.import_label(import_id)
        self._gate()
        with self._lock:
            key = self._imports.setdefault(label, ec.generate_private_key(ec.SECP256R1()))
        return sealing.public_key_bytes(key)

    def destroy_import_key(self, import_id: str) -> None:
        label = labels.import_label(import_id)
        self._gate()
        with self._lock:
            if self._imports.pop(label, None) is None:
                raise KeyNotFound(f"no import key {label}")

    # --- share custody -------------------------------------------------------------------------

    def import_share(
        self,
        import_id: str,
        sealed_share: bytes,
        transcript: bytes,
        binding: ShareBinding,
        kek_version: int,
    ) -> bytes:
        label = labels.import_label(import_id)
        _check_binding(binding)
        sealing.parse_sealed_blob(sealed_share)
        sealing.transcript_digest(transcript)
        self._gate()
        with self._lock:
            private = self._imports.get(label)
        if private is None:
            raise KeyNotFound(f"no import key {label}")
        kek = self._kek(binding.tenant_id, kek_version)
        try:
            share = sealing.open_sealed_share(private, sealed_share, transcript)
        except sealing.SealingError:
            raise UnwrapFailed("sealed share did not authenticate") from None
        with share:
            return self._wrap(share, kek, binding)

    @staticmethod
    def _binding_key(kek: SecretBuffer, binding: ShareBinding) -> SecretBuffer:
        with kek.view() as k:
            return sealing.aes_ecb_derive(bytes(k), binding.digest())

    def _wrap(self, share: SecretBuffer, kek: SecretBuffer, binding: ShareBinding) -> bytes:
        with self._binding_key(kek, binding) as w, w.view() as k, share.view() as s:
            return aes_key_wrap_with_padding(bytes(k), bytes(s))

    def _unwrap(
        self, wrapped_share: bytes, kek: SecretBuffer, binding: ShareBinding
    ) -> SecretBuffer:
        labels.check_wrapped_share(wrapped_share)
        with self._binding_key(kek, binding) as w, w.view() as k:
            try:
                raw = aes_key_unwrap_with_padding(bytes(k), bytes(wrapped_share))
            except InvalidUnwrap:
                raise UnwrapFailed("wrapped share did not authenticate") from None
        if len(raw) != SHARE_SIZE:
            raise UnwrapFailed("wrapped share did not authenticate")
        return SecretBuffer.from_bytes(raw)

    def rewrap_share(
        self, wrapped_share: bytes, binding: ShareBinding, from_version: int, to_version: int
    ) -> bytes:
        labels.check_wrapped_share(wrapped_share)
        _check_binding(binding)
        self._gate()
        old = self._kek(binding.tenant_id, from_version)
        new = self._kek(binding.tenant_id, to_version)
        with self._unwrap(wrapped_share, old, binding) as share:
            return self._wrap(share, new, binding)

    def seal_share(
        self,
        wrapped_share: bytes,
        binding: ShareBinding,
        kek_version: int,
        node_public_key: bytes,
        transcript: bytes,
    ) -> bytes:
        labels.check_wrapped_share(wrapped_share)
        _check_binding(binding)
        sealing.decode_public_key(node_public_key)
        sealing.transcript_digest(transcript)
        self._gate()
        kek = self._kek(binding.tenant_id, kek_version)
        with self._unwrap(wrapped_share, kek, binding) as share:
            return sealing.seal_share_to(node_public_key, share, transcript)

    # --- audit anchor --------------------------------------------------------------------------

    def audit_anchor(self) -> tuple[int, bytes] | None:
        self._gate()
        with self._lock:
            return self._anchor

    def set_audit_anchor(self, seq: int, record_hash: bytes) -> None:
        value = labels.decode_anchor(labels.encode_anchor(seq, record_hash))
        self._gate()
        with self._lock:
            if self._anchor is None or seq > self._anchor[0]:
                self._anchor = value

    def health(self) -> None:
        self._gate()

    def close(self) -> None:
        """Forget every key; later calls raise HsmUnavailable (like a closed Pkcs11Hsm)."""
        with self._lock:
            self._closed = True
            for kek in self._keks.values():
                kek.zeroize()
            self._keks.clear()
            self._imports.clear()


def _check_binding(binding: ShareBinding) -> ShareBinding:
    if not isinstance(binding, ShareBinding):
        raise TypeError("binding must be a ShareBinding")
    return binding
