"""Canonical binary encoding shared by the shard and manifest formats (big-endian throughout).

* ``u16``/``u32``/``u64``: unsigned integers, 2/4/8 bytes.
* ``str16``: ``u16`` byte length, then that many UTF-8 bytes (no NUL).
* ``bytes16``: ``u16`` byte length, then the bytes.

:func:`canonical_fields` builds associated data as a sequence of ``bytes16`` fields, so no two
different field lists encode to the same bytes. :class:`Cursor` parses with a bound check
before every read, so a hostile length never allocates or reads past the buffer.
"""

from __future__ import annotations

import struct

from sealed.errors import FormatError

__all__ = ["Cursor", "canonical_fields", "str16", "u16", "u32", "u64"]

_U16, _U32, _U64 = struct.Struct(">H"), struct.Struct(">I"), struct.Struct(">Q")


def u16(v: int) -> bytes:
    return _U16.pack(v)


def u32(v: int) -> bytes:
    return _U32.pack(v)


def u64(v: int) -> bytes:
    return _U64.pack(v)


def str16(s: str, *, max_len: int = 0xFFFF) -> bytes:
    raw = s.encode("utf-8")
    if len(raw) > max_len or "\x00" in s:
        raise ValueError(f"string field longer than {max_len} bytes or containing NUL")
    return _U16.pack(len(raw)) + raw


def canonical_fields(*fields: bytes) -> bytes:
    """Length-prefixed concatenation: ``u16 len || field`` for each field."""
    out = bytearray()
    for f in fields:
        if len(f) > 0xFFFF:
            raise ValueError("field too long for canonical encoding")
        out += _U16.pack(len(f)) + f
    return bytes(out)


class Cursor:
    """Bounds-checked sequential reader over an authenticated buffer."""

    def __init__(self, data: bytes | bytearray | memoryview, what: str) -> None:
        self._view = memoryview(data).cast("B")
        self._pos = 0
        self._what = what

    @property
    def remaining(self) -> int:
        return len(self._view) - self._pos

    def _take(self, n: int) -> memoryview:
        if n < 0 or n > self.remaining:
            raise FormatError(f"{self._what} is truncated or has an invalid length field")
        v = self._view[self._pos : self._pos + n]
        self._pos += n
        return v

    def bytes(self, n: int) -> bytes:
        return bytes(self._take(n))

    def u16(self) -> int:
        return _U16.unpack(self._take(2))[0]

    def u32(self) -> int:
        return _U32.unpack(self._take(4))[0]

    def u64(self) -> int:
        return _U64.unpack(self._take(8))[0]

    def str16(self, max_len: int) -> str:
        n = self.u16()
        if n > max_len:
            raise FormatError(f"{self._what} has a string field longer than {max_len} bytes")
        try:
            s = bytes(self._take(n)).decode("utf-8")
        except UnicodeDecodeError:
            raise FormatError(f"{self._what} has a string field that is not UTF-8") from None
        if "\x00" in s:
            raise FormatError(f"{self._what} has a string field containing NUL")
        return s

    def expect_count(self, count: int, min_entry: int, limit: int, field: str) -> int:
        """Check a count against a maximum and against the bytes left, before allocating."""
        if count > limit or count * min_entry > self.remaining:
            raise FormatError(f"{self._what}: {field} {count} exceeds the limit or the data")
        return count

    def end(self) -> None:
        if self.remaining:
            raise FormatError(f"{self._what} has {self.remaining} unexpected trailing bytes")
