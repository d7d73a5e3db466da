"""Raw primitives. Only the recipes in this package import this module.

HKDF-SHA256 (RFC 5869) is computed with OpenSSL's one-shot ``HMAC()`` writing straight into
caller-owned buffers, so derived keys never exist as immutable ``bytes`` objects that Python
would free without wiping. Scratch space is zeroed before it is released.
"""

from __future__ import annotations

import ctypes
import ctypes.util

from sealed.secrets import zeroize

__all__ = ["hkdf_sha256_into", "hmac_sha256_into"]

_HASH_LEN = 32


def _load_libcrypto() -> ctypes.CDLL:
    name = ctypes.util.find_library("crypto") or "libcrypto.so.3"
    lib = ctypes.CDLL(name)
    lib.EVP_sha256.restype = ctypes.c_void_p
    lib.EVP_sha256.argtypes = []
    lib.HMAC.restype = ctypes.c_void_p
    lib.HMAC.argtypes = [
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_void_p,
        ctypes.POINTER(ctypes.c_uint),
    ]
    return lib


_lib = _load_libcrypto()
_SHA256 = _lib.EVP_sha256()


def _ptr(buf: bytes | bytearray | memoryview) -> tuple[ctypes.c_void_p, int, object]:
    """A C pointer to a buffer (copy-free when writable), its length and a keep-alive."""
    view = memoryview(buf).cast("B")
    n = len(view)
    if n == 0:
        return ctypes.c_void_p(None), 0, None
    if view.readonly:
        holder = ctypes.c_char_p(bytes(view))  # public inputs only (salts, info)
        return ctypes.cast(holder, ctypes.c_void_p), n, holder
    arr = (ctypes.c_char * n).from_buffer(view)
    return ctypes.c_void_p(ctypes.addressof(arr)), n, arr


def hmac_sha256_into(out: memoryview | bytearray, key: object, data: object) -> None:
    """out[:32] = HMAC-SHA256(key, data)."""
    out_view = memoryview(out).cast("B")
    if len(out_view) < _HASH_LEN or out_view.readonly:
        raise ValueError("HMAC output needs a writable buffer of at least 32 bytes")
    kp, kn, _k = _ptr(key)  # type: ignore[arg-type]
    dp, dn, _d = _ptr(data)  # type: ignore[arg-type]
    op, _, _o = _ptr(out_view)
    md_len = ctypes.c_uint(0)
    if not _lib.HMAC(_SHA256, kp, kn, dp, dn, op, ctypes.byref(md_len)) or md_len.value != 32:
        raise RuntimeError("OpenSSL HMAC failed")


def hkdf_sha256_into(out: memoryview | bytearray, ikm: object, *, salt: bytes, info: bytes) -> None:
    """Fill ``out`` with HKDF-SHA256(ikm, salt, info); len(out) <= 255 * 32."""
    out_view = memoryview(out).cast("B")
    length = len(out_view)
    if not 0 < length <= 255 * _HASH_LEN:
        raise ValueError("HKDF output length must be 1..8160 bytes")
    prk = bytearray(_HASH_LEN)
    block = bytearray(_HASH_LEN + len(info) + 1)
    t = bytearray(_HASH_LEN)
    try:
        hmac_sha256_into(prk, salt if salt else bytes(_HASH_LEN), ikm)
        done, prev_len, counter = 0, 0, 1
        while done < length:
            block[:prev_len] = t[:prev_len]
            block[prev_len : prev_len + len(info)] = info
            block[prev_len + len(info)] = counter
            hmac_sha256_into(t, prk, memoryview(block)[: prev_len + len(info) + 1])
            take = min(_HASH_LEN, length - done)
            out_view[done : done + take] = t[:take]
            done += take
            prev_len = _HASH_LEN
            counter += 1
    finally:
        zeroize(prk)
        zeroize(block)
        zeroize(t)
