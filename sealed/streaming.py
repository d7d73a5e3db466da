"""Tink AES-GCM-HKDF streaming AEAD (key template ``AES256_GCM_HKDF_1MB``), byte-compatible.

Parameters: HKDF-SHA256, derived key 32 bytes, ciphertext segment size 1 MiB (1048576),
ciphertext offset 0, AES-256-GCM with 12-byte nonces and 16-byte tags.

Wire format of one stream (all integers big-endian)::

    offset  size  field
    0       1     header length = 0x28 (40): this byte, the salt and the nonce prefix
    1       32    salt: random per stream
    33      7     nonce prefix: random per stream
    40      ...   segment 0, then segment 1, ... segment n-1

    segment i  = AES-256-GCM(K, nonce_i, plaintext_i, associated data = empty)
               = ciphertext_i (len(plaintext_i) bytes) || tag_i (16 bytes)
    nonce_i    = nonce prefix (7) || BE32(i) (4) || 0x01 if i == n-1 else 0x00 (1)
    K          = HKDF-SHA256(ikm = stream key, salt = header salt, info = associated data)[:32]

Every segment except the last is exactly full: segment 0 carries 1048576 - 40 - 16 = 1048520
plaintext bytes (so header + segment 0 is exactly 1 MiB), every later full segment carries
1048576 - 16 = 1048560. The last segment carries 0 .. capacity bytes; an empty stream is the
header plus one 16-byte tag. The ciphertext of segment i therefore starts at byte 40 for
i = 0 and at i * 1048576 otherwise, so segment boundaries follow from offsets alone.

The segment count is a function of the ciphertext size (``n = ceil(size / 1 MiB)``), which is
how a decrypter knows which segment must carry the last-segment flag: dropping a whole
segment, cutting one short or appending one changes which nonce the final segment needs, and
authentication fails. Tink may end a stream whose plaintext exactly fills its segments with an
extra empty segment; both forms decrypt here. Our encrypter never emits the empty extra
segment (as Tink's Java encrypter).

Associated data is used only as the HKDF ``info``; it must be at most
:data:`MAX_ASSOCIATED_DATA` bytes. A stream has at most 2**32 segments (the nonce counter);
this module accepts streams up to :data:`MAX_CIPHERTEXT_SIZE`.

Every cryptographic failure raises :class:`~sealed.errors.DecryptionError`, naming the object
label and segment only. When a multi-segment decryption fails, the part of the caller's output
buffer already written is zeroed before the error propagates, so no plaintext escapes.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterable, Iterator

from cryptography.exceptions import InvalidTag

from sealed._primitives import AESGCM, hkdf_sha256_into
from sealed.errors import DecryptionError
from sealed.secrets import SecretBuffer, zeroize

__all__ = [
    "FIRST_SEGMENT_CAPACITY",
    "HEADER_SIZE",
    "KEY_SIZE",
    "MAX_ASSOCIATED_DATA",
    "MAX_CIPHERTEXT_SIZE",
    "NONCE_PREFIX_SIZE",
    "SALT_SIZE",
    "SEGMENT_CAPACITY",
    "SEGMENT_SIZE",
    "TAG_SIZE",
    "SegmentCipher",
    "StreamEncryptor",
    "ciphertext_size",
    "ciphertext_start",
    "decrypt",
    "decrypt_into",
    "encrypt",
    "plaintext_size",
    "plaintext_start",
    "segment_count",
    "segment_of",
]

KEY_SIZE = 32
SALT_SIZE = 32
NONCE_PREFIX_SIZE = 7
HEADER_SIZE = 1 + SALT_SIZE + NONCE_PREFIX_SIZE  # 40 = 0x28
TAG_SIZE = 16
SEGMENT_SIZE = 1 << 20
FIRST_SEGMENT_CAPACITY = SEGMENT_SIZE - HEADER_SIZE - TAG_SIZE
SEGMENT_CAPACITY = SEGMENT_SIZE - TAG_SIZE
MAX_ASSOCIATED_DATA = 4096
MAX_SEGMENTS = 1 << 32
MAX_CIPHERTEXT_SIZE = 1 << 40  # 1 TiB per stream; far beyond any shard or manifest

_BE32 = struct.Struct(">I")

Buffer = bytes | bytearray | memoryview


# --------------------------------------------------------------------------- layout arithmetic


def segment_count(ct_size: int) -> int:
    """Number of segments of a ciphertext of ``ct_size`` bytes (header included)."""
    return -(-ct_size // SEGMENT_SIZE)


def ciphertext_start(i: int) -> int:
    """Byte offset of segment ``i`` in the ciphertext."""
    return HEADER_SIZE if i == 0 else i * SEGMENT_SIZE


def plaintext_start(i: int) -> int:
    """Plaintext offset of the first byte that segment ``i`` carries."""
    return 0 if i == 0 else FIRST_SEGMENT_CAPACITY + (i - 1) * SEGMENT_CAPACITY


def segment_of(pt_offset: int) -> int:
    """Index of the segment that carries plaintext byte ``pt_offset``."""
    if pt_offset < FIRST_SEGMENT_CAPACITY:
        return 0
    return 1 + (pt_offset - FIRST_SEGMENT_CAPACITY) // SEGMENT_CAPACITY


def ciphertext_size(pt_size: int) -> int:
    """Size of the canonical ciphertext (no trailing empty segment) of ``pt_size`` bytes."""
    if pt_size < 0:
        raise ValueError("plaintext size must be non-negative")
    n = 1 if pt_size <= FIRST_SEGMENT_CAPACITY else 1 + segment_of(pt_size - 1)
    return HEADER_SIZE + pt_size + n * TAG_SIZE


def plaintext_size(ct_size: int, *, label: str = "stream", shard: int | None = None) -> int:
    """Plaintext size carried by a ciphertext of ``ct_size`` bytes, or DecryptionError."""
    if not HEADER_SIZE + TAG_SIZE <= ct_size <= MAX_CIPHERTEXT_SIZE:
        raise DecryptionError(label, shard=shard)
    n = segment_count(ct_size)
    last = ct_size - (n - 1) * SEGMENT_SIZE - (HEADER_SIZE if n == 1 else 0)
    if last < TAG_SIZE:
        raise DecryptionError(label, shard=shard)
    return ct_size - HEADER_SIZE - n * TAG_SIZE


# --------------------------------------------------------------------------- one stream's cipher


def _check_aad(aad: Buffer) -> None:
    if len(aad) > MAX_ASSOCIATED_DATA:
        raise ValueError(f"associated data is limited to {MAX_ASSOCIATED_DATA} bytes")


def _check_ikm(ikm: SecretBuffer) -> None:
    if not isinstance(ikm, SecretBuffer) or len(ikm) < KEY_SIZE:
        raise ValueError(f"the stream key must be a SecretBuffer of at least {KEY_SIZE} bytes")


class SegmentCipher:
    """AES-GCM of one stream: the key derived from its header and associated data.

    The derived key exists in a locked :class:`SecretBuffer` only while the AES-GCM context is
    built, then is zeroed. (The context keeps its own copy inside the ``cryptography`` library,
    which is released, not wiped, when this object is dropped.)
    """

    __slots__ = ("_aead", "_prefix", "header", "label", "shard")

    def __init__(
        self,
        ikm: SecretBuffer,
        header: Buffer,
        aad: Buffer,
        *,
        label: str = "stream",
        shard: int | None = None,
    ) -> None:
        _check_ikm(ikm)
        _check_aad(aad)
        self.label = label
        self.shard = shard
        header = bytes(header)
        if len(header) != HEADER_SIZE or header[0] != HEADER_SIZE:
            raise DecryptionError(label, shard=shard)
        self.header = header
        self._prefix = header[1 + SALT_SIZE :]
        with SecretBuffer(KEY_SIZE) as key, key.view() as k, ikm.view() as ikm_view:
            hkdf_sha256_into(k, ikm_view, salt=header[1 : 1 + SALT_SIZE], info=bytes(aad))
            self._aead = AESGCM(k)

    @classmethod
    def new_stream(
        cls,
        ikm: SecretBuffer,
        aad: Buffer,
        *,
        label: str = "stream",
        shard: int | None = None,
        random: Callable[[int], bytes] = os.urandom,
    ) -> SegmentCipher:
        """A cipher for a fresh stream with a random salt and nonce prefix."""
        header = bytes([HEADER_SIZE]) + random(SALT_SIZE) + random(NONCE_PREFIX_SIZE)
        return cls(ikm, header, aad, label=label, shard=shard)

    def _nonce(self, i: int, last: bool) -> bytes:
        if not 0 <= i < MAX_SEGMENTS:
            raise ValueError("segment index out of range")
        return self._prefix + _BE32.pack(i) + (b"\x01" if last else b"\x00")

    def encrypt_segment_into(self, i: int, last: bool, plaintext: Buffer, out: memoryview) -> int:
        """Encrypt segment ``i`` into ``out[:len(plaintext) + 16]``; returns bytes written."""
        n = len(plaintext) + TAG_SIZE
        self._aead.encrypt_into(self._nonce(i, last), plaintext, None, out[:n])
        return n

    def decrypt_segment_into(self, i: int, last: bool, ciphertext: Buffer, out: memoryview) -> int:
        """Decrypt segment ``i`` into ``out[:len(ciphertext) - 16]``; returns bytes written.

        On a failed tag the destination is zeroed: ``decrypt_into`` writes the unauthenticated
        plaintext before it checks the tag.
        """
        n = len(ciphertext) - TAG_SIZE
        if n < 0:
            raise DecryptionError(self.label, shard=self.shard, segment=i)
        dest = out[:n]
        try:
            self._aead.decrypt_into(self._nonce(i, last), ciphertext, None, dest)
        except InvalidTag:
            # OpenSSL has already written the unauthenticated plaintext into ``dest``
            zeroize(dest)
            raise DecryptionError(self.label, shard=self.shard, segment=i) from None
        return n

    def decrypt_segments_into(
        self,
        ct_size: int,
        first: int,
        last: int,
        ciphertext: memoryview,
        out: memoryview,
    ) -> int:
        """Decrypt segments ``first..last`` (inclusive) of a stream of ``ct_size`` bytes.

        ``ciphertext`` holds exactly those segments (it starts at ``ciphertext_start(first)``)
        and ``out`` receives their plaintext from its start. On failure, the bytes already
        written to ``out`` are zeroed before :class:`DecryptionError` propagates.
        """
        n = segment_count(ct_size)
        if not 0 <= first <= last < n:
            raise ValueError("segment range outside the stream")
        base = ciphertext_start(first)
        end = min(ct_size, (last + 1) * SEGMENT_SIZE)
        if len(ciphertext) != end - base:
            raise ValueError("ciphertext view does not match the segment range")
        need = end - base - (last - first + 1) * TAG_SIZE
        if len(out) < need:
            raise ValueError(f"output buffer too small: need {need} bytes, got {len(out)}")
        if n > MAX_SEGMENTS:
            raise ValueError("segment index out of range")
        # the per-segment loop of decrypt_segment_into, inlined: it runs once per MiB
        decrypt_into, prefix, pack = self._aead.decrypt_into, self._prefix, _BE32.pack
        pos = written = 0
        try:
            for i in range(first, last + 1):
                seg_end = min(ct_size, (i + 1) * SEGMENT_SIZE) - base
                size = seg_end - pos - TAG_SIZE
                if size < 0:
                    raise DecryptionError(self.label, shard=self.shard, segment=i)
                nonce = prefix + pack(i) + (b"\x01" if i == n - 1 else b"\x00")
                dest = out[written : written + size]
                try:
                    decrypt_into(nonce, ciphertext[pos:seg_end], None, dest)
                except InvalidTag:
                    zeroize(dest)  # OpenSSL wrote the unauthenticated plaintext already
                    raise DecryptionError(self.label, shard=self.shard, segment=i) from None
                written += size
                pos = seg_end
        except BaseException:
            zeroize(out[:written])
            raise
        return written


# --------------------------------------------------------------------------- streaming encryption


class StreamEncryptor:
    """Constant-memory streaming encryption: plaintext chunks in, ciphertext chunks out.

    ``encrypt(chunks)`` yields the header and then each ciphertext segment as a ``memoryview``
    of one reused 1 MiB buffer: consume (write) each chunk before asking for the next. A full
    segment is held back until more plaintext arrives, so the final segment carries the
    last-segment flag without an extra empty segment. After the generator is exhausted,
    ``plaintext_size`` and ``ciphertext_size`` are set. One encryptor encrypts one stream.
    """

    def __init__(
        self,
        ikm: SecretBuffer,
        aad: Buffer,
        *,
        label: str = "stream",
        random: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self._cipher = SegmentCipher.new_stream(ikm, aad, label=label, random=random)
        self.plaintext_size: int | None = None
        self.ciphertext_size: int | None = None
        self._used = False

    @property
    def header(self) -> bytes:
        return self._cipher.header

    def encrypt(self, chunks: Iterable[Buffer]) -> Iterator[memoryview]:
        if self._used:
            raise ValueError("a StreamEncryptor encrypts exactly one stream")
        self._used = True
        return self._run(chunks)

    def _run(self, chunks: Iterable[Buffer]) -> Iterator[memoryview]:
        cipher = self._cipher
        pt = bytearray(SEGMENT_CAPACITY)
        ct = bytearray(SEGMENT_SIZE)
        pt_view, ct_view = memoryview(pt), memoryview(ct)
        try:
            yield memoryview(cipher.header)
            seg, fill, total, out_total = 0, 0, 0, HEADER_SIZE
            cap = FIRST_SEGMENT_CAPACITY
            for chunk in chunks:
                data = memoryview(chunk).cast("B")
                pos, size = 0, len(data)
                total += size
                while pos < size:
                    if fill == cap:  # more plaintext follows a full segment: it is not last
                        n = cipher.encrypt_segment_into(seg, False, pt_view[:fill], ct_view)
                        out_total += n
                        yield ct_view[:n]
                        seg, fill, cap = seg + 1, 0, SEGMENT_CAPACITY
                    if fill == 0 and size - pos > cap:  # a full segment straight from input
                        n = cipher.encrypt_segment_into(seg, False, data[pos : pos + cap], ct_view)
                        out_total += n
                        yield ct_view[:n]
                        seg, pos, cap = seg + 1, pos + cap, SEGMENT_CAPACITY
                        continue
                    take = min(cap - fill, size - pos)
                    pt_view[fill : fill + take] = data[pos : pos + take]
                    fill += take
                    pos += take
            n = cipher.encrypt_segment_into(seg, True, pt_view[:fill], ct_view)
            out_total += n
            yield ct_view[:n]
            self.plaintext_size, self.ciphertext_size = total, out_total
        finally:
            zeroize(pt)


# --------------------------------------------------------------------------- one-shot helpers


def encrypt(ikm: SecretBuffer, aad: Buffer, plaintext: Buffer) -> bytes:
    """Encrypt a whole plaintext held in memory (manifests, tests)."""
    enc = StreamEncryptor(ikm, aad)
    out = bytearray(ciphertext_size(len(plaintext)))
    pos = 0
    for chunk in enc.encrypt([plaintext]):
        out[pos : pos + len(chunk)] = chunk
        pos += len(chunk)
    return bytes(out)


def decrypt_into(
    ikm: SecretBuffer,
    aad: Buffer,
    ciphertext: Buffer,
    out: memoryview | bytearray,
    *,
    label: str = "stream",
    shard: int | None = None,
) -> memoryview:
    """Decrypt a whole stream held in memory into ``out``; returns the plaintext view."""
    ct = memoryview(ciphertext).cast("B")
    size = plaintext_size(len(ct), label=label, shard=shard)
    out_view = memoryview(out).cast("B")
    if len(out_view) < size:
        raise ValueError(f"output buffer too small: need {size} bytes, got {len(out_view)}")
    cipher = SegmentCipher(ikm, ct[:HEADER_SIZE], aad, label=label, shard=shard)
    n = segment_count(len(ct))
    cipher.decrypt_segments_into(len(ct), 0, n - 1, ct[HEADER_SIZE:], out_view)
    return out_view[:size]


def decrypt(
    ikm: SecretBuffer, aad: Buffer, ciphertext: Buffer, *, label: str = "stream"
) -> bytearray:
    """Decrypt a whole stream into a new ``bytearray`` (which the caller may zeroize)."""
    size = plaintext_size(len(ciphertext), label=label)
    out = bytearray(size)
    decrypt_into(ikm, aad, ciphertext, out, label=label)
    return out
