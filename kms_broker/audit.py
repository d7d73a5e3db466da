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
mismatch), deleted or reordered (sequence gap or wrong ``prev``), or a bad checkpoint
signature.
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

__all__ = ["AuditLog", "AuditVerification", "checkpoint_message", "tail_log", "verify_log"]

GENESIS = "0" * 64
MAX_LINE = 16384
FIELDS = ("seq", "time_ms", "prev", "event", "actor", "subject", "outcome", "reason")


def checkpoint_message(prev_hex: str, seq: int) -> bytes:
    return b"kmsbroker/v1/audit-checkpoint\x00" + bytes.fromhex(prev_hex) + struct.pack(">Q", seq)


def _record_hash(prev_hex: str, body: dict) -> str:
    return hashlib.sha256(bytes.fromhex(prev_hex) + canonical_json(body)).hexdigest()


def _read_head(fd: int, size: int) -> tuple[int, str]:
    """(seq, hash) of the last record of the open log ``fd`` whose size is ``size``.

    ``Unavailable`` unless the file ends with one whole, self-consistent record: a partial
    line (a writer died mid-write), garbage or an edited last record is never chained onto.
    """
    if size == 0:
        return 0, GENESIS
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
    return seq, stored


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
    ) -> None:
        self.path = Path(path)
        self._now_ms = now_ms
        self._sign = sign
        self._every = checkpoint_every
        self._lock = threading.Lock()
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
        """Append a signed checkpoint now (for example at shutdown) and wait for the disk."""
        if self._sign is None:
            return
        with self._lock, self._appending() as fd:
            seq = self._emit_checkpoint(fd)
        self.wait_durable(seq)

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
            fd = os.open(self.path, os.O_RDONLY)
            try:
                os.fdatasync(fd)
            finally:
                os.close(fd)
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
        seq, head = _read_head(fd, st.st_size)
        if seq < self._seq:
            raise Unavailable(
                f"audit log unavailable: it went back to record {seq} after record {self._seq}"
            )
        self._seq, self._head, self._end = seq, head, end

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
        self._written = seq
        return seq


@dataclass(frozen=True, slots=True)
class AuditVerification:
    ok: bool
    records: int
    first_bad_seq: int  # 0 when ok
    problem: str


def _lines(path: Path) -> Iterator[bytes]:
    with Path(path).open("rb") as f:
        yield from f


def verify_log(path: Path, public_key_sec1: bytes | None = None) -> AuditVerification:
    """Recompute the whole chain; name the first bad record (its expected position)."""
    key = (
        ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), public_key_sec1)
        if public_key_sec1
        else None
    )
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
    tail = (f"; last signed checkpoint at record {sealed_at}, {count - sealed_at} record(s) "
            f"after it (deleting records from the end is only evident up to it)"
            if key is not None else "")
    return AuditVerification(True, count, 0, f"{count} records, chain intact{tail}")


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
