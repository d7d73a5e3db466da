"""Encrypted, atomic, resumable-only-with-the-key checkpoints.

Key. ``K_ckpt = HKDF-SHA256(ikm = DEK, salt = "", info = b"checkpoint/v1" || 0x00 || job_id)``,
32 bytes, derived into a :class:`~sealed.secrets.SecretBuffer` (registered with the shredder).
Resuming therefore needs the DEK again, i.e. a fresh attestation and release.

File ``ckpt-<step, 10 digits>.ctck``, byte by byte::

    offset  size  field
    0       8     magic b"CTCKPT\\x00\\x01" (format version 1)
    8       8     step, big-endian uint64
    16      2     job id length L, big-endian uint16, 1..128
    18      L     job id, ASCII
    18+L    7     nonce prefix, random per file
    25+L    4     plaintext segment size S, big-endian uint32, 4 KiB..16 MiB
    29+L    8     plaintext length P, big-endian uint64, <= 64 GiB
    37+L    ...   ceil(P / S) segments (one empty segment when P = 0), each the AES-256-GCM
                  ciphertext of up to S plaintext bytes followed by its 16-byte tag

Segment ``i`` uses nonce ``prefix || BE32(i) || last`` (last = 1 for the final segment, else
0) and associated data = the whole header (bytes 0 .. 37+L), so the job id, step, sizes and
the segment's position are all authenticated: a checkpoint of another job or step, a
reordered, truncated or extended file fails with :class:`CheckpointDecryptionError`.

Plaintext. ``torch.save`` writes into :class:`_SecureSink`, a growable buffer that zeroes each
old allocation when it grows and is zeroed after encryption; loading decrypts into one
preallocated buffer that is zeroed after ``torch.load`` (``weights_only=True``), and the
loaded tensors are zeroed after they are copied into the live objects. No plaintext file ever
exists. Only rank 0 writes: temp file (O_EXCL, 0600), fsync, rename, fsync of the directory;
then all but the newest ``keep_last`` checkpoints are removed.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sealed._primitives import hkdf_sha256_into
from sealed.secrets import SecretBuffer, zeroize

__all__ = [
    "CheckpointDecryptionError",
    "CheckpointError",
    "CheckpointStore",
    "derive_checkpoint_key",
]

MAGIC = b"CTCKPT\x00\x01"
INFO_PREFIX = b"checkpoint/v1\x00"
SEGMENT = 1 << 20
MIN_SEGMENT = 4096
MAX_SEGMENT = 16 << 20
MAX_PLAINTEXT = 64 << 30
MAX_JOB_ID = 128
TAG = 16
_NAME = re.compile(r"^ckpt-(\d{10})\.ctck$")

log = logging.getLogger("trainer.checkpoint")


class CheckpointError(Exception):
    """A checkpoint that cannot be used (missing, malformed header, bad directory)."""


class CheckpointDecryptionError(CheckpointError):
    """Authentication failed: wrong key, another job or step, or a modified file."""

    def __init__(self, name: str) -> None:
        super().__init__(f"checkpoint {name}: decryption failed")


def derive_checkpoint_key(dek: SecretBuffer, job_id: str) -> SecretBuffer:
    key = SecretBuffer(32)
    with dek.view() as ikm, key.view() as out:
        hkdf_sha256_into(out, ikm, salt=b"", info=INFO_PREFIX + job_id.encode("ascii"))
    return key


def _header(step: int, job_id: bytes, prefix: bytes, seg: int, length: int) -> bytes:
    return (
        MAGIC + struct.pack(">QH", step, len(job_id)) + job_id + prefix
        + struct.pack(">IQ", seg, length)
    )


def _nonce(prefix: bytes, i: int, last: bool) -> bytes:
    return prefix + struct.pack(">IB", i, 1 if last else 0)


class _SecureSink(io.RawIOBase):
    """A write-only file object over a bytearray that is zeroed whenever it is discarded."""

    def __init__(self, initial: int = 1 << 20) -> None:
        super().__init__()
        self.buf = bytearray(initial)
        self.pos = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        n = len(view)
        if self.pos + n > len(self.buf):
            new = bytearray(max(2 * len(self.buf), self.pos + n))
            new[: self.pos] = memoryview(self.buf)[: self.pos]
            zeroize(self.buf)
            self.buf = new
        self.buf[self.pos : self.pos + n] = view
        self.pos += n
        return n

    def tell(self) -> int:
        return self.pos

    def wipe(self) -> None:
        zeroize(self.buf)
        self.pos = 0


class _SecureSource(io.RawIOBase):
    """A read-only, seekable file object over a bytearray (no copy of the plaintext)."""

    def __init__(self, buf: bytearray, length: int) -> None:
        super().__init__()
        self.view = memoryview(buf)[:length]
        self.pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        out = memoryview(b).cast("B")
        n = min(len(out), len(self.view) - self.pos)
        out[:n] = self.view[self.pos : self.pos + n]
        self.pos += n
        return n

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.pos, 2: len(self.view)}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def close(self) -> None:
        self.view.release()
        super().close()


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, list | tuple):
        for v in obj:
            yield from _tensors(v)


def scrub(obj: Any) -> None:
    """Zero every tensor inside a (nested) state dict in place."""
    for t in _tensors(obj):
        with contextlib.suppress(RuntimeError):
            t.detach().zero_()


class CheckpointStore:
    """Write and read one job's encrypted checkpoints in ``directory``."""

    def __init__(
        self,
        directory: str | Path,
        *,
        job_id: str,
        key: SecretBuffer,
        keep_last: int = 2,
        segment_size: int = SEGMENT,
    ) -> None:
        if not MIN_SEGMENT <= segment_size <= MAX_SEGMENT:
            raise ValueError("checkpoint segment size must be 4 KiB..16 MiB")
        if keep_last < 1:
            raise ValueError("keep_last must be at least 1")
        job = job_id.encode("ascii")
        if not 0 < len(job) <= MAX_JOB_ID:
            raise ValueError("job id must be 1..128 ASCII characters")
        self.directory = Path(directory)
        self._job = job
        self._key = key
        self._keep = keep_last
        self._seg = segment_size
        self.on_temp_file = lambda path, created: None  # the trainer registers work files

    # writing --------------------------------------------------------------------------------
    def save(self, step: int, state: dict[str, Any]) -> Path:
        """Serialize ``state`` in memory, encrypt, write atomically; return the final path."""
        if not 0 <= step < 2**63:
            raise ValueError("step out of range")
        sink = _SecureSink()
        try:
            torch.save(state, sink)
            return self._write(step, memoryview(sink.buf)[: sink.pos])
        finally:
            sink.wipe()

    def _write(self, step: int, plain: memoryview) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        final = self.directory / f"ckpt-{step:010d}.ctck"
        tmp = self.directory / f".tmp-ckpt-{step:010d}-{os.getpid()}"
        prefix = os.urandom(7)
        header = _header(step, self._job, prefix, self._seg, len(plain))
        n = max(1, -(-len(plain) // self._seg))
        out = bytearray(self._seg + TAG)
        self.on_temp_file(tmp, True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            log.info("checkpoint writing %s (%d segments)", final.name, n)
            with self._key.view() as kv:
                aead = AESGCM(kv)
                _write_all(fd, header)
                for i in range(n):
                    chunk = plain[i * self._seg : (i + 1) * self._seg]
                    target = memoryview(out)[: len(chunk) + TAG]
                    aead.encrypt_into(_nonce(prefix, i, i == n - 1), chunk, header, target)
                    _write_all(fd, target)
                del aead
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            self.on_temp_file(tmp, False)
            raise
        os.close(fd)
        os.replace(tmp, final)
        self.on_temp_file(tmp, False)
        _fsync_dir(self.directory)
        self._retain()
        return final

    def _retain(self) -> None:
        for _, path in self.list()[: -self._keep]:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    # reading --------------------------------------------------------------------------------
    def list(self) -> list[tuple[int, Path]]:
        """(step, path) of every checkpoint in the directory, oldest first."""
        if not self.directory.is_dir():
            return []
        found = []
        for path in self.directory.iterdir():
            m = _NAME.match(path.name)
            if m:
                found.append((int(m.group(1)), path))
        return sorted(found)

    def latest(self) -> tuple[int, Path] | None:
        found = self.list()
        return found[-1] if found else None

    def load(self, path: Path) -> tuple[int, dict[str, Any]]:
        """Decrypt and deserialize one checkpoint; returns (step, state)."""
        name = path.name
        m = _NAME.match(name)
        if not m:
            raise CheckpointError(f"{name} is not a checkpoint file name")
        with open(path, "rb") as fh:
            fixed = fh.read(18)
            if len(fixed) != 18 or fixed[:8] != MAGIC:
                raise CheckpointError(f"checkpoint {name}: not a version-1 checkpoint")
            step, jlen = struct.unpack(">QH", fixed[8:18])
            if not 0 < jlen <= MAX_JOB_ID:
                raise CheckpointError(f"checkpoint {name}: job id length {jlen} out of range")
            rest = fh.read(jlen + 19)
            if len(rest) != jlen + 19:
                raise CheckpointError(f"checkpoint {name}: truncated header")
            job, prefix = rest[:jlen], rest[jlen : jlen + 7]
            seg, length = struct.unpack(">IQ", rest[jlen + 7 :])
            if job != self._job or step != int(m.group(1)):
                raise CheckpointDecryptionError(name)
            if not MIN_SEGMENT <= seg <= MAX_SEGMENT or length > MAX_PLAINTEXT:
                raise CheckpointError(f"checkpoint {name}: segment or plaintext size too large")
            header = fixed + rest
            n = max(1, -(-length // seg))
            expected = len(header) + length + n * TAG
            if os.fstat(fh.fileno()).st_size != expected:
                raise CheckpointDecryptionError(name)
            plain = bytearray(length)
            try:
                with self._key.view() as kv:
                    aead = AESGCM(kv)
                    pv = memoryview(plain)
                    for i in range(n):
                        a, b = i * seg, min((i + 1) * seg, length)
                        ct = fh.read(b - a + TAG)
                        try:
                            aead.decrypt_into(_nonce(prefix, i, i == n - 1), ct, header, pv[a:b])
                        except InvalidTag:
                            raise CheckpointDecryptionError(name) from None
                    pv.release()
                    del aead
                source = _SecureSource(plain, length)
                try:
                    state = torch.load(source, map_location="cpu", weights_only=True)
                finally:
                    source.close()
            finally:
                zeroize(plain)
        return step, state


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
