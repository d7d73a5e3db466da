"""Typed errors of the sealed format.

* :class:`DecryptionError` is the one opaque cryptographic failure: wrong key, wrong associated
  data, a flipped bit, a truncated, reordered, duplicated or substituted segment all look the
  same. Its message names only *where* (the object: shard index or manifest, and the segment
  index when known), never key bytes, plaintext or which check failed.
* :class:`FormatError`: a decrypted (therefore authentic) structure that this version cannot
  read, or a parameter outside the format's limits.
* :class:`StoreError`: the object store failed or an object name is invalid.
* :class:`InputError`: the writer's input is unusable (which record or file, and why).

All derive from :class:`SealedError` so a caller can catch the family at once.
"""

from __future__ import annotations

__all__ = ["DecryptionError", "FormatError", "InputError", "SealedError", "StoreError"]


class SealedError(Exception):
    """Base class of every error this package raises on purpose."""


class DecryptionError(SealedError):
    """Authentication failed. Carries only the location: ``obj`` and ``segment``.

    ``obj`` is a label such as ``"shard 3"`` or ``"manifest"``; ``shard`` is the shard index
    when the object is a shard; ``segment`` is ``None`` for the stream header or the size.
    """

    def __init__(self, obj: str, *, shard: int | None = None, segment: int | None = None) -> None:
        self.obj = obj
        self.shard = shard
        self.segment = segment
        where = obj if segment is None else f"{obj}, segment {segment}"
        super().__init__(f"decryption failed ({where})")


class FormatError(SealedError):
    """Authentic data in a layout this version does not accept, or a limit exceeded."""


class StoreError(SealedError):
    """The object store failed, an object is missing, or an object name is invalid."""


class InputError(SealedError):
    """The writer's input is unusable; the message names the record or file and the reason."""
