"""Key material that is hard to leak.

A :class:`SecretBuffer` owns a ``bytearray`` that :meth:`SecretBuffer.zeroize` overwrites in
place. It never prints, pickles or compares its bytes; callers borrow a ``memoryview`` for the
duration of one operation (:meth:`SecretBuffer.view`) instead of holding ``bytes`` copies.
Where the platform allows, the pages are locked in RAM (``mlock``) so they cannot be swapped.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hmac
import os
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["SecretBuffer", "zeroize"]

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def zeroize(buf: bytearray | memoryview) -> None:
    """Overwrite a writable buffer with zeros in place."""
    view = memoryview(buf).cast("B")
    if view.readonly:
        raise TypeError("zeroize needs a writable buffer")
    n = len(view)
    if n:
        ctypes.memset((ctypes.c_char * n).from_buffer(view), 0, n)


def _address(buf: bytearray) -> int:
    return ctypes.addressof((ctypes.c_char * len(buf)).from_buffer(buf))


class SecretBuffer:
    """A fixed-size secret held in one mutable, lockable buffer.

    ``SecretBuffer(size)`` allocates zeros; :meth:`from_bytes` copies material in (the caller
    zeroes its own source where it can). After :meth:`zeroize` every use raises ``ValueError``.
    """

    __slots__ = ("__weakref__", "_buf", "_live", "_locked")

    def __init__(self, size: int, *, lock: bool = True) -> None:
        if not isinstance(size, int) or size <= 0 or size > 1 << 20:
            raise ValueError("secret size must be between 1 byte and 1 MiB")
        self._buf = bytearray(size)
        self._live = True
        self._locked = False
        if lock:
            self._locked = _libc.mlock(ctypes.c_void_p(_address(self._buf)), size) == 0

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview, *, lock: bool = True) -> SecretBuffer:
        src = memoryview(data).cast("B")
        secret = cls(len(src), lock=lock)
        secret._buf[:] = src
        return secret

    @classmethod
    def random(cls, size: int) -> SecretBuffer:
        secret = cls(size)
        secret._buf[:] = os.urandom(size)
        return secret

    def __len__(self) -> int:
        return len(self._buf)

    @property
    def alive(self) -> bool:
        return self._live

    @property
    def locked(self) -> bool:
        """Whether the pages are mlocked (False where RLIMIT_MEMLOCK forbids it)."""
        return self._locked

    @contextmanager
    def view(self) -> Iterator[memoryview]:
        """Borrow the bytes for one operation; do not keep the view."""
        self._check()
        view = memoryview(self._buf)
        try:
            yield view
        finally:
            view.release()

    def copy(self) -> SecretBuffer:
        self._check()
        return SecretBuffer.from_bytes(self._buf, lock=self._locked)

    def equals(self, other: SecretBuffer) -> bool:
        """Constant-time comparison with another secret."""
        self._check()
        other._check()
        return hmac.compare_digest(self._buf, other._buf)

    def zeroize(self) -> None:
        """Overwrite the secret with zeros; idempotent."""
        if not self._live:
            return
        zeroize(self._buf)
        if self._locked:
            _libc.munlock(ctypes.c_void_p(_address(self._buf)), len(self._buf))
            self._locked = False
        self._live = False

    def _check(self) -> None:
        if not self._live:
            raise ValueError("this secret has been zeroized")

    def __enter__(self) -> SecretBuffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.zeroize()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown: nobody to tell
            self.zeroize()

    def __repr__(self) -> str:
        state = "live" if self._live else "zeroized"
        return f"<SecretBuffer {len(self._buf)} bytes, {state}>"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        raise TypeError("compare secrets with SecretBuffer.equals(), which is constant-time")

    __hash__ = None  # type: ignore[assignment]

    def __reduce__(self) -> tuple:
        raise TypeError("a SecretBuffer cannot be pickled")

    def __bytes__(self) -> bytes:
        raise TypeError("a SecretBuffer does not convert to bytes; use view()")
