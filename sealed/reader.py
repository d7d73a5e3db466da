"""Read a sealed dataset: whole shards into caller buffers, or single records by random access.

:meth:`DatasetReader.open` reads and authenticates the manifest. After that:

* :meth:`~DatasetReader.decrypt_shard_into` checks the shard object's size and stream header
  against the manifest and decrypts every segment straight into the caller's buffer (no
  intermediate plaintext copy). Where the ciphertext comes from depends on the store:

  - a :class:`~sealed.store.FetchStore` (``MappedDirStore``, the trainer's): the shard is
    taken in chunks of :data:`FETCH_SEGMENTS` segments (4 MiB), scheduled up to
    :data:`FETCH_AHEAD` chunks ahead of the one being decrypted. The shard is probed once,
    when its first chunk is scheduled: a shard cached whole is decrypted in place from the
    store's mapping (zero-copy); otherwise every chunk of it is read by the store's I/O
    thread into one of :data:`FETCH_BUFFERS` reused buffers (one sequential stream of large
    reads, as a plain ``read``, so the kernel's read-ahead of the file stays whole) while
    this thread decrypts the chunks before it, so cold data costs about what reading it
    costs. A shard with nothing under way yet (the first of a run) has its first
    chunks scheduled before its header is read.
    ``next_shard`` names the shard the caller decrypts next: its first chunks are scheduled
    before the call returns, so its reads overlap the caller's use of this one. A background
    read that comes back short (an object truncated after it was opened) is a
    :class:`StoreError`, never decrypted.
  - another store with ``view_range`` (``MemoryStore``): a zero-copy view of the range;
  - any other store: ``readinto`` one reused buffer (8 MiB per ranged read). If the store
    offers ``will_need`` (:class:`~sealed.store.WillNeedStore`: ``S3Store``) and the caller
    names ``next_shard``, the first :data:`HINT_BYTES` of that shard are hinted while the
    last reads of this one run, one read's worth more per read as the end nears (so the
    store's fetches stay as many in flight across the boundary as inside a shard); a hint
    that fails is dropped (the call that reads that shard reports the error).

  If any segment fails, everything already written to the caller's buffer is zeroed and
  :class:`DecryptionError` names the shard and segment: no plaintext of a tampered shard is
  returned. ``verify_digest=True`` also checks the plaintext SHA-256 from the manifest (for
  datasets written with ``plaintext_digests=True``; a :class:`ValueError` otherwise); it is
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

import contextlib
import hashlib
import hmac
import itertools
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import cast

from sealed import streaming
from sealed.errors import DecryptionError, StoreError
from sealed.manifest import NO_DIGEST, Manifest, ShardEntry, open_manifest
from sealed.secrets import SecretBuffer, zeroize
from sealed.shard import ShardView, shard_aad
from sealed.store import (
    Fetch,
    FetchStore,
    ObjectStore,
    RangeViewStore,
    ReadTicket,
    WillNeedStore,
)

__all__ = ["READ_SEGMENTS", "DatasetReader"]

READ_SEGMENTS = 8  # ciphertext is fetched up to 8 segments (8 MiB) per ranged read
FETCH_SEGMENTS = 4  # from a FetchStore: chunks of 4 segments (4 MiB), each read whole
FETCH_BUFFERS = 4  # reused read buffers of one chunk each: reads run up to 4 chunks ahead
FETCH_AHEAD = 8  # chunks scheduled ahead of the one being decrypted
HINT_BYTES = 4 * READ_SEGMENTS * streaming.SEGMENT_SIZE  # next shard hinted to a remote store


@dataclass(slots=True, eq=False)
class _Chunk:
    """Segments ``first..last`` of shard ``shard``: ciphertext bytes ``[start, stop)``."""

    shard: int
    first: int
    last: int
    start: int
    stop: int
    ticket: ReadTicket | None = None  # the background read filling ``buf`` (None: cached)
    buf: bytearray | None = None


class DatasetReader:
    """Authenticated access to one dataset. Create with :meth:`open`."""

    def __init__(self, store: ObjectStore, manifest: Manifest, dek: SecretBuffer) -> None:
        self._store = store
        self._manifest = manifest
        self._dek = dek.copy()
        self._ciphers: dict[int, streaming.SegmentCipher] = {}
        self._checked: set[int] = set()
        self._ctbuf = bytearray(0)  # the read buffer of stores read by copy (allocated then)
        self._scratch = bytearray(0)
        self._closed = False
        # chunks scheduled (and, where not cached, being read) ahead, in decryption order
        self._ahead: deque[_Chunk] = deque()
        self._fetching = isinstance(store, FetchStore)  # (protocol checks are slow: once)
        self._viewing = isinstance(store, RangeViewStore)
        self._hinting = isinstance(store, WillNeedStore)
        self._fetches: dict[int, Fetch | None] = {}
        self._warm: dict[int, bool] = {}  # shards taken as cached whole (see _schedule)
        self._spare: list[bytearray] = []
        self._buffers = 0

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
        self,
        j: int,
        entry: ShardEntry,
        first: int,
        last: int,
        out: memoryview,
        then: int | None = None,
    ) -> int:
        """Decrypt segments first..last of shard j into ``out``; zero ``out`` on failure."""
        if self._fetching:
            return self._decrypt_fetched(j, entry, first, last, out, then)
        self._drain()
        cipher = self._cipher(j)
        ct_size = entry.ciphertext_size
        written = 0
        if self._viewing:  # ciphertext in memory or mapped: no copy
            base = streaming.ciphertext_start(first)
            end = min(ct_size, (last + 1) * streaming.SEGMENT_SIZE)
            view = self._store.view_range(entry.object_name, base, end - base)
            try:
                written = cipher.decrypt_segments_into(ct_size, first, last, view, out)
            finally:
                view.release()
            return written
        if not self._ctbuf:
            self._ctbuf = bytearray(READ_SEGMENTS * streaming.SEGMENT_SIZE)
        ctview = memoryview(self._ctbuf)
        hint = then is not None and self._hinting
        try:
            for a in range(first, last + 1, READ_SEGMENTS):
                b = min(last, a + READ_SEGMENTS - 1)
                start = streaming.ciphertext_start(a)
                end = min(ct_size, (b + 1) * streaming.SEGMENT_SIZE)
                if hint and ct_size - end < HINT_BYTES:
                    assert then is not None
                    hint = self._hint(then, HINT_BYTES - (ct_size - end))
                chunk = ctview[: end - start]
                self._store.readinto(entry.object_name, start, chunk)
                written += cipher.decrypt_segments_into(ct_size, a, b, chunk, out[written:])
        except BaseException:
            zeroize(out[:written])
            raise
        return written

    def _hint(self, j: int, length: int) -> bool:
        """Tell the store the first ``length`` bytes of shard ``j`` (rounded up to whole
        reads) are read next; False once that failed (no more hints this call)."""
        entry = self._manifest.shards[j]
        unit = READ_SEGMENTS * streaming.SEGMENT_SIZE
        length = min(entry.ciphertext_size, -(-length // unit) * unit)
        try:
            cast(WillNeedStore, self._store).will_need(entry.object_name, 0, length)
        except StoreError:
            return False
        return True

    # ------------------------------------------------------------------ cached or fetched

    @staticmethod
    def _chunks(
        j: int, entry: ShardEntry, first: int, last: int, limit: int | None = None
    ) -> list[_Chunk]:
        ct_size = entry.ciphertext_size
        out = []
        for a in itertools.islice(range(first, last + 1, FETCH_SEGMENTS), limit):
            b = min(last, a + FETCH_SEGMENTS - 1)
            start = streaming.ciphertext_start(a)
            out.append(_Chunk(j, a, b, start, min(ct_size, (b + 1) * streaming.SEGMENT_SIZE)))
        return out

    def _schedule(self, chunk: _Chunk) -> bool:
        """Start reading ``chunk`` into a spare buffer unless its shard is cached whole (the
        shard is probed once, when its first chunk is scheduled).

        False (nothing done) when it is to be read and every buffer is in use.
        """
        j = chunk.shard
        if j not in self._fetches:
            entry = self._manifest.shards[j]
            fetch = self._store.fetch(entry.object_name)
            self._fetches[j] = fetch
            # one probe per shard: cached whole, or read entirely by the I/O thread
            self._warm[j] = fetch is None or fetch.cached(0, entry.ciphertext_size)
        fetch = self._fetches[j]
        if self._warm[j]:
            return True  # decrypted in place from the store's mapping
        # Not cached whole: every chunk is read by the I/O thread, even one a later probe
        # would find cached. Such a chunk is mostly one the kernel's read-ahead for the I/O
        # thread's previous read is filling: taken from the mapping, it is skipped in the I/O
        # thread's sequential reads, which breaks the kernel's read-ahead of the file into
        # more, smaller disk requests (a cold 512 MiB read in 4 MiB chunks: 352 requests
        # instead of 249, 37% more disk time), and its pages arrive by page faults.
        assert fetch is not None
        if not self._spare:
            if self._buffers >= FETCH_BUFFERS:
                return False
            self._buffers += 1
            self._spare.append(bytearray(FETCH_SEGMENTS * streaming.SEGMENT_SIZE))
        chunk.buf = self._spare.pop()
        chunk.ticket = fetch.read_into(chunk.start,
                                       memoryview(chunk.buf)[: chunk.stop - chunk.start])
        return True

    def _top_up(self, want: list[_Chunk], pos: int) -> int:
        """Schedule ``want[pos:]`` while there is room ahead; returns the new ``pos``.

        A failure to open or probe the *next* shard (``want`` beyond the shard being read)
        stops the read-ahead instead: the call that reads that shard reports it."""
        ahead = self._ahead
        current = want[0].shard
        while pos < len(want) and len(ahead) < FETCH_AHEAD:
            chunk = want[pos]
            try:
                if not self._schedule(chunk):
                    break
            except StoreError:
                if chunk.shard == current:
                    raise
                self._fetches.pop(chunk.shard, None)  # not opened: nothing to close
                break
            ahead.append(chunk)
            pos += 1
        return pos

    def _drain(self) -> None:
        """Forget the chunks scheduled ahead (waiting for their reads) and close the objects."""
        while self._ahead:
            chunk = self._ahead.popleft()
            if chunk.ticket is not None:
                with contextlib.suppress(StoreError):
                    chunk.ticket.wait()
            if chunk.buf is not None:
                self._spare.append(chunk.buf)
        self._close_fetches(keep=None)

    def _close_fetches(self, keep: int | None) -> None:
        for j in [j for j in self._fetches if j != keep]:
            self._warm.pop(j, None)
            fetch = self._fetches.pop(j)
            if fetch is not None:
                fetch.close()

    def _decrypt_fetched(
        self, j: int, entry: ShardEntry, first: int, last: int, out: memoryview, then: int | None
    ) -> int:
        """The chunks of ``first..last`` in order: cached ones decrypted in place from the
        mapping, the others read ahead (by the store's I/O thread, while this thread
        decrypts) into reused buffers. With ``then``, the first chunks of that shard are
        scheduled too, so its reads run while the caller uses this one."""
        cipher = self._cipher(j)
        ct_size = entry.ciphertext_size
        plan = self._chunks(j, entry, first, last)
        want = list(plan)
        if then is not None:
            nxt = self._entry(then)
            n = streaming.segment_count(nxt.ciphertext_size)
            want += self._chunks(then, nxt, 0, n - 1, FETCH_AHEAD)
        ahead = self._ahead
        if ahead and [(c.shard, c.first, c.last) for c in ahead] != [
            (c.shard, c.first, c.last) for c in want[: len(ahead)]
        ]:
            self._drain()  # scheduled for another read than this one
        want[: len(ahead)] = list(ahead)  # the chunks already under way
        pos = len(ahead)
        view: memoryview | None = None
        view_start = view_stop = 0
        written = 0
        try:
            done = 0
            while done < len(plan):
                pos = self._top_up(want, pos)
                chunk = ahead.popleft()
                first_seg, last_seg, start, stop = chunk.first, chunk.last, chunk.start, chunk.stop
                done += 1
                if chunk.ticket is None and self._warm.get(j):
                    # cached whole: the rest of the range in one go (its chunks queued ahead
                    # hold no buffers and no reads)
                    for _ in range(min(pos, len(plan)) - done):
                        ahead.popleft()
                    last_seg, stop = plan[-1].last, plan[-1].stop
                    pos, done = max(pos, len(plan)), len(plan)
                if chunk.ticket is None:
                    if not view_start <= start < view_stop:
                        # one view over this chunk and the cached ones queued after it
                        view_stop = stop
                        for c in ahead:
                            if c.shard != j or c.ticket is not None:
                                break
                            view_stop = c.stop
                        if view is not None:
                            view.release()
                        view_start = start
                        view = self._store.view_range(
                            entry.object_name, view_start, view_stop - view_start
                        )
                    assert view is not None
                    src = view[start - view_start : stop - view_start]
                else:
                    chunk.ticket.wait()
                    src = memoryview(chunk.buf)[: stop - start]
                try:
                    written += cipher.decrypt_segments_into(
                        ct_size, first_seg, last_seg, src, out[written:]
                    )
                finally:
                    src.release()
                    if chunk.buf is not None:
                        self._spare.append(chunk.buf)
                        chunk.buf = None
            self._top_up(want, pos)  # the next shard's reads start before this call returns
            self._close_fetches(keep=then)
        except BaseException:
            zeroize(out[:written])
            self._drain()
            raise
        finally:
            if view is not None:
                view.release()
        return written

    # ------------------------------------------------------------------ whole shards

    def decrypt_shard_into(
        self,
        j: int,
        buffer: bytearray | memoryview,
        *,
        verify_digest: bool = False,
        next_shard: int | None = None,
    ) -> memoryview:
        """Decrypt shard ``j`` into ``buffer``; returns the plaintext view (a prefix of it).

        ``next_shard``: the shard the caller will decrypt next, if it knows; its first chunks
        are then read (where not cached) before this call returns, while the caller works.
        """
        entry = self._entry(j)
        if next_shard is not None:
            self._entry(next_shard)
        if verify_digest and entry.sha256 == NO_DIGEST:
            raise ValueError(
                f"shard {j} has no plaintext digest to verify: the dataset was written without "
                "plaintext_digests=True"
            )
        out = memoryview(buffer).cast("B")
        if out.readonly or len(out) < entry.plaintext_size:
            raise ValueError(
                f"shard {j} needs a writable buffer of {entry.plaintext_size} bytes, got {len(out)}"
            )
        self._check_size(j, entry)
        n = streaming.segment_count(entry.ciphertext_size)
        if self._fetching and not self._ahead:
            # nothing under way (the first shard of a run, or no hint named it): its first
            # chunks are scheduled before the header is read, so the two reads overlap
            self._top_up(self._chunks(j, entry, 0, n - 1, FETCH_AHEAD), 0)
        header = bytearray(streaming.HEADER_SIZE)
        self._store.readinto(entry.object_name, 0, header)
        if not hmac.compare_digest(header, entry.header):
            raise DecryptionError(f"shard {j}", shard=j)
        written = self._decrypt_segments(j, entry, 0, n - 1, out, next_shard)
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
        self._drain()
        self._ciphers.clear()
        self._dek.zeroize()
        zeroize(self._scratch)
        zeroize(self._ctbuf)

    def __enter__(self) -> DatasetReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
