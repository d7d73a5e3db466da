"""Encrypted, atomic, resumable-only-with-the-key checkpoints, in the shards' AEAD format.

Key. ``K_ckpt = HKDF-SHA256(ikm = DEK, salt = "", info = b"checkpoint/v1" || 0x00 || job_id)``,
32 bytes (:func:`sealed.keys.derive_checkpoint_key`), in a :class:`~sealed.secrets.SecretBuffer`
registered with the shredder. Resuming therefore needs the DEK again, i.e. a fresh attestation
and release.

File ``ckpt-<step, 10 digits>.ctck``: one stream of the Tink AES-GCM-HKDF streaming AEAD that
shards and manifests use (:mod:`sealed.streaming` documents it byte by byte: a 40-byte header
of length byte, 32-byte salt and 7-byte nonce prefix, then 1 MiB ciphertext segments, each
AES-256-GCM with its 16-byte tag and the last-segment flag in its nonce), keyed by ``K_ckpt``,
with the associated data (the HKDF ``info`` of the stream key)::

    b"checkpoint/v2" || 0x00 || BE16 len(job_id) || job_id (ASCII) || BE64 step

The file is nothing but that stream: the job and step come from the store and the file name,
and are authenticated through the associated data, so a checkpoint of another job or step
(a renamed file), a reordered, truncated or extended file fails with
:class:`CheckpointDecryptionError`. There is one AEAD format in the codebase.

Plaintext. ``torch.save`` writes into :class:`_SecureSink`, a growable buffer that zeroes each
old allocation when it grows and is zeroed after encryption; loading decrypts segment by
segment into one preallocated buffer that is zeroed after ``torch.load``
(``weights_only=True``), and the loaded tensors are zeroed after they are copied into the live
objects. No plaintext file ever exists. Only rank 0 writes: temp file (O_EXCL, 0600), fsync,
rename, fsync of the directory; then all but the newest ``keep_last`` checkpoints are removed.
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

from sealed import streaming
from sealed.errors import DecryptionError
from sealed.keys import derive_checkpoint_key
from sealed.secrets import SecretBuffer, zeroize

__all__ = [
    "CheckpointDecryptionError",
    "CheckpointError",
    "CheckpointStore",
    "derive_checkpoint_key",
]

AAD_PREFIX = b"checkpoint/v2\x00"
MAX_CIPHERTEXT = 64 << 30
MAX_JOB_ID = 128
_NAME = re.compile(r"^ckpt-(\d{10})\.ctck$")

log = logging.getLogger("trainer.checkpoint")


class CheckpointError(Exception):
    """A checkpoint that cannot be used (missing, malformed header, bad directory)."""


class CheckpointDecryptionError(CheckpointError):
    """Authentication failed: wrong key, another job or step, or a modified file."""

    def __init__(self, name: str) -> None:
        super().__init__(f"checkpoint {name}: decryption failed")


def checkpoint_aad(job_id: bytes, step: int) -> bytes:
    """The associated data of one checkpoint stream (see the module docstring)."""
    return AAD_PREFIX + struct.pack(">H", len(job_id)) + job_id + struct.pack(">Q", step)


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
    ) -> None:
        if keep_last < 1:
            raise ValueError("keep_last must be at least 1")
        job = job_id.encode("ascii")
        if not 0 < len(job) <= MAX_JOB_ID:
            raise ValueError("job id must be 1..128 ASCII characters")
        self.directory = Path(directory)
        self._job = job
        self._key = key
        self._keep = keep_last
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
        encryptor = streaming.StreamEncryptor(self._key, checkpoint_aad(self._job, step),
                                              label=f"checkpoint {final.name}")
        self.on_temp_file(tmp, True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            log.info("checkpoint writing %s (%d segments)", final.name,
                     streaming.segment_count(streaming.ciphertext_size(len(plain))))
            for chunk in encryptor.encrypt([plain]):
                _write_all(fd, chunk)
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
        step = int(m.group(1))
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size > MAX_CIPHERTEXT:
                raise CheckpointError(f"checkpoint {name}: larger than {MAX_CIPHERTEXT} bytes")
            try:
                length = streaming.plaintext_size(size, label=f"checkpoint {name}")
                cipher = streaming.SegmentCipher(
                    self._key, _read_exact(fh, streaming.HEADER_SIZE),
                    checkpoint_aad(self._job, step), label=f"checkpoint {name}")
            except (DecryptionError, EOFError):
                raise CheckpointDecryptionError(name) from None
            plain = bytearray(length)
            try:
                _decrypt_segments(fh, size, cipher, memoryview(plain), name)
                source = _SecureSource(plain, length)
                try:
                    state = torch.load(source, map_location="cpu", weights_only=True)
                finally:
                    source.close()
            finally:
                zeroize(plain)
        return step, state


def _read_exact(fh: Any, n: int) -> bytes:
    data = fh.read(n)
    if len(data) != n:
        raise EOFError
    return data


def _decrypt_segments(fh: Any, size: int, cipher: streaming.SegmentCipher, out: memoryview,
                      name: str) -> None:
    """Decrypt every segment of the stream in ``fh`` (positioned after the header)."""
    n = streaming.segment_count(size)
    buf = bytearray(streaming.SEGMENT_SIZE)
    view = memoryview(buf)
    written = 0
    try:
        for i in range(n):
            begin = streaming.ciphertext_start(i)
            end = min(size, (i + 1) * streaming.SEGMENT_SIZE)
            got = fh.readinto(view[: end - begin])
            if got != end - begin:
                raise CheckpointDecryptionError(name)
            written += cipher.decrypt_segment_into(i, i == n - 1, view[: end - begin],
                                                   out[written:])
    except DecryptionError:
        zeroize(out[:written])
        raise CheckpointDecryptionError(name) from None
    finally:
        view.release()


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
