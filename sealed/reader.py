"""Read a sealed dataset: whole shards into caller buffers, or single records by random access.

:meth:`DatasetReader.open` reads and authenticates the manifest. After that:

* :meth:`~DatasetReader.decrypt_shard_into` checks the shard object's size and stream header
  against the manifest, reads the ciphertext with ``readinto`` into one reused buffer (8 MiB
  per ranged read) or, from a store that offers ``view_range`` (``MappedDirStore``, the
  trainer's), takes a zero-copy view, and decrypts every segment straight into the caller's
  buffer (no intermediate plaintext copy). From a store that takes ``will_need`` hints, it
  keeps the three chunks (8 MiB each) after the one it decrypts requested from the disk and
  waits for a chunk's read before decrypting it, so cold data is read while the CPU decrypts
  what has arrived (data already cached costs one probe per chunk).
  If any segment fails, everything already written to the caller's buffer is zeroed and
  :class:`DecryptionError` names the shard and segment: no plaintext of a tampered shard is
  returned. ``verify_digest=True`` also checks the plaintext SHA-256 from the manifest; it is
  off by default because it is redundant for integrity (each shard's key is derived from the
  salt the manifest records, so AES-GCM already accepts only the exact ciphertext written with
  this manifest) and costs about ten times the decryption (SHA-256 runs near 2 GB/s here,
  AES-GCM near 20 GB/s).
* :meth:`~DatasetReader.read_record` / :meth:`~DatasetReader.read_shard_record` locate the
  record's plaintext range from the manifest's offset table and read and decrypt only the
  segments that hold it (plus one size query per shard, once per reader).

The reader keeps a copy of the dataset key and one AES-GCM context per shard it touched;
:meth:`close` (or leaving a ``with`` block) zeroes the key copy and its scratch buffers.
A reader is not thread-safe: use one per thread.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
from collections.abc import Iterator

from sealed import streaming
from sealed.errors import DecryptionError
from sealed.manifest import Manifest, ShardEntry, open_manifest
from sealed.secrets import SecretBuffer, zeroize
from sealed.shard import ShardView, shard_aad
from sealed.store import ObjectStore, RangeViewStore, ReadAheadStore

__all__ = ["READ_SEGMENTS", "DatasetReader"]

READ_SEGMENTS = 8  # ciphertext is fetched up to 8 segments (8 MiB) per ranged read
READ_AHEAD_CHUNKS = 3  # chunks (8 MiB each) requested ahead of the one being decrypted
READ_AHEAD_WAIT_S = 60.0  # a read-ahead that takes longer is left to page faults


class DatasetReader:
    """Authenticated access to one dataset. Create with :meth:`open`."""

    def __init__(self, store: ObjectStore, manifest: Manifest, dek: SecretBuffer) -> None:
        self._store = store
        self._manifest = manifest
        self._dek = dek.copy()
        self._ciphers: dict[int, streaming.SegmentCipher] = {}
        self._checked: set[int] = set()
        self._ctbuf = bytearray(READ_SEGMENTS * streaming.SEGMENT_SIZE)
        self._scratch = bytearray(0)
        self._closed = False

    @classmethod
    def open(
        cls,
        store: ObjectStore,
        manifest_name: str,
        *,
        dek: SecretBuffer,
        tenant_id: str,
        dataset_id: str,
        key_version: int,
    ) -> DatasetReader:
        manifest = open_manifest(
            store,
            manifest_name,
            dek=dek,
            tenant_id=tenant_id,
            dataset_id=dataset_id,
            key_version=key_version,
        )
        return cls(store, manifest, dek)

    def __repr__(self) -> str:
        return f"<DatasetReader {self._manifest!r}{' closed' if self._closed else ''}>"

    # ------------------------------------------------------------------ metadata

    @property
    def manifest(self) -> Manifest:
        return self._manifest

    @property
    def num_shards(self) -> int:
        return len(self._manifest.shards)

    @property
    def num_records(self) -> int:
        return self._manifest.num_records

    @property
    def share_holders(self) -> tuple[str, ...]:
        return self._manifest.share_holders

    def shard_record_count(self, j: int) -> int:
        return self._entry(j).record_count

    def shard_plaintext_size(self, j: int) -> int:
        """Bytes a buffer passed to :meth:`decrypt_shard_into` for shard ``j`` must hold."""
        return self._entry(j).plaintext_size

    @property
    def max_shard_plaintext_size(self) -> int:
        return max(s.plaintext_size for s in self._manifest.shards)

    def record_name(self, k: int) -> str:
        """The name record ``k`` had in the source ("" if it came without one)."""
        j, i = self._manifest.locate(k)
        return self._manifest.shards[j].names[i]

    def locate(self, k: int) -> tuple[int, int]:
        """Global record index -> (shard index, record index within the shard)."""
        return self._manifest.locate(k)

    # ------------------------------------------------------------------ internals

    def _entry(self, j: int) -> ShardEntry:
        if self._closed:
            raise ValueError("this reader is closed")
        if not isinstance(j, int) or not 0 <= j < len(self._manifest.shards):
            raise IndexError(f"shard {j} outside the dataset's {self.num_shards} shards")
        return self._manifest.shards[j]

    def _cipher(self, j: int) -> streaming.SegmentCipher:
        cipher = self._ciphers.get(j)
        if cipher is None:
            m = self._manifest
            aad = shard_aad(
                tenant_id=m.tenant_id,
                dataset_id=m.dataset_id,
                key_version=m.key_version,
                upload_id=m.upload_id,
                shard_index=j,
                shard_count=len(m.shards),
            )
            header = m.shards[j].header
            cipher = streaming.SegmentCipher(self._dek, header, aad, label=f"shard {j}", shard=j)
            self._ciphers[j] = cipher
        return cipher

    def _check_size(self, j: int, entry: ShardEntry) -> None:
        if j not in self._checked:
            if self._store.size(entry.object_name) != entry.ciphertext_size:
                raise DecryptionError(f"shard {j}", shard=j)
            self._checked.add(j)

    def _decrypt_segments(
        self, j: int, entry: ShardEntry, first: int, last: int, out: memoryview
    ) -> int:
        """Decrypt segments first..last of shard j into ``out``; zero ``out`` on failure."""
        cipher = self._cipher(j)
        ct_size = entry.ciphertext_size
        written = 0
        if isinstance(self._store, RangeViewStore):  # ciphertext in memory or mapped: no copy
            base = streaming.ciphertext_start(first)
            end = min(ct_size, (last + 1) * streaming.SEGMENT_SIZE)
            ahead = self._store.will_need if isinstance(self._store, ReadAheadStore) else None
            name = entry.object_name
            view = self._store.view_range(name, base, end - base)
            chunks = [(a, min(last, a + READ_SEGMENTS - 1))
                      for a in range(first, last + 1, READ_SEGMENTS)]
            tickets: dict[int, threading.Event | None] = {}
            try:
                for k, (a, b) in enumerate(chunks):
                    start = streaming.ciphertext_start(a)
                    stop = min(ct_size, (b + 1) * streaming.SEGMENT_SIZE)
                    if ahead is not None:  # keep the next chunks coming while we decrypt
                        for m in range(k, min(len(chunks), k + 1 + READ_AHEAD_CHUNKS)):
                            if m not in tickets:
                                s0 = streaming.ciphertext_start(chunks[m][0])
                                s1 = min(ct_size, (chunks[m][1] + 1) * streaming.SEGMENT_SIZE)
                                tickets[m] = ahead(name, s0, s1 - s0)
                        ticket = tickets.pop(k)
                        if ticket is not None:
                            ticket.wait(READ_AHEAD_WAIT_S)  # else page faults read it
                    written += cipher.decrypt_segments_into(
                        ct_size, a, b, view[start - base : stop - base], out[written:]
                    )
            except BaseException:
                zeroize(out[:written])
                raise
            finally:
                view.release()
            return written
        ctview = memoryview(self._ctbuf)
        try:
            for a in range(first, last + 1, READ_SEGMENTS):
                b = min(last, a + READ_SEGMENTS - 1)
                start = streaming.ciphertext_start(a)
                end = min(ct_size, (b + 1) * streaming.SEGMENT_SIZE)
                chunk = ctview[: end - start]
                self._store.readinto(entry.object_name, start, chunk)
                written += cipher.decrypt_segments_into(ct_size, a, b, chunk, out[written:])
        except BaseException:
            zeroize(out[:written])
            raise
        return written

    # ------------------------------------------------------------------ whole shards

    def decrypt_shard_into(
        self, j: int, buffer: bytearray | memoryview, *, verify_digest: bool = False
    ) -> memoryview:
        """Decrypt shard ``j`` into ``buffer``; returns the plaintext view (a prefix of it)."""
        entry = self._entry(j)
        out = memoryview(buffer).cast("B")
        if out.readonly or len(out) < entry.plaintext_size:
            raise ValueError(
                f"shard {j} needs a writable buffer of {entry.plaintext_size} bytes, got {len(out)}"
            )
        self._check_size(j, entry)
        header = bytearray(streaming.HEADER_SIZE)
        self._store.readinto(entry.object_name, 0, header)
        if not hmac.compare_digest(header, entry.header):
            raise DecryptionError(f"shard {j}", shard=j)
        n = streaming.segment_count(entry.ciphertext_size)
        written = self._decrypt_segments(j, entry, 0, n - 1, out)
        view = out[:written]
        if verify_digest and not hmac.compare_digest(hashlib.sha256(view).digest(), entry.sha256):
            zeroize(view)
            raise DecryptionError(f"shard {j}", shard=j)
        return view

    def decrypt_segments_into(
        self, j: int, first: int, last: int, buffer: bytearray | memoryview
    ) -> memoryview:
        """Decrypt segments ``first..last`` (inclusive) of shard ``j`` into ``buffer``.

        The plaintext starts at shard offset ``sealed.streaming.plaintext_start(first)``.
        Only those segments are read. Returns the plaintext view.
        """
        entry = self._entry(j)
        n = streaming.segment_count(entry.ciphertext_size)
        if not 0 <= first <= last < n:
            raise IndexError(f"segments {first}..{last} outside shard {j}'s {n} segments")
        end = min(entry.plaintext_size, streaming.plaintext_start(last + 1))
        need = end - streaming.plaintext_start(first)
        out = memoryview(buffer).cast("B")
        if out.readonly or len(out) < need:
            raise ValueError(f"segments need a writable buffer of {need} bytes, got {len(out)}")
        self._check_size(j, entry)
        return out[: self._decrypt_segments(j, entry, first, last, out)]

    def iter_shard_records(self, j: int, buffer: bytearray | memoryview) -> Iterator[memoryview]:
        """Decrypt shard ``j`` into ``buffer`` and yield its records as zero-copy views."""
        return iter(self.shard_view(j, buffer))

    def shard_view(self, j: int, buffer: bytearray | memoryview) -> ShardView:
        """Decrypt shard ``j`` into ``buffer``; a :class:`ShardView` of its records."""
        view = ShardView(self.decrypt_shard_into(j, buffer), what=f"shard {j}")
        if view.offsets != list(self._manifest.shards[j].offsets):
            raise DecryptionError(f"shard {j}", shard=j)
        return view

    # ------------------------------------------------------------------ random access

    def read_shard_record_into(self, j: int, i: int, out: bytearray | memoryview) -> memoryview:
        """Record ``i`` of shard ``j`` into ``out``, decrypting only the segments holding it."""
        entry = self._entry(j)
        start, end = entry.record_range(i)
        dest = memoryview(out).cast("B")
        if dest.readonly or len(dest) < end - start:
            raise ValueError(f"record needs a writable buffer of {end - start} bytes")
        if start == end:
            return dest[:0]
        self._check_size(j, entry)
        first, last = streaming.segment_of(start), streaming.segment_of(end - 1)
        span = streaming.plaintext_start(last + 1) - streaming.plaintext_start(first)
        if len(self._scratch) < span:
            zeroize(self._scratch)
            self._scratch = bytearray(span)
        scratch = memoryview(self._scratch)
        try:
            self._decrypt_segments(j, entry, first, last, scratch)
            base = streaming.plaintext_start(first)
            dest[: end - start] = scratch[start - base : end - base]
        finally:
            zeroize(scratch[:span])
        return dest[: end - start]

    def read_shard_record(self, j: int, i: int) -> bytearray:
        """Record ``i`` of shard ``j`` as a new ``bytearray`` (zeroize it when done)."""
        start, end = self._entry(j).record_range(i)
        out = bytearray(end - start)
        self.read_shard_record_into(j, i, out)
        return out

    def read_record(self, k: int) -> bytearray:
        """Global record ``k`` as a new ``bytearray``, reading only the segments holding it."""
        j, i = self._manifest.locate(k)
        return self.read_shard_record(j, i)

    def read_record_into(self, k: int, out: bytearray | memoryview) -> memoryview:
        j, i = self._manifest.locate(k)
        return self.read_shard_record_into(j, i, out)

    def record_size(self, k: int) -> int:
        j, i = self._manifest.locate(k)
        start, end = self._manifest.shards[j].record_range(i)
        return end - start

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Zero the key copy and scratch buffers; drop the per-shard AES-GCM contexts."""
        if self._closed:
            return
        self._closed = True
        self._ciphers.clear()
        self._dek.zeroize()
        zeroize(self._scratch)
        zeroize(self._ctbuf)

    def __enter__(self) -> DatasetReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
