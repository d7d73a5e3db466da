"""One attestation per node: local rank 0 fetches the dataset key and hands it to its local peers.

Under torchrun every rank of a node used to attest and take a release from every broker for
itself: n local ranks x m brokers made n x m broker cycles (a Challenge, a releasing Attest,
an HSM seal, a lease and its audit record each) and n x m TLS channels, for the same node,
the same evidence (one TPM or TEE report covers the node, :mod:`trainer.quote_batch`), the
same job and the same DEK. Here local rank 0 (the *holder*) attests and releases once per
broker, and passes the DEK to the other local ranks of its torchrun agent (the *peers*) over a
Unix socket; it forwards every lease renewal, renewal problem and revocation to them, so a
revocation still shreds every local rank, and a holder that disappears without saying goodbye
revokes every peer's handle (fail closed). Leases count nodes (``max_nodes``), so the brokers
count the node once either way; they now also audit and lease it once per broker.

Why this is as strong as every rank attesting (DESIGN.md sections 2, 6 and 9.8): the evidence
attests the node, not a process. A TPM quote covers the boot PCRs and what the agent measured
into PCR 23 (the code and job digests), which any process of the node may reset and extend; a
TEE report covers the confidential VM. The trainer code a rank runs is enforced by that rank's
own guard (``trainer.guard``), which checks every file it loads against the attested manifest,
and every peer still runs it before it asks for the key and again at every lease update it
receives. What the channel must add is that the key reaches only processes that the same
torchrun agent started for this job, nothing else on the node:

- an abstract Unix socket (no file on disk) named after the user, the agent's pid, torchrun's
  run id and the job id; abstract names are not inherited paths, so both sides check the other:
- the kernel's ``SO_PEERCRED`` of the other end: the same effective uid, and a parent process
  equal to this process's own parent (siblings under one torchrun agent; a process cannot make
  itself a child of the agent), and never this process itself;
- the holder serves at most ``LOCAL_WORLD_SIZE - 1`` peers, each local rank once, and
  zeroizes its copy of the key frame when they have it or the wait ends.

Trainer processes are not dumpable (``trainer.hardening``), so another process of the same
user cannot read the key from either end's memory; the DEK travels in kernel socket buffers
only (never disk, environment or command line). A same-user process could already quote the
TPM for itself (see :mod:`trainer.quote_batch`); this channel gives it no more.

Frames, each way: ``type`` (1 byte) || BE32 ``len`` || ``body`` (``len`` <= 64 KiB, checked
before anything is read into a buffer). Peer to holder, once, first: ``H`` body = BE32 local
rank. Holder to peer:

- ``K`` the key, first frame: BE16 ``n`` || DEK (``n`` bytes, 16..64) || BE64 lease expiry
  (Unix ms, 0: none) || BE32 key version || BE16 ``m`` || manifest name (UTF-8, ``m`` bytes)
- ``E`` no key, instead of ``K``: kind (1 byte: ``d`` denied, ``u`` brokers unreachable,
  ``m`` dataset mismatch, ``s`` dataset missing, ``x`` other) || BE16 ``k`` || message (UTF-8)
  || then reasons, each BE16 length || UTF-8, to the end of the body
- ``L`` lease update: BE64 lease expiry (Unix ms) || renewal problem (UTF-8, rest; empty: none)
- ``R`` revoked: reason (UTF-8)
- ``B`` the holder stops normally: no more updates; the peer keeps its lease expiry
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from sealed.secrets import SecretBuffer

__all__ = [
    "HolderFailed",
    "KeyFromHolder",
    "LocalKeyHolder",
    "PeerWatcher",
    "channel_name",
    "receive_key",
]

log = logging.getLogger("trainer.local_keys")

MAX_FRAME = 64 * 1024
MIN_DEK, MAX_DEK = 16, 64
_HEADER = struct.Struct(">cI")
_CRED = struct.Struct("3i")


def channel_name(job_id: str) -> bytes:
    """The abstract socket name the local ranks of this job under this torchrun agent meet at."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "")
    tag = hashlib.sha256("\0".join((str(os.geteuid()), str(os.getppid()), run_id,
                                    job_id)).encode()).hexdigest()[:32]
    return b"\0ctrain-local-keys-" + tag.encode()


def _parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    return int(stat.rsplit(b")", 1)[1].split()[1])


def check_sibling(sock: socket.socket) -> int:
    """The other end's pid, if it is a process of this user started by this process's parent;
    ``PermissionError`` otherwise."""
    pid, uid, _ = _CRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                _CRED.size))
    if uid != os.geteuid():
        raise PermissionError(f"local key channel: the other end (pid {pid}) runs as uid {uid}")
    parent = os.getppid()
    try:
        peer_parent = _parent_of(pid)
    except (OSError, ValueError, IndexError):
        raise PermissionError(f"local key channel: the other end (pid {pid}) is gone") from None
    if pid == os.getpid() or parent <= 1 or peer_parent != parent:
        raise PermissionError(f"local key channel: pid {pid} is not a sibling rank under this "
                              f"torchrun agent (its parent {peer_parent}, ours {parent})")
    return pid


def _send(sock: socket.socket, kind: bytes, body: bytes | memoryview = b"") -> None:
    sock.sendall(_HEADER.pack(kind, len(body)))
    if len(body):
        sock.sendall(body)


def _recv_exact(sock: socket.socket, view: memoryview) -> bool:
    """Fill ``view``; False on EOF before the first byte, ``ConnectionError`` mid-way."""
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            if got == 0:
                return False
            raise ConnectionError("local key channel: truncated frame")
        got += n
    return True


def _recv_header(sock: socket.socket) -> tuple[bytes, int] | None:
    header = bytearray(_HEADER.size)
    if not _recv_exact(sock, memoryview(header)):
        return None
    kind, size = _HEADER.unpack(header)
    if size > MAX_FRAME:
        raise ConnectionError(f"local key channel: frame of {size} bytes (at most {MAX_FRAME})")
    return kind, size


def _recv_body(sock: socket.socket, size: int) -> bytes:
    body = bytearray(size)
    if size and not _recv_exact(sock, memoryview(body)):
        raise ConnectionError("local key channel: truncated frame")
    return bytes(body)


MAX_TEXT = 4096  # bytes of one message, reason or problem a frame carries


def _utf8(s: str, limit: int = MAX_TEXT) -> bytes:
    """``s`` as UTF-8, cut to at most ``limit`` bytes at a character boundary (a cut inside
    a character would make the whole text undecodable at the peer); a lone surrogate (an
    undecodable file name in an error message) becomes U+FFFD instead of raising."""
    data = s.encode("utf-8", "replace")
    if len(data) <= limit:
        return data
    return data[:limit].decode("utf-8", "ignore").encode()


def _text(s: str) -> bytes:
    data = _utf8(s)
    return struct.pack(">H", len(data)) + data


def _name(s: str) -> bytes:
    """A name the peer must get whole (the manifest's object name): never cut."""
    data = s.encode()
    if len(data) > 0xFFFF:
        raise ValueError(f"a manifest name of {len(data)} bytes (at most 65535)")
    return struct.pack(">H", len(data)) + data


class HolderFailed(Exception):
    """Local rank 0 could not obtain the key; ``kind`` says why (see the module's ``E``)."""

    def __init__(self, kind: str, message: str, reasons: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.kind = kind
        self.reasons = reasons


class LocalKeyHolder:
    """Local rank 0's side: listen before attesting, hand the key to each peer once it has it,
    then forward lease updates and revocation until :meth:`close`."""

    def __init__(self, name: bytes, *, peers: int, wait_s: float = 600.0) -> None:
        if peers < 1:
            raise ValueError("a holder needs at least one peer")
        self._peers = peers
        self._deadline = time.monotonic() + wait_s
        self._listen = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self._listen.bind(name)
        except OSError as exc:
            self._listen.close()
            raise RuntimeError(f"local key channel: cannot listen ({exc.strerror}): another "
                               "holder for this job under this torchrun agent?") from None
        self._listen.listen(peers)
        self._lock = threading.Lock()
        self._conns: dict[int, socket.socket] = {}  # local rank -> channel, once served
        self._first: SecretBuffer | None = None  # the K or E frame, whole
        self._ready = threading.Event()
        self._all_served = threading.Event()
        self._closed = False
        self._accepter = threading.Thread(target=self._accept_loop, name="trainer-local-keys",
                                          daemon=True)
        self._accepter.start()

    # what rank 0 learns ---------------------------------------------------------------------
    def publish_key(self, dek: SecretBuffer, *, lease_expiry: float | None, key_version: int,
                    manifest: str) -> None:
        if not MIN_DEK <= len(dek) <= MAX_DEK:
            raise ValueError(f"a DEK of {len(dek)} bytes")
        tail = struct.pack(">QI", int((lease_expiry or 0) * 1000), key_version) + _name(manifest)
        size = 2 + len(dek) + len(tail)
        frame = SecretBuffer(_HEADER.size + size)
        with frame.view() as out, dek.view() as key:
            out[:_HEADER.size] = _HEADER.pack(b"K", size)
            out[_HEADER.size:_HEADER.size + 2] = struct.pack(">H", len(key))
            out[_HEADER.size + 2:_HEADER.size + 2 + len(key)] = key
            out[_HEADER.size + 2 + len(key):] = tail
        self._set_first(frame)

    @property
    def held(self) -> tuple[SecretBuffer, ...]:
        """The key frame this holder keeps until every peer has it (for the shredder)."""
        with self._lock:
            first = self._first
        return (first,) if first is not None and first.alive else ()

    def publish_error(self, kind: str, message: str, reasons: tuple[str, ...] = ()) -> None:
        body = kind.encode()[:1] + _text(message)
        for reason in reasons[:64]:  # as many whole reasons as one frame holds
            text = _text(reason)
            if len(body) + len(text) > MAX_FRAME - _HEADER.size:
                break
            body += text
        self._set_first(SecretBuffer.from_bytes(_HEADER.pack(b"E", len(body)) + body,
                                                lock=False))

    def _set_first(self, frame: SecretBuffer) -> None:
        with self._lock:
            self._first = frame
            pending = dict(self._conns)
            self._conns.clear()
        for rank, conn in pending.items():
            self._serve(rank, conn)
        self._ready.set()

    def wait_served(self, timeout_s: float) -> bool:
        """Whether every peer has its first frame (the key or the error), waiting at most
        ``timeout_s``."""
        return self._all_served.wait(timeout_s)

    def lease(self, expiry: float, problem: str = "") -> None:
        self._broadcast(b"L", struct.pack(">Q", int(expiry * 1000)) + _utf8(problem))

    def revoke(self, reason: str) -> None:
        """Before rank 0's own handle is revoked (it shreds and exits right after)."""
        self._broadcast(b"R", _utf8(reason))

    def close(self, *, linger_s: float = 30.0) -> None:
        """Say goodbye to every peer (they keep their lease expiry) and stop serving. When
        rank 0 has published (its key or why it has none) and a peer has not yet taken it,
        wait for that first, at most ``linger_s``, so a peer learns why rather than waiting
        for a channel that is gone."""
        if self._ready.is_set():
            self._all_served.wait(max(0.0, min(linger_s, self._deadline - time.monotonic())))
        self._broadcast(b"B", b"", quiet=True)  # a peer that has closed its end is done
        with self._lock:
            self._closed = True
            conns = list(self._conns.values())
            self._conns.clear()
            self._drop_first()
        with contextlib.suppress(OSError):
            self._listen.shutdown(socket.SHUT_RDWR)
        self._listen.close()
        for conn in conns:
            conn.close()

    # serving --------------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        served: set[int] = set()
        while len(served) < self._peers and not self._closed:
            left = self._deadline - time.monotonic()
            if left <= 0:
                log.warning("local key channel: %d of %d local ranks did not ask for the key",
                            self._peers - len(served), self._peers)
                break
            try:
                self._listen.settimeout(min(left, 1.0))
                conn, _ = self._listen.accept()
            except TimeoutError:
                continue
            except OSError:
                break  # closed
            try:
                conn.settimeout(10.0)
                check_sibling(conn)
                header = _recv_header(conn)
                if header is None or header != (b"H", 4):
                    raise ConnectionError("local key channel: no hello")
                (rank,) = struct.unpack(">I", _recv_body(conn, 4))
                if rank == 0 or rank in served:
                    raise PermissionError(f"local key channel: local rank {rank} again")
                conn.settimeout(None)
            except (OSError, ConnectionError) as exc:
                log.warning("%s; connection refused", exc)
                conn.close()
                continue
            served.add(rank)
            with self._lock:
                first = self._first
                if first is None:
                    self._conns[rank] = conn
                    continue
            self._serve(rank, conn)
        with self._lock:
            self._drop_first()  # every peer has it (or will not come): no copy stays here

    def _serve(self, rank: int, conn: socket.socket) -> None:
        with self._lock:
            first = self._first
            if first is None or not first.alive:
                conn.close()
                return
            try:
                with first.view() as frame:
                    conn.sendall(frame)
            except OSError as exc:
                log.warning("local key channel: local rank %d: %s", rank, exc)
                conn.close()
                return
            self._conns[rank] = conn
            if len(self._conns) >= self._peers:
                self._drop_first()
                self._all_served.set()

    def _drop_first(self) -> None:
        if self._first is not None:
            self._first.zeroize()

    def _broadcast(self, kind: bytes, body: bytes, *, quiet: bool = False) -> None:
        with self._lock:
            conns = list(self._conns.items()) if self._ready.is_set() else []
        for rank, conn in conns:
            try:
                _send(conn, kind, body)
            except OSError as exc:
                if not quiet:
                    log.warning("local key channel: local rank %d gone (%s)", rank, exc)


@dataclass(slots=True)
class KeyFromHolder:
    dek: SecretBuffer
    lease_expiry: float | None
    key_version: int
    manifest: str
    channel: socket.socket


def receive_key(name: bytes, *, local_rank: int, wait_s: float = 600.0) -> KeyFromHolder:
    """A peer's side: connect to local rank 0 (waiting for it to listen), check it, and read
    the key, or raise :class:`HolderFailed` with what rank 0 met instead."""
    deadline = time.monotonic() + wait_s
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(name)
            break
        except (ConnectionRefusedError, FileNotFoundError):
            sock.close()
            if time.monotonic() > deadline:
                raise HolderFailed("x", f"local rank 0 did not open the local key channel in "
                                        f"{wait_s:.0f} s") from None
            time.sleep(0.005)
    try:
        check_sibling(sock)
        sock.settimeout(max(1.0, deadline - time.monotonic()))
        _send(sock, b"H", struct.pack(">I", local_rank))
        header = _recv_header(sock)
        if header is None:
            raise HolderFailed("x", "local rank 0 closed the local key channel before the key")
        kind, size = header
        if kind == b"E":
            raise _error(_recv_body(sock, size))
        if kind != b"K" or size < 2 + MIN_DEK + 14:
            raise ConnectionError("local key channel: unexpected first frame")
        with SecretBuffer(size) as body, body.view() as view:
            if not _recv_exact(sock, view):
                raise ConnectionError("local key channel: truncated frame")
            (n,) = struct.unpack(">H", view[:2])
            if not MIN_DEK <= n <= MAX_DEK or 2 + n + 14 > size:
                raise ConnectionError("local key channel: malformed key frame")
            dek = SecretBuffer.from_bytes(view[2:2 + n])
            expiry_ms, key_version, m = struct.unpack(">QIH", view[2 + n:2 + n + 14])
            if 2 + n + 14 + m != size:
                dek.zeroize()
                raise ConnectionError("local key channel: malformed key frame")
            manifest = bytes(view[2 + n + 14:]).decode()
        sock.settimeout(None)
    except (OSError, ConnectionError, UnicodeDecodeError, struct.error) as exc:
        sock.close()
        raise HolderFailed("x", f"local key channel: {exc}") from None
    except HolderFailed:
        sock.close()
        raise
    return KeyFromHolder(dek, expiry_ms / 1000.0 if expiry_ms else None, key_version, manifest,
                         sock)


def _error(body: bytes) -> HolderFailed:
    try:
        kind = body[:1].decode()
        pos = 1
        texts: list[str] = []
        while pos < len(body):
            (n,) = struct.unpack(">H", body[pos:pos + 2])
            texts.append(body[pos + 2:pos + 2 + n].decode())
            pos += 2 + n
        message, reasons = texts[0], tuple(texts[1:])
    except (IndexError, UnicodeDecodeError, struct.error):
        return HolderFailed("x", "local rank 0 failed (its error did not decode)")
    return HolderFailed(kind, message, reasons)


class PeerWatcher:
    """A peer's thread: apply what rank 0 forwards to this rank's handle.

    ``on_lease(expiry, problem)`` for each renewal, ``on_revoked(reason)`` for a revocation,
    ``on_gone(reason)`` for a channel that ends without goodbye (rank 0 is gone, and with it
    every renewal and revocation this rank would learn of: the caller ends the key's use).
    """

    def __init__(self, channel: socket.socket, *, on_lease: Callable[[float, str], None],
                 on_revoked: Callable[[str], None], on_gone: Callable[[str], None]) -> None:
        self._sock = channel
        self._on_lease = on_lease
        self._on_revoked = on_revoked
        self._on_gone = on_gone
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="trainer-local-lease",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while True:
                header = _recv_header(self._sock)
                if header is None:
                    raise ConnectionError("closed without goodbye")
                kind, size = header
                body = _recv_body(self._sock, size)
                if kind == b"L" and size >= 8:
                    (ms,) = struct.unpack(">Q", body[:8])
                    self._on_lease(ms / 1000.0, body[8:].decode(errors="replace"))
                elif kind == b"R":
                    self._on_revoked(body.decode(errors="replace"))
                    return
                elif kind == b"B":
                    return
                else:
                    raise ConnectionError(f"unexpected frame {kind!r}")
        except (OSError, ConnectionError) as exc:
            if not self._stopping:
                self._on_gone(f"local rank 0, which holds this node's leases, is gone "
                                 f"(local key channel: {exc})")
        finally:
            with contextlib.suppress(OSError):
                self._sock.close()

    def close(self) -> None:
        self._stopping = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
