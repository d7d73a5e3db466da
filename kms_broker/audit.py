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
returns. Group commit: records are written under one lock, then one fdatasync covers every
record written so far, so concurrent appends share a sync instead of queueing for one each.
The file is opened per write and per sync (cheap), so swapping it for a directory breaks the
log at once and putting it back recovers it; the in-memory head moves only after a successful
write.

:func:`verify_log` recomputes the chain and names the first bad record: edited (hash
mismatch), deleted or reordered (sequence gap or wrong ``prev``), or a bad checkpoint
signature.
"""

from __future__ import annotations

import hashlib
import json
import os
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


def _last_line(path: Path) -> str | None:
    with path.open("rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - 2 * MAX_LINE))
        lines = f.read().splitlines()
    return lines[-1].decode() if lines else None


class AuditLog:
    """Thread-safe appender. ``sign`` is the HSM signing function (for checkpoints)."""

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
        self._synced = 0  # every record up to here is on disk
        self._attempted = 0  # a sync has been started for every record up to here
        self._failed: list[tuple[int, int, str]] = []  # (first, last, why) of failed syncs
        self._closed = False
        self._syncer: threading.Thread | None = None
        if not self.path.exists():
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.close(fd)
        last = _last_line(self.path)
        if last is None:
            self._seq, self._head = 0, GENESIS
        else:
            rec = json.loads(last)
            self._seq, self._head = int(rec["seq"]), str(rec["hash"])
        self._synced = self._attempted = self._seq
        self._since_checkpoint = 0

    @property
    def head(self) -> tuple[int, str]:
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
        before the audited result leaves the process (lets the sync overlap the HSM call)."""
        with self._lock:
            seq = self._write(event, actor, subject, outcome, reason[:1000], None)
            self._since_checkpoint += 1
            if self._sign is not None and self._since_checkpoint >= self._every:
                try:
                    sig = self._sign(checkpoint_message(self._head, self._seq + 1)).hex()
                    self._write("checkpoint", "broker", f"seq:{self._seq}", "ok", "", sig)
                    self._since_checkpoint = 0
                except Exception:  # noqa: S110 - a missed checkpoint is retried on the next append
                    pass
        return seq

    def checkpoint(self) -> None:
        """Append a signed checkpoint now (for example at shutdown) and wait for the disk."""
        if self._sign is None:
            return
        with self._lock:
            sig = self._sign(checkpoint_message(self._head, self._seq + 1)).hex()
            seq = self._write("checkpoint", "broker", f"seq:{self._seq}", "ok", "", sig)
            self._since_checkpoint = 0
        self.wait_durable(seq)

    def wait_durable(self, seq: int) -> None:
        """Return once record ``seq`` is on disk; ``Unavailable`` if its sync failed.

        One background thread syncs everything written so far with one fdatasync (group
        commit), so concurrent appends share a sync and a sync overlaps the caller's work.
        """
        with self._cond:
            if self._syncer is None:
                self._syncer = threading.Thread(target=self._sync_loop, daemon=True,
                                                 name="audit-sync")
                self._syncer.start()
            self._cond.notify_all()
            while True:
                for first, last, why in self._failed:
                    if first <= seq <= last:
                        raise Unavailable(f"audit log unavailable: {why}")
                if self._synced >= seq:
                    return
                if self._closed:
                    raise Unavailable("audit log closed")
                self._cond.wait()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._syncer is not None:
            self._syncer.join(timeout=5)

    def _sync_loop(self) -> None:
        while True:
            with self._cond:
                while not self._closed and self._seq <= self._attempted:
                    self._cond.wait()
                if self._closed:
                    return
                first, target = self._attempted + 1, self._seq
                self._attempted = target
            try:
                fd = os.open(self.path, os.O_RDONLY)
                try:
                    os.fdatasync(fd)
                finally:
                    os.close(fd)
                error = None
            except OSError as exc:
                error = exc.strerror or str(exc)
            with self._cond:
                if error is None:
                    self._synced = max(self._synced, target)
                else:
                    self._failed = [*self._failed[-63:], (first, target, error)]
                self._cond.notify_all()

    def _write(
        self, event: str, actor: str, subject: str, outcome: str, reason: str, sig: str | None
    ) -> int:
        seq = self._seq + 1
        body = {
            "seq": seq, "time_ms": self._now_ms(), "prev": self._head, "event": event,
            "actor": actor, "subject": subject, "outcome": outcome, "reason": reason,
        }
        if sig is not None:
            body["sig"] = sig
        digest = _record_hash(self._head, body)
        line = canonical_json({**body, "hash": digest}) + b"\n"
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
            try:
                if os.write(fd, line) != len(line):
                    raise OSError("short write")
            finally:
                os.close(fd)
        except OSError as exc:
            raise Unavailable(f"audit log unavailable: {exc.strerror or exc}") from None
        self._seq, self._head = seq, digest
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
