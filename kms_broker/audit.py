"""Append-only, hash-chained audit log (DESIGN.md section 9, property 6).

File format: UTF-8 text, one record per line (JSON Lines). A record is a canonical JSON
object (:mod:`kms_broker.encoding`) with these fields::

    seq      int   1, 2, 3, ... without gaps
    time_ms  int   unix milliseconds
    prev     str   hex SHA-256 of the previous record (64 zeros for the first)
    event    str   "attest", "release", "renew", "register_tenant", "checkpoint", ...
    actor    str   who asked ("node:n1", "tenant:acme", "operator:ops", "broker")
    subject  str   what it was about ("dataset:acme/ds1", "session:...")
    outcome  str   "allowed" | "denied" | "error" | "ok"
    reason   str   readable, never secret
    sig      str   (checkpoints only) hex ECDSA signature by the broker's HSM key over
                   b"kmsbroker/v1/audit-checkpoint\\x00" || prev (32 bytes) || BE64 seq
    hash     str   hex SHA-256(prev (32 raw bytes) || canonical JSON of the other fields)

Fail closed: :meth:`AuditLog.append` returns only once its record is on disk (fdatasync) and
raises ``Unavailable`` if any step fails; callers perform the audited action only after it
returns. Group commit: records are written under one lock, then one fdatasync, run by the
first waiting caller, covers every record written so far, so concurrent appends share a sync
instead of queueing for one each (and no sync thread costs a hand-off per record).
The file is opened per write and per sync (cheap), so swapping it for a directory breaks the
log at once and putting it back recovers it; the in-memory head moves only after a successful
write.

Safe across processes (``kms-broker serve --workers N``) as well as threads: every write
opens the file O_APPEND and takes an exclusive ``flock`` on that descriptor (closing it
releases the lock), so writers in all processes, and several :class:`AuditLog` instances in
one process, take turns. Under the lock ``fstat`` tells whether anyone else appended since
this instance's last write (size, inode and device differ from what it remembers); if so it
re-reads the last line of the file to pick up the current head (seq and hash) before chaining
the new record onto it. The tail re-read is strict: a partial or unparseable last line, a last
record whose hash does not match its content, or a log that went backwards (fewer records
than this instance already saw) makes the write fail closed with ``Unavailable`` and write
nothing; nothing is ever chained onto garbage. Checkpoints are signed under the same lock, so
their ``prev`` is the real head. Each instance counts its own records towards its next
checkpoint and group-commits its own writes (an fdatasync covers the whole file, so it covers
this instance's earlier writes too).

:func:`verify_log` recomputes the chain and names the first bad record: edited (hash
mismatch), deleted or reordered (sequence gap or wrong ``prev``), a bad checkpoint
signature, or (given an anchor) records deleted from the end. Without the broker's public
key it checks only that the chain is intact, and says so (:attr:`AuditVerification.
authenticated` is false): anyone can write a fresh, fully re-chained log.

Anchoring the head (truncation). A hash chain cannot show that records were cut from its
end. So the head is anchored outside the log: :meth:`AuditLog.seal` writes a signed
checkpoint (when anything was written since the last one), fdatasyncs the log and then
stores the head (seq, record hash) as the anchor, under an exclusive ``flock`` on the sidecar
file ``audit.log.anchoring`` so workers take turns and the anchor never moves back; only the
checkpoint line is written under the log's own lock, so appends do not wait for the anchor.
The broker calls it every ``audit_checkpoint_s`` seconds (default 2, :class:`Checkpointer`)
and at clean shutdown. The anchor is kept in two places (``kms_broker.app`` wires them):

- the HSM token (data object ``ctrain/audit-anchor``, ``Hsm.set_audit_anchor``): the
  authoritative copy. Writing it needs the token PIN, which the log's attacker (who can edit
  files) does not have; at start the broker refuses a log that ends before the anchored
  record or whose anchored record differs (:func:`check_anchor`, ``AuditTruncated`` naming
  both), and ``VerifyAudit`` checks against it;
- ``audit.anchor`` beside the log, signed by the broker's HSM key, for offline
  ``kms-broker audit verify --state-dir``. It can be deleted or replaced by an older signed
  copy with the log; offline verification with ``--public-key`` then reports the anchor
  missing, or detects only what the older anchor covers.

What remains undetected: records written after the last anchor, that is within the last
``audit_checkpoint_s`` before a crash (kill -9, power loss), can be deleted from the end of
the log while the broker is down. A clean shutdown anchors the final record, so nothing is
left open then. While the broker runs, a log that goes backwards is noticed at the next
write or seal (fail closed, ``Unavailable``), and the highest head this broker saw is
anchored even then, so a restart refuses the shortened log too. A SoftHSM token is files on
the same host: an attacker with root can roll the token back as well (a hardware HSM
cannot be).

Anchor file ``audit.anchor`` (canonical JSON)::

    {"hash": hex SHA-256 of record seq, "seq": int,
     "sig": hex DER ECDSA P-256 over b"kmsbroker/v1/audit-anchor\x00" || BE64 seq || hash}
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import stat
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from kms_broker.domain.errors import Unavailable
from kms_broker.encoding import canonical_json

__all__ = [
    "Anchor",
    "AuditLog",
    "AuditTruncated",
    "AuditVerification",
    "Checkpointer",
    "anchor_message",
    "check_anchor",
    "checkpoint_message",
    "read_anchor_file",
    "tail_log",
    "verify_log",
    "write_anchor_file",
]

GENESIS = "0" * 64
MAX_LINE = 16384
FIELDS = ("seq", "time_ms", "prev", "event", "actor", "subject", "outcome", "reason")


def checkpoint_message(prev_hex: str, seq: int) -> bytes:
    return b"kmsbroker/v1/audit-checkpoint\x00" + bytes.fromhex(prev_hex) + struct.pack(">Q", seq)


def anchor_message(seq: int, hash_hex: str) -> bytes:
    return b"kmsbroker/v1/audit-anchor\x00" + struct.pack(">Q", seq) + bytes.fromhex(hash_hex)


class AuditTruncated(ValueError):
    """The log ends before its anchored record, or that record differs: records were cut."""


@dataclass(frozen=True, slots=True)
class Anchor:
    seq: int
    hash: str  # hex SHA-256 of record ``seq``
    sig: bytes = b""  # by the broker's key over anchor_message (files only)


def write_anchor_file(path: Path, anchor: Anchor) -> None:
    """Replace ``path`` atomically and durably (temp file, fsync, rename, fsync dir)."""
    path = Path(path)
    data = canonical_json({"seq": anchor.seq, "hash": anchor.hash, "sig": anchor.sig.hex()})
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def read_anchor_file(path: Path) -> Anchor | None:
    """The anchor in ``path``; None when there is none; ``ValueError`` when malformed."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        return None
    try:
        doc = json.loads(raw)
        seq, digest, sig = doc["seq"], doc["hash"], bytes.fromhex(doc["sig"])
        if type(seq) is not int or seq < 0 or len(bytes.fromhex(digest)) != 32:
            raise ValueError("bad field")
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ValueError(f"audit anchor file {path} is malformed") from None
    return Anchor(seq, digest, sig)


def check_anchor(path: Path, anchor: Anchor) -> str | None:
    """What is wrong with the log at ``path`` given its anchor, or None if it holds the
    anchored record unchanged (only the anchored record is looked at; :func:`verify_log`
    checks the chain)."""
    if anchor.seq == 0:
        return None
    count = 0
    for count, raw in enumerate(_lines(path), start=1):
        if count == anchor.seq:
            try:
                stored = json.loads(raw).get("hash")
            except (ValueError, AttributeError):
                stored = None
            if stored != anchor.hash:
                return (f"record {anchor.seq} is not the record anchored there (hash "
                        f"{anchor.hash[:16]}...): the log was rewritten from there")
            return None
    return (f"the log ends at record {count} but record {anchor.seq} was anchored: "
            f"records {count + 1}..{anchor.seq} (at least) were deleted from its end")


def _record_hash(prev_hex: str, body: dict) -> str:
    return hashlib.sha256(bytes.fromhex(prev_hex) + canonical_json(body)).hexdigest()


def _read_head(fd: int, size: int) -> tuple[int, str, bool]:
    """(seq, hash, is it a checkpoint) of the last record of the open log ``fd`` of ``size``.

    ``Unavailable`` unless the file ends with one whole, self-consistent record: a partial
    line (a writer died mid-write), garbage or an edited last record is never chained onto.
    """
    if size == 0:
        return 0, GENESIS, False
    start = max(0, size - 2 * MAX_LINE)
    data = os.pread(fd, size - start, start)
    if len(data) != size - start or not data.endswith(b"\n"):
        raise Unavailable("audit log unavailable: it ends with a partial record")
    line = data[:-1].rsplit(b"\n", 1)[-1]
    try:
        rec = json.loads(line)
        stored = rec.pop("hash")
        seq = rec["seq"]
        if type(seq) is not int or seq < 1 or _record_hash(rec["prev"], rec) != stored:
            raise ValueError("inconsistent record")
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        raise Unavailable(
            "audit log unavailable: its last line is not a valid audit record"
        ) from None
    return seq, stored, rec.get("event") == "checkpoint"


class AuditLog:
    """Thread- and process-safe appender (see the module docstring); one per process is
    enough, several on one file also work. ``sign`` is the HSM signing function (for
    checkpoints)."""

    def __init__(
        self,
        path: Path,
        *,
        now_ms: Callable[[], int],
        sign: Callable[[bytes], bytes] | None = None,
        checkpoint_every: int = 64,
        anchor: Callable[[int, str], None] | None = None,
    ) -> None:
        self.path = Path(path)
        self._now_ms = now_ms
        self._sign = sign
        self._anchor = anchor
        self._anchored = -1  # last seq this instance anchored
        self._at_checkpoint = False  # the last record in the file is a checkpoint
        self._every = checkpoint_every
        self._lock = threading.Lock()
        self._sealing = threading.Lock()  # one seal at a time in this instance (see seal)
        self._anchoring_path = self.path.with_name(self.path.name + ".anchoring")
        self._cond = threading.Condition()
        self._synced = 0  # every record of this instance up to here is on disk
        self._attempted = 0  # a sync has been started for every own record up to here
        self._failed: list[tuple[int, int, str]] = []  # (first, last, why) of failed syncs
        self._closed = False
        self._syncing = False  # a caller of wait_durable is running the fdatasync
        # Chain head as last seen in the file, and the file's (size, inode, device) right after
        # this instance last wrote or read it: anything else under the lock means another
        # writer appended (or the file was swapped), so the head is re-read from the file.
        self._seq, self._head = 0, GENESIS
        self._end: tuple[int, int, int] = (-1, 0, 0)
        if not self.path.exists():
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                os.close(fd)
            except FileExistsError:  # another worker created it first
                pass
        try:
            self._reread()
        except OSError as exc:
            raise Unavailable(f"audit log unavailable: {exc.strerror or exc}") from None
        # The sync loop works on this instance's own records: other processes advance _seq.
        self._written = self._seq  # seq of this instance's last successful write
        self._synced = self._attempted = self._written
        self._since_checkpoint = 0

    @property
    def head(self) -> tuple[int, str]:
        """(seq, hash) of the last record in the file, including other writers' records.

        One ``stat`` when nothing changed; the tail is re-read (under a shared lock) only when
        the file did. If the file cannot be read the last head this instance saw is returned.
        """
        with self._lock:
            try:
                st = os.stat(self.path)
                if (st.st_size, st.st_ino, st.st_dev) != self._end and stat.S_ISREG(st.st_mode):
                    self._reread()
            except (OSError, Unavailable):
                pass
            return self._seq, self._head

    def append(
        self, event: str, *, actor: str, subject: str, outcome: str, reason: str = ""
    ) -> int:
        """Write one record durably; raise ``Unavailable`` (and change nothing) on failure."""
        seq = self.write(event, actor=actor, subject=subject, outcome=outcome, reason=reason)
        self.wait_durable(seq)
        return seq

    def write(
        self, event: str, *, actor: str, subject: str, outcome: str, reason: str = ""
    ) -> int:
        """Write one record without waiting for the disk; pair with :meth:`wait_durable`
        before the audited result leaves the process (so one sync can cover the records of
        several concurrent callers)."""
        with self._lock, self._appending() as fd:
            seq = self._emit(fd, event, actor, subject, outcome, reason[:1000], None)
            self._since_checkpoint += 1
            if self._sign is not None and self._since_checkpoint >= self._every:
                with contextlib.suppress(Exception):  # a missed one is retried next append
                    self._emit_checkpoint(fd)
        return seq

    def checkpoint(self) -> None:
        """Append a signed checkpoint now (for example at shutdown) and wait for the disk;
        then anchor the head (:meth:`seal`)."""
        if self._sign is None:
            return
        with self._lock, self._appending() as fd:
            seq = self._emit_checkpoint(fd)
        self.wait_durable(seq)
        self.seal()

    def seal(self) -> int:
        """Checkpoint the head if anything was written since the last checkpoint, make the log
        durable and anchor the head. Returns the anchored seq. ``Unavailable`` on failure; if
        the log went backwards, the highest head this instance saw is anchored first, so a
        restart refuses the shortened log.

        Locks: the whole seal holds the anchoring lock (this instance's ``_sealing`` and an
        exclusive ``flock`` on the sidecar ``<log>.anchoring``), so sealers in every process
        take turns and anchors only move forward (each reads the head after the previous one
        stored its anchor, and the log only grows). Only the checkpoint itself is written
        under the log's append lock, so its ``prev`` is the real head; the fdatasync and the
        anchor (an HSM object write, a signature and the anchor file's own syncs: tens of
        milliseconds on a busy disk) run after the append lock is released, so appends in
        every worker go on meanwhile instead of queueing behind the seal."""
        try:
            with self._sealing, self._anchoring():
                with self._lock, self._appending() as fd:
                    if self._sign is not None and self._seq > 0 and not self._at_checkpoint:
                        self._emit_checkpoint(fd)
                    seq, head = self._seq, self._head
                if self._anchor is not None and seq > self._anchored:
                    self._sync_file()  # every record up to seq is on disk before it is anchored
                    self._anchor(seq, head)
                    self._anchored = seq
                return seq
        except Unavailable:
            with self._lock:
                seq, head = self._seq, self._head
            if self._anchor is not None and seq > self._anchored:
                with contextlib.suppress(Exception):  # the HSM may be what is failing
                    self._anchor(seq, head)
            raise

    @contextlib.contextmanager
    def _anchoring(self) -> Iterator[None]:
        """The cross-process anchoring lock (see :meth:`seal`); ``Unavailable`` if the lock
        file cannot be opened or locked."""
        try:
            fd = os.open(self._anchoring_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise Unavailable(f"audit log unavailable: {exc.strerror or exc}") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError as exc:
                raise Unavailable(f"audit log unavailable: {exc.strerror or exc}") from None
            yield
        finally:
            os.close(fd)  # releases the flock

    def _fdatasync(self) -> None:
        """fdatasync the log through a descriptor of its own (``OSError`` on failure)."""
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.fdatasync(fd)
        finally:
            os.close(fd)

    def _sync_file(self) -> None:
        try:
            self._fdatasync()
        except OSError as exc:
            raise Unavailable(f"audit log unavailable: {exc.strerror or exc}") from None

    def wait_durable(self, seq: int) -> None:
        """Return once record ``seq`` is on disk; ``Unavailable`` if its sync failed.

        Group commit without a sync thread: the first caller that finds no sync running
        becomes the leader and runs one fdatasync covering every record this instance has
        written so far; callers that arrive meanwhile wait for it, and the next of them leads
        the following sync. No thread hand-off when there is no contention.
        """
        with self._cond:
            while True:
                for first, last, why in self._failed:
                    if first <= seq <= last:
                        raise Unavailable(f"audit log unavailable: {why}")
                if self._synced >= seq:
                    return
                if self._closed:
                    raise Unavailable("audit log closed")
                if not self._syncing:
                    break
                self._cond.wait()
            # Only this instance's own records are waited for; _written is set after each
            # write returned, so this fdatasync starts after every record up to target.
            self._syncing = True
            first, target = self._attempted + 1, self._written
            self._attempted = target
        error = None
        try:
            self._fdatasync()
        except OSError as exc:
            error = exc.strerror or str(exc)
        with self._cond:
            self._syncing = False
            if error is None:
                self._synced = max(self._synced, target)
            else:
                self._failed = [*self._failed[-63:], (first, target, error)]
            self._cond.notify_all()
            if error is not None and first <= seq <= target:
                raise Unavailable(f"audit log unavailable: {error}")
        if seq > target:  # written by this instance after the sync began: one more round
            self.wait_durable(seq)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _reread(self) -> None:
        """Pick up the file's current head under a shared lock (OSError if unreadable)."""
        fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            self._refresh(fd, os.fstat(fd))
        finally:
            os.close(fd)

    def _refresh(self, fd: int, st: os.stat_result) -> None:
        """Adopt the head of the file open as ``fd`` (locked by the caller) if it changed."""
        end = (st.st_size, st.st_ino, st.st_dev)
        if end == self._end:
            return
        if not stat.S_ISREG(st.st_mode):
            raise Unavailable("audit log unavailable: not a regular file")
        seq, head, at_checkpoint = _read_head(fd, st.st_size)
        if seq < self._seq:
            raise Unavailable(
                f"audit log unavailable: it went back to record {seq} after record {self._seq}"
            )
        self._seq, self._head, self._end = seq, head, end
        self._at_checkpoint = at_checkpoint

    def _open_locked(self) -> int:
        """Open the log for appending, lock it exclusively and catch up with other writers.

        Returns the descriptor; closing it releases the lock. ``Unavailable`` on any failure.
        """
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND)
        except OSError as exc:
            raise Unavailable(f"audit log unavailable: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._refresh(fd, os.fstat(fd))
        except BaseException as exc:
            os.close(fd)
            if isinstance(exc, OSError):
                raise Unavailable(f"audit log unavailable: {exc.strerror or exc}") from None
            raise
        return fd

    @contextlib.contextmanager
    def _appending(self) -> Iterator[int]:
        """The log open for appending and locked (:meth:`_open_locked`); an OSError inside
        becomes ``Unavailable``, and leaving releases the lock."""
        fd = self._open_locked()
        try:
            yield fd
        except OSError as exc:
            raise Unavailable(f"audit log unavailable: {exc.strerror or exc}") from None
        finally:
            os.close(fd)  # releases the flock

    def _emit_checkpoint(self, fd: int) -> int:
        """A checkpoint signed by the HSM over the current head; signed under the file lock,
        so its prev is the real head."""
        assert self._sign is not None
        sig = self._sign(checkpoint_message(self._head, self._seq + 1)).hex()
        seq = self._emit(fd, "checkpoint", "broker", f"seq:{self._seq}", "ok", "", sig)
        self._since_checkpoint = 0
        return seq

    def _emit(
        self, fd: int, event: str, actor: str, subject: str, outcome: str, reason: str,
        sig: str | None,
    ) -> int:
        """Append one record to ``fd`` (from :meth:`_open_locked`); move the head on success."""
        seq = self._seq + 1
        body = {
            "seq": seq, "time_ms": self._now_ms(), "prev": self._head, "event": event,
            "actor": actor, "subject": subject, "outcome": outcome, "reason": reason,
        }
        if sig is not None:
            body["sig"] = sig
        digest = _record_hash(self._head, body)
        line = canonical_json({**body, "hash": digest}) + b"\n"
        size, ino, dev = self._end
        written = os.write(fd, line)
        if written != len(line):
            # Take the partial line back (we hold the lock) so the log stays well formed.
            try:
                if os.fstat(fd).st_size == size + written:
                    os.ftruncate(fd, size)
            except OSError:
                pass
            raise OSError(errno.EIO, "short write")
        self._seq, self._head, self._end = seq, digest, (size + len(line), ino, dev)
        self._at_checkpoint = event == "checkpoint"
        self._written = seq
        return seq


class Checkpointer:
    """Calls :meth:`AuditLog.seal` every ``interval_s`` seconds on a daemon thread (a failed
    seal is reported to ``on_error`` and tried again at the next tick)."""

    def __init__(self, log: AuditLog, interval_s: float,
                 on_error: Callable[[Exception], None] | None = None) -> None:
        if not 0 < interval_s <= 3600:
            raise ValueError("checkpoint interval must be 0-3600 seconds")
        self._log, self._interval, self._on_error = log, interval_s, on_error
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="audit-checkpoints", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._log.seal()
            except Exception as exc:  # reported, retried at the next tick
                if self._on_error is not None:
                    self._on_error(exc)


@dataclass(frozen=True, slots=True)
class AuditVerification:
    ok: bool  # no tampering found (chain, signatures given a key, anchor given one)
    records: int
    first_bad_seq: int  # 0 when ok
    problem: str
    authenticated: bool = False  # checkpoints (and the anchor, if any) checked against a key


def _lines(path: Path) -> Iterator[bytes]:
    """The log's records, one line each: a file, or a source with ``lines()`` (the audit log
    in PostgreSQL, :mod:`kms_broker.audit_pg`)."""
    if hasattr(path, "lines"):
        yield from path.lines()
        return
    with Path(path).open("rb") as f:
        yield from f


def verify_log(
    path: Path, public_key_sec1: bytes | None = None, anchor: Anchor | None = None
) -> AuditVerification:
    """Recompute the whole chain; name the first bad record (its expected position).

    With ``public_key_sec1`` every checkpoint signature is checked (and the anchor's, when
    it carries one); with ``anchor`` the log must still hold the anchored record unchanged
    (no records cut from its end up to the anchor). Without a key the answer says that
    authenticity was not checked."""
    key = (
        ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), public_key_sec1)
        if public_key_sec1
        else None
    )
    if anchor is not None and key is not None and anchor.sig:
        try:
            key.verify(anchor.sig, anchor_message(anchor.seq, anchor.hash),
                       ec.ECDSA(hashes.SHA256()))
        except (InvalidSignature, ValueError):
            return AuditVerification(False, 0, anchor.seq,
                                     "the anchor is not signed by the broker's key")
    prev, count, sealed_at = GENESIS, 0, 0
    for expected, raw in enumerate(_lines(path), start=1):

        def bad(problem: str, at: int = expected, n: int = count) -> AuditVerification:
            return AuditVerification(False, n, at, f"record {at}: {problem}")

        if len(raw) > MAX_LINE:
            return bad("line too long")
        try:
            rec = json.loads(raw)
            if not isinstance(rec, dict):
                raise ValueError("not an object")
            stored_hash = rec.pop("hash")
            seq = rec["seq"]
        except (ValueError, KeyError):
            return bad("not a parseable audit record")
        if seq != expected:
            return bad(f"sequence number is {seq}: a record was deleted or reordered here")
        if rec.get("prev") != prev:
            return bad("prev hash does not match the record before it (deleted or reordered)")
        if any(f not in rec for f in FIELDS):
            return bad("missing fields")
        if _record_hash(prev, rec) != stored_hash:
            return bad("hash does not match its content (edited)")
        if rec["event"] == "checkpoint" and key is not None:
            try:
                key.verify(
                    bytes.fromhex(rec.get("sig", "")),
                    checkpoint_message(prev, seq),
                    ec.ECDSA(hashes.SHA256()),
                )
            except (InvalidSignature, ValueError):
                return bad("checkpoint signature is not the broker's")
            sealed_at = seq
        prev, count = stored_hash, count + 1
    if anchor is not None and (problem := check_anchor(path, anchor)) is not None:
        return AuditVerification(False, count, min(count + 1, anchor.seq), problem)
    text = f"{count} records, chain intact"
    if key is not None:
        text += (f"; last signed checkpoint at record {sealed_at}, {count - sealed_at} "
                 f"record(s) after it")
    if anchor is not None:
        text += (f"; anchored up to record {anchor.seq} (records after it could be cut "
                 f"unnoticed)")
    else:
        text += "; no anchor given: records cut from the end would not be noticed"
    if key is None:
        text += ("; AUTHENTICITY NOT CHECKED (no broker public key): a log rewritten and "
                 "re-chained from its first record would pass this check too")
    return AuditVerification(True, count, 0, text, authenticated=key is not None)


def tail_log(
    path: Path, limit: int, keep: Callable[[dict], bool] | None = None
) -> list[dict]:
    """The last ``limit`` records (those ``keep`` accepts) as dicts, with their hash."""
    out: list[dict] = []
    for raw in _lines(path):
        try:
            rec = json.loads(raw)
        except ValueError:
            rec = {"unparseable": raw[:200].decode(errors="replace")}
        if keep is not None and not keep(rec):
            continue
        out.append(rec)
        if len(out) > limit:
            out.pop(0)
    return out
