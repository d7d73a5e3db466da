"""AES-256-GCM for one direction of one link between training ranks (trainer.sealed_comm).

The recipe over the raw AEAD: the caller owns the framing (its header is the associated
data, its sequence number makes the nonce) and the buffers; this module only seals into and
opens into them, so no plaintext is copied. A failed tag raises
:class:`~sealed.errors.DecryptionError` after the output is zeroed (AES-GCM decrypts before
it can check the tag).
"""

from __future__ import annotations

from cryptography.exceptions import InvalidTag

from sealed._primitives import AESGCM
from sealed.errors import DecryptionError
from sealed.secrets import SecretBuffer, zeroize

__all__ = ["TAG_SIZE", "LinkAead"]

TAG_SIZE = 16


class LinkAead:
    """Seals and opens the frames of one link direction under one 32-byte key."""

    __slots__ = ("_aead",)

    def __init__(self, key: SecretBuffer) -> None:
        if not isinstance(key, SecretBuffer) or len(key) != 32:
            raise ValueError("a link key is a 32-byte SecretBuffer")
        with key.view() as k:
            self._aead = AESGCM(k)

    def seal_into(self, nonce: bytes, data: memoryview, aad: bytes, out: memoryview) -> None:
        """``out`` (exactly len(data) + 16 bytes) = ciphertext || tag."""
        self._aead.encrypt_into(nonce, data, aad, out)

    def open_into(self, nonce: bytes, frame: memoryview, aad: bytes, out: memoryview) -> None:
        """``out`` (exactly len(frame) - 16 bytes) = plaintext, or DecryptionError."""
        try:
            self._aead.decrypt_into(nonce, frame, aad, out)
        except InvalidTag:
            zeroize(out)
            raise DecryptionError("link frame") from None

    def __repr__(self) -> str:
        return "<LinkAead>"

    def __reduce__(self) -> tuple:
        raise TypeError("a LinkAead cannot be pickled")
