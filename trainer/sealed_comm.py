"""The sealed transport: authenticated rendezvous and AES-GCM collectives of per-link frames.

Every byte of model state that moves between ranks (the parameter and buffer broadcast at
start, every gradient bucket, barriers) travels as sealed frames, each for one link (sender,
receiver), moved by ``dist.all_to_all_single`` over the job's process group (gloo; a gloo
side group when the job runs on NCCL). The keys come from :mod:`trainer.sealed_comm_keys`.

Rendezvous (:func:`open_channel`), on every rank, after the DEK is released and before any
model state moves:

1. derive ``K_job`` from the DEK; all-gather the 76-byte hellos (public: rank, world, fresh
   nonce, node digest); compute the transcript ``T``;
2. derive the link keys ``K_me->p`` and ``K_p->me`` for every peer, then zero ``K_job``;
3. send every peer a sealed confirmation (purpose HANDSHAKE, sequence 0) carrying
   ``confirm_me``; receive and check every peer's. A peer without the job key (or with
   another transcript: a hello altered in transit, another job) fails here with
   :class:`ChannelAuthError` and the job stops before the first parameter moves.

Frame (one sealed message; integers big-endian)::

    offset size field                       (bytes 0-31 are the header: AES-GCM associated data)
    0      4    magic b"SCM1"
    4      1    purpose: 1 handshake, 2 broadcast, 3 reduce-scatter, 4 all-gather, 5 barrier
    5      1    version 1
    6      2    sender rank
    8      2    receiver rank
    10     2    zero
    12     8    sequence: frames sent on this link (this direction) before this one
    20     4    operation: collectives run on this channel before this one (the bucket
                all-reduce of step s, bucket b has a number every rank agrees on)
    24     4    chunk index within the operation's part
    28     4    payload length n (<= MAX_CHUNK)
    32     n    AES-256-GCM ciphertext of the payload under K_sender->receiver
    32+n   16   tag
    nonce = 0x00000000 || BE64 sequence

The receiver knows every field before the frame arrives (the collectives are
deterministic), rebuilds the header it expects and accepts the frame only if the header is
exactly that and the tag verifies under that header and the nonce of the expected sequence.
So a forged or altered frame (tag), a replayed one (sequence already used), a reordered or
dropped one (sequence ahead of the expected), or a frame of another link, purpose or
operation fails, and raises :class:`ChannelAuthError`; the channel's failure callback (the
trainer: shred and exit with :data:`EXIT_CHANNEL_AUTH`) runs first. A key and sequence pair
never repeats: one key per link per direction per run, sequence numbers only grow.

All-reduce (:meth:`SealedChannel.all_reduce_`) is reduce-scatter then all-gather: the flat
tensor is cut into ``world`` parts; rank ``i`` owns part ``i``. Every rank sends each owner
its copy of the owner's part (sealed, in chunks of at most :data:`CHUNK_BYTES`), each owner
adds the copies it receives to its own in rank order, then sends the reduced part to every
peer, who decrypts it straight into the tensor. Each phase is one ``all_to_all_single`` of
sealed frames (the frames for peer p, one per chunk, back to back in p's slot), sized by
rules every rank knows. Received plaintext contributions land in pooled scratch tensors
that the shredder zeroes.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from sealed.errors import DecryptionError
from sealed.link import LinkAead
from sealed.secrets import SecretBuffer
from trainer.sealed_comm_keys import (
    HELLO_SIZE,
    Hello,
    confirm_tag,
    derive_job_channel_key,
    derive_link_key,
    local_node_digest,
    tags_equal,
    transcript_hash,
)

__all__ = [
    "CHUNK_BYTES",
    "EXIT_CHANNEL_AUTH",
    "ChannelAuthError",
    "Rendezvous",
    "SealedChannel",
    "open_channel",
]

log = logging.getLogger("trainer.sealed_comm")

EXIT_CHANNEL_AUTH = 6
HEADER_SIZE = 32
TAG_SIZE = 16
CHUNK_BYTES = 4 << 20
MAX_CHUNK = 64 << 20
_MAGIC = b"SCM1"
_VERSION = 1
_HEADER = struct.Struct(">4sBBHHHQIII")
HANDSHAKE, BROADCAST, REDUCE_SCATTER, ALL_GATHER, BARRIER = 1, 2, 3, 4, 5
_PURPOSES = {HANDSHAKE: "handshake", BROADCAST: "broadcast", REDUCE_SCATTER: "reduce-scatter",
             ALL_GATHER: "all-gather", BARRIER: "barrier"}


class ChannelAuthError(Exception):
    """A sealed message failed authentication (forged, replayed, reordered, dropped, or from
    a peer that does not hold the job key). The job stops and shreds."""

    def __init__(self, peer: int, what: str) -> None:
        super().__init__(f"sealed channel: message from rank {peer} rejected: {what}")
        self.peer = peer


FailureCallback = Callable[[ChannelAuthError], None]


def _nonce(seq: int) -> bytes:
    return b"\x00\x00\x00\x00" + struct.pack(">Q", seq)


def _bytes_of(t: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor (any dtype, bf16 included)."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def _split(n: int, parts: int) -> list[tuple[int, int]]:
    """(start, count) of ``parts`` contiguous pieces of ``n`` elements, sizes differing by <=1."""
    base, extra = divmod(n, parts)
    out, start = [], 0
    for i in range(parts):
        count = base + (1 if i < extra else 0)
        out.append((start, count))
        start += count
    return out


def _chunks(nbytes: int, esize: int, limit: int) -> list[tuple[int, int]]:
    """(offset, length) byte ranges of at most ``limit`` bytes on element boundaries."""
    step = max(esize, limit - limit % esize)
    if nbytes == 0:
        return [(0, 0)]
    return [(off, min(step, nbytes - off)) for off in range(0, nbytes, step)]


class _Pool:
    """Reusable uint8 CPU tensors by size (fresh large allocations cost a page fault per page)."""

    def __init__(self) -> None:
        self._free: dict[int, list[torch.Tensor]] = {}
        self.all: list[torch.Tensor] = []

    def take(self, size: int) -> torch.Tensor:
        free = self._free.get(size)
        if free:
            return free.pop()
        t = torch.empty(size, dtype=torch.uint8)
        self.all.append(t)
        return t

    def give(self, t: torch.Tensor) -> None:
        self._free.setdefault(t.numel(), []).append(t)


class SealedChannel:
    """Sealed point-to-point messages and collectives between the ranks of one job.

    Built by :func:`open_channel`. Collectives are serialised by a lock and numbered; every
    rank must call them in the same order, as with any process group.
    """

    def __init__(
        self,
        *,
        rank: int,
        world_size: int,
        send_keys: dict[int, SecretBuffer],
        recv_keys: dict[int, SecretBuffer],
        group: dist.ProcessGroup | None = None,
        on_auth_failure: FailureCallback | None = None,
        chunk_bytes: int = CHUNK_BYTES,
    ) -> None:
        peers = [p for p in range(world_size) if p != rank]
        if sorted(send_keys) != peers or sorted(recv_keys) != peers:
            raise ValueError("a sealed channel needs one send and one receive key per peer")
        if not 0 < chunk_bytes <= MAX_CHUNK:
            raise ValueError(f"chunk size must be 1..{MAX_CHUNK} bytes")
        self.rank = rank
        self.world_size = world_size
        self.peers = peers
        self._group = group
        self._on_failure = on_auth_failure
        self._chunk = chunk_bytes
        self._keys = [*send_keys.values(), *recv_keys.values()]
        self._send_aead = {p: LinkAead(send_keys[p]) for p in peers}
        self._recv_aead = {p: LinkAead(recv_keys[p]) for p in peers}
        self._send_seq = dict.fromkeys(peers, 0)
        self._recv_seq = dict.fromkeys(peers, 0)
        self._op = 0
        self._lock = threading.RLock()
        self._frames = _Pool()  # ciphertext only
        self._scratch = _Pool()  # received plaintext contributions: shredded
        self._closed = False
        self._failed: ChannelAuthError | None = None

    # secrets and plaintext, for the shredder ------------------------------------------------
    def secrets(self) -> list[SecretBuffer]:
        return list(self._keys)

    def plaintext_tensors(self) -> list[torch.Tensor]:
        return list(self._scratch.all)

    def close(self) -> None:
        """Forget the AEAD contexts and zero the link keys (idempotent)."""
        self._closed = True
        self._send_aead.clear()
        self._recv_aead.clear()
        for key in self._keys:
            key.zeroize()

    # frames --------------------------------------------------------------------------------
    def _header(self, purpose: int, src: int, dst: int, seq: int, op: int, chunk: int,
                length: int) -> bytes:
        return _HEADER.pack(_MAGIC, purpose, _VERSION, src, dst, 0, seq, op, chunk, length)

    def _seal_into(self, dst: int, purpose: int, op: int, chunk: int, payload: memoryview,
                   frame: memoryview) -> None:
        """Write one sealed frame (header, ciphertext, tag) into ``frame``."""
        n = len(payload)
        seq = self._send_seq[dst]
        self._send_seq[dst] = seq + 1
        header = self._header(purpose, self.rank, dst, seq, op, chunk, n)
        frame[:HEADER_SIZE] = header
        self._send_aead[dst].seal_into(_nonce(seq), payload, header, frame[HEADER_SIZE:])

    def _alltoall(self, out: torch.Tensor, out_splits: list[int], inp: torch.Tensor,
                  in_splits: list[int]) -> None:
        """Move the sealed frames (tests subclass this to tamper with them)."""
        dist.all_to_all_single(out, inp, out_splits, in_splits, group=self._group)

    def _open_into(self, src: int, purpose: int, op: int, chunk: int, view: memoryview,
                   out: memoryview) -> None:
        """Check the frame's header against the expected one and decrypt it into ``out``."""
        n = len(out)
        seq = self._recv_seq[src]
        expected = self._header(purpose, src, self.rank, seq, op, chunk, n)
        got = bytes(view[:HEADER_SIZE])
        if got != expected:
            self._fail(ChannelAuthError(src, self._header_mismatch(got, seq)))
        try:  # the output is zeroed on failure (unauthenticated bytes never stay)
            self._recv_aead[src].open_into(_nonce(seq), view[HEADER_SIZE:], expected, out)
        except DecryptionError:
            self._fail(ChannelAuthError(src, f"authentication tag invalid ({_PURPOSES[purpose]}"
                                             f" #{op}, sequence {seq})"))
        self._recv_seq[src] = seq + 1

    @staticmethod
    def _header_mismatch(got: bytes, seq: int) -> str:
        try:
            magic, purpose, _, _, _, _, got_seq, _, _, _ = _HEADER.unpack(got)
        except struct.error:  # pragma: no cover - the header is always 32 bytes
            return "malformed header"
        if magic != _MAGIC:
            return "not a sealed frame"
        if got_seq < seq:
            return f"replayed (sequence {got_seq}, expected {seq})"
        if got_seq > seq:
            return f"out of order or a message was dropped (sequence {got_seq}, expected {seq})"
        return f"unexpected header ({_PURPOSES.get(purpose, 'unknown purpose')})"

    def _fail(self, exc: ChannelAuthError) -> None:
        self._failed = exc
        log.error("ChannelAuthError: %s", exc)
        if self._on_failure is not None:
            self._on_failure(exc)
        raise exc

    def _check_usable(self) -> None:
        if self._failed is not None:
            raise self._failed
        if self._closed:
            raise RuntimeError("the sealed channel is closed")

    # collectives ---------------------------------------------------------------------------
    def _next_op(self) -> int:
        op = self._op
        self._op += 1
        return op

    def _exchange(
        self,
        purpose: int,
        op: int,
        sends: Iterable[tuple[int, int, memoryview]],
        recvs: Sequence[tuple[int, int, memoryview]],
        on_open: Callable[[int, int], None] | None = None,
    ) -> None:
        """Seal every message, move all frames in one all-to-all, open the received ones.

        ``sends``/``recvs`` are (peer, chunk index, bytes); every rank calls this together
        with sizes the others expect (the collectives are deterministic). Frames to one peer
        get that link's next sequence numbers in the order listed; received frames are
        opened in the order of ``recvs`` and ``on_open(i, chunk)`` runs right after
        ``recvs[i]`` is open. One ``all_to_all_single`` per exchange: gloo runs it in its
        own collective path, far quicker on small messages than unbound point-to-point."""
        if self._closed:
            raise RuntimeError("the sealed channel is closed")
        world = self.world_size
        send_list = list(sends)
        in_splits, out_splits = [0] * world, [0] * world
        for dst, _, data in send_list:
            in_splits[dst] += HEADER_SIZE + len(data) + TAG_SIZE
        places = []
        for src, _, out in recvs:
            places.append(out_splits[src])
            out_splits[src] += HEADER_SIZE + len(out) + TAG_SIZE
        inp = self._frames.take(sum(in_splits))
        out_buf = self._frames.take(sum(out_splits))
        try:
            in_view, out_view = _bytes_of(inp), _bytes_of(out_buf)
            in_base = [sum(in_splits[:p]) for p in range(world)]
            out_base = [sum(out_splits[:p]) for p in range(world)]
            for dst, chunk, data in send_list:
                size = HEADER_SIZE + len(data) + TAG_SIZE
                self._seal_into(dst, purpose, op, chunk, data,
                                in_view[in_base[dst]: in_base[dst] + size])
                in_base[dst] += size
            self._alltoall(out_buf, out_splits, inp, in_splits)
            for index, ((src, chunk, out), place) in enumerate(zip(recvs, places, strict=True)):
                start = out_base[src] + place
                frame = out_view[start: start + HEADER_SIZE + len(out) + TAG_SIZE]
                self._open_into(src, purpose, op, chunk, frame, out)
                if on_open is not None:
                    on_open(index, chunk)
        finally:
            self._frames.give(inp)
            self._frames.give(out_buf)

    def all_reduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` (flat, contiguous, CPU) over all ranks in place; every rank ends
        with the same bytes. Returns ``tensor``."""
        if tensor.device.type != "cpu" or not tensor.is_contiguous():
            raise ValueError("sealed all-reduce works on contiguous CPU tensors")
        with self._lock:
            self._check_usable()
            op = self._next_op()
            flat = tensor.view(-1)
            esize = flat.element_size()
            parts = _split(flat.numel(), self.world_size)
            raw = _bytes_of(flat)

            def part_chunks(owner: int) -> list[tuple[int, memoryview]]:
                start, count = parts[owner]
                base = start * esize
                return [(i, raw[base + off: base + off + n])
                        for i, (off, n) in enumerate(_chunks(count * esize, esize, self._chunk))]

            mine_start, mine_count = parts[self.rank]
            # reduce-scatter: every peer's copy of my part into scratch, then add in rank order
            scratch = {p: self._scratch.take(mine_count * esize) for p in self.peers}
            mine = flat[mine_start: mine_start + mine_count]
            try:
                recvs, adds = [], []
                for p in self.peers:
                    sview = _bytes_of(scratch[p])
                    contribution = scratch[p].view(flat.dtype)
                    for i, (off, n) in enumerate(_chunks(mine_count * esize, esize, self._chunk)):
                        recvs.append((p, i, sview[off: off + n]))
                        lo, hi = off // esize, (off + n) // esize
                        adds.append((mine[lo:hi], contribution[lo:hi]))

                def add(index: int, chunk: int) -> None:  # peers in rank order, as received
                    dst, src = adds[index]
                    dst.add_(src)

                sends = [(p, i, data) for p in self._rotated_peers()
                         for i, data in part_chunks(p)]
                self._exchange(REDUCE_SCATTER, op, sends, recvs, on_open=add)
            finally:
                for t in scratch.values():  # zeroed by the shredder, not after every bucket
                    self._scratch.give(t)
            # all-gather: my reduced part to every peer; theirs straight into the tensor
            recvs = [(p, i, data) for p in self.peers for i, data in part_chunks(p)]
            sends = [(p, i, data) for p in self._rotated_peers()
                     for i, data in part_chunks(self.rank)]
            self._exchange(ALL_GATHER, op, sends, recvs)
            return tensor

    def _rotated_peers(self) -> list[int]:
        """Peers starting after this rank, so that not everyone sends to rank 0 first."""
        return [(self.rank + k) % self.world_size for k in range(1, self.world_size)]

    def broadcast_(self, tensors: Sequence[torch.Tensor], src: int = 0) -> None:
        """Copy ``src``'s tensors into every rank's (same shapes and dtypes everywhere).
        Tensors on another device are staged through host memory."""
        with self._lock:
            self._check_usable()
            op = self._next_op()
            staged = [(t, t.detach().to("cpu").contiguous() if t.device.type != "cpu"
                       or not t.is_contiguous() else t.detach()) for t in tensors]
            msgs: list[tuple[int, memoryview]] = []
            index = 0
            for _, host in staged:
                raw = _bytes_of(host)
                for off, n in _chunks(len(raw), host.element_size(), self._chunk):
                    msgs.append((index, raw[off: off + n]))
                    index += 1
            if self.rank == src:
                self._exchange(BROADCAST, op, [(p, i, d) for p in self._rotated_peers()
                                               for i, d in msgs], [])
                return
            self._exchange(BROADCAST, op, [], [(src, i, d) for i, d in msgs])
            with torch.no_grad():
                for t, host in staged:
                    if host.data_ptr() != t.data_ptr():
                        t.copy_(host)

    def barrier(self) -> None:
        """Every rank reaches this point before any leaves it (a sealed empty message from
        every rank to every other)."""
        with self._lock:
            self._check_usable()
            op = self._next_op()
            empty = memoryview(b"")
            self._exchange(BARRIER, op, [(p, 0, empty) for p in self._rotated_peers()],
                           [(p, 0, memoryview(bytearray())) for p in self.peers])


@dataclass(frozen=True, slots=True)
class Rendezvous:
    """What the authenticated rendezvous learned: the channel and where the ranks run."""

    channel: SealedChannel
    nodes: int  # distinct node digests among the hellos


def open_channel(
    *,
    rank: int,
    world_size: int,
    dek: SecretBuffer,
    job_id: str,
    group: dist.ProcessGroup | None = None,
    on_auth_failure: FailureCallback | None = None,
    node_digest: bytes | None = None,
    chunk_bytes: int = CHUNK_BYTES,
) -> Rendezvous:
    """Run the authenticated rendezvous (module docstring) and return the sealed channel.

    Raises :class:`ChannelAuthError` (after calling ``on_auth_failure``) when a peer cannot
    prove it holds the job key."""
    hello = Hello(rank=rank, world_size=world_size, nonce=os.urandom(32),
                  node=node_digest if node_digest is not None else local_node_digest())
    mine = torch.frombuffer(bytearray(hello.encode()), dtype=torch.uint8)
    gathered = [torch.empty(HELLO_SIZE, dtype=torch.uint8) for _ in range(world_size)]
    dist.all_gather(gathered, mine, group=group)
    try:
        hellos = [Hello.decode(bytes(t.numpy())) for t in gathered]
        transcript = transcript_hash(job_id, hellos)
    except ValueError as exc:
        err = ChannelAuthError(-1, f"rendezvous hello rejected: {exc}")
        log.error("ChannelAuthError: %s", err)
        if on_auth_failure is not None:
            on_auth_failure(err)
        raise err from None
    job_key = derive_job_channel_key(dek, job_id)
    try:
        send_keys = {p: derive_link_key(job_key, transcript, rank, p)
                     for p in range(world_size) if p != rank}
        recv_keys = {p: derive_link_key(job_key, transcript, p, rank)
                     for p in range(world_size) if p != rank}
        confirms = {r: confirm_tag(job_key, transcript, job_id, r, world_size)
                    for r in range(world_size)}
    finally:
        job_key.zeroize()
    channel = SealedChannel(rank=rank, world_size=world_size, send_keys=send_keys,
                            recv_keys=recv_keys, group=group, chunk_bytes=chunk_bytes)
    recvs = [(p, 0, memoryview(bytearray(32))) for p in channel.peers]
    failure: ChannelAuthError | None = None
    with channel._lock:
        try:
            channel._exchange(HANDSHAKE, 0, [(p, 0, memoryview(confirms[rank]))
                                             for p in channel._rotated_peers()], recvs)
        except ChannelAuthError as exc:
            failure = exc
        else:
            for p, _, got in recvs:
                if not tags_equal(bytes(got), confirms[p]):
                    failure = ChannelAuthError(p, "key confirmation mismatch")
                    break
        channel._op = 1
    if failure is not None:
        channel.close()
        err = ChannelAuthError(failure.peer, "it could not prove it holds the job key "
                                             "(key confirmation failed at rendezvous)")
        log.error("ChannelAuthError: %s", err)
        if on_auth_failure is not None:
            on_auth_failure(err)
        raise err
    channel._on_failure = on_auth_failure
    return Rendezvous(channel=channel, nodes=len({h.node for h in hellos}))
