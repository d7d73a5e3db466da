"""Local ranks share one TPM quote (a group commit over a lock file).

Where every torchrun rank on a node attests for itself (``AttestedKeySource(share_local_key=
False)``, or several jobs on one TPM; by default local rank 0 attests for the node and hands
the key to its local peers, :mod:`trainer.local_keys`), each needs evidence bound to its own
sessions (one per broker). A TPM runs one command at a
time and measuring resets and extends one PCR, so ranks took turns: n ranks x m brokers made
n x m quotes in a row. Here one quote serves every rank that is waiting: its report data is
:func:`attest.interface.combined_report_data` over every waiting rank's items (each item one
session's expected report data), and each rank sends that list with the evidence
(``AttestRequest.report_data_set``), so each broker still checks its own fresh nonce and
one-time key. The other ranks' items are opaque SHA-256 values.

Protocol, in a private directory per (TPM, job, interpreter) (mode 0700, owned by this user;
anything else is refused)::

    1. write req-<id> (the rank's items, n x 32 bytes) atomically (write, then rename)
    2. take flock(lock); holding it:
       a. resp-<id> exists: another rank quoted for us; read it, remove it, done
       b. else lead: wait until ``expected`` requests are pending, but no longer than one
          quote takes (the last quote's duration, in quote-seconds; at most ``gather_s``),
          take the pending requests (own items first, at most MAX_REPORT_DATA_SET items),
          quote once over the combined report data, write resp-<id> for every other rank
          (with ``expected`` 1, the usual case of one attesting rank per node, the leader
          waits for nobody and neither reads nor writes quote-seconds)
    3. release the lock

Why wait at most one quote: a rank arriving ``d`` seconds after the leader gets its evidence at
``d + Q`` if the leader waits for it, and at ``2Q`` if the leader quotes at once and the rank
quotes next; waiting wins only while ``d < Q``.

A leader that fails puts the requests it took back, so their ranks lead the next round; a
leader killed mid-quote leaves its followers without a response, so each leads in turn with
its own items (it keeps them in memory). The wait in 2b only decides how many ranks share a
quote, never whether a rank gets one. Ranks of another job or interpreter use another
directory, so a quote never carries another job's measured claims.

What sharing does not change: each broker still sees evidence over its own fresh nonce and the
rank's own one-time key (inside the combined value), and still verifies and audits every rank
on its own. A process of the same user could add items to a batch, but that process can open
the TPM and quote whatever it measures into PCR 23 anyway (DESIGN.md section 6: on a TPM-only
node, trust reaches as far as the boot PCRs), so the batch directory adds no power.

Response file, byte by byte: ``b"KBQ1"`` || BE16 len(kind) || kind (UTF-8) || BE16 n ||
n x 32-byte items || BE32 len(payload) || payload; every length checked against its maximum.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import secrets
import stat
import struct
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from attest.interface import MAX_REPORT_DATA_SET, combined_report_data
from kms_broker.client import SharedEvidence

__all__ = ["GATHER_S", "QuoteBatcher", "batch_directory"]

GATHER_S = 0.25  # the longest a leader waits for the other local ranks before it quotes
FIRST_QUOTE_S = 0.05  # what a quote is taken to cost before one has been timed here
MAX_PAYLOAD = 1 << 20
MAX_KIND = 64
ITEM = 32
STALE_S = 600.0
_MAGIC = b"KBQ1"

Quote = Callable[[bytes], tuple[str, bytes]]


def batch_directory(tcti: str, job_id: str) -> Path:
    """The private directory where ranks of this job on this TPM meet."""
    tag = hashlib.sha256("\0".join((tcti, job_id, sys.executable, sys.prefix)).encode())
    return Path(tempfile.gettempdir()) / f"trainer-tpm-{tag.hexdigest()[:20]}"


def _private_dir(path: Path) -> Path:
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise RuntimeError(f"{path} is not a private directory of this user; remove it")
    return path


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    tmp.rename(path)


def _encode(evidence: SharedEvidence) -> bytes:
    kind = evidence.kind.encode()
    items = evidence.report_data_set
    return b"".join((_MAGIC, struct.pack(">H", len(kind)), kind, struct.pack(">H", len(items)),
                     *items, struct.pack(">I", len(evidence.payload)), evidence.payload))


def _decode(data: bytes) -> SharedEvidence:
    def take(n: int) -> bytes:
        nonlocal pos
        if pos + n > len(data):
            raise ValueError("truncated quote response")
        pos += n
        return data[pos - n:pos]

    pos = 0
    if take(4) != _MAGIC:
        raise ValueError("not a quote response")
    (kind_len,) = struct.unpack(">H", take(2))
    if kind_len > MAX_KIND:
        raise ValueError("quote response kind too long")
    kind = take(kind_len).decode()
    (count,) = struct.unpack(">H", take(2))
    if not 1 <= count <= MAX_REPORT_DATA_SET:
        raise ValueError("quote response item count out of range")
    items = tuple(take(ITEM) for _ in range(count))
    (size,) = struct.unpack(">I", take(4))
    if size > MAX_PAYLOAD:
        raise ValueError("quote response payload too large")
    payload = take(size)
    if pos != len(data):
        raise ValueError("trailing bytes in quote response")
    return SharedEvidence(kind, payload, items)


class QuoteBatcher:
    """``batcher(items) -> SharedEvidence`` for :class:`kms_broker.client.KeyClient`
    (``evidence_for_set``); ``quote(report_data) -> (kind, payload)`` makes the evidence."""

    def __init__(self, directory: Path, quote: Quote, *, expected: int = 1,
                 gather_s: float = GATHER_S, wait_at_most_one_quote: bool = True) -> None:
        """``wait_at_most_one_quote=False``: a leader waits for ``expected`` ranks up to
        ``gather_s`` whatever a quote costs (tests use it to make sharing certain)."""
        self._dir = Path(directory)
        self._quote = quote
        self._expected = max(1, expected)
        self._gather_s = gather_s
        self._cap = wait_at_most_one_quote
        self.quotes_made = 0  # by this process, as leader
        self.quotes_shared = 0  # received from another rank

    def __call__(self, items: Sequence[bytes]) -> SharedEvidence:
        items = tuple(bytes(i) for i in items)
        if not 1 <= len(items) <= MAX_REPORT_DATA_SET or any(len(i) != ITEM for i in items):
            raise ValueError(f"1 to {MAX_REPORT_DATA_SET} items of {ITEM} bytes each")
        directory = _private_dir(self._dir)
        me = secrets.token_hex(8)
        request = directory / f"req-{me}"
        _write_atomic(request, b"".join(items))
        try:
            with open(directory / "lock", "a+b") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                try:
                    return self._locked(directory, me, items)
                finally:
                    fcntl.flock(lock, fcntl.LOCK_UN)
        finally:
            request.unlink(missing_ok=True)

    def _pending(self, directory: Path, me: str) -> list[Path]:
        return sorted(p for p in directory.glob("req-*")
                      if not p.name.endswith(".tmp") and p.name != f"req-{me}")

    def _locked(self, directory: Path, me: str, items: tuple[bytes, ...]) -> SharedEvidence:
        response = directory / f"resp-{me}"
        if response.exists():
            try:
                evidence = _decode(response.read_bytes())
            finally:
                response.unlink(missing_ok=True)
            if not set(items) <= set(evidence.report_data_set):
                raise RuntimeError("a shared quote does not cover this rank's sessions")
            self.quotes_shared += 1
            return evidence
        (directory / f"req-{me}").unlink(missing_ok=True)
        if self._expected > 1:  # a lone rank waits for nobody (and reads no quote-seconds)
            deadline = time.monotonic() + self.wait_s(directory)
            while (len(self._pending(directory, me)) < self._expected - 1
                   and time.monotonic() < deadline):
                time.sleep(0.002)
        taken: dict[str, bytes] = {}
        room = MAX_REPORT_DATA_SET - len(items)
        for path in self._pending(directory, me):
            with contextlib.suppress(FileNotFoundError):
                data = path.read_bytes()
                if data and len(data) % ITEM == 0 and len(data) // ITEM <= room:
                    taken[path.name.removeprefix("req-")] = data
                    room -= len(data) // ITEM
                    path.unlink()
        every = list(items)
        for data in taken.values():
            every += [data[i:i + ITEM] for i in range(0, len(data), ITEM)]
        started = time.monotonic()
        try:
            if len(every) == 1:
                kind, payload = self._quote(every[0])
                evidence = SharedEvidence(kind, payload, ())
            else:
                kind, payload = self._quote(combined_report_data(every))
                evidence = SharedEvidence(kind, payload, tuple(every))
        except BaseException:
            for other, data in taken.items():  # they lead the next round instead
                _write_atomic(directory / f"req-{other}", data)
            raise
        self.quotes_made += 1
        if self._expected > 1:  # only leaders that wait read it (every rank of a job has the
            # same expected count); a lone rank saves the write and its rename
            _write_atomic(directory / "quote-seconds",
                          f"{time.monotonic() - started:.6f}".encode())
        if taken:
            shared = _encode(SharedEvidence(kind, payload, tuple(every)))
            for other in taken:
                _write_atomic(directory / f"resp-{other}", shared)
        self._sweep(directory)
        return evidence

    def wait_s(self, directory: Path) -> float:
        """How long a leader waits for the other ranks' requests."""
        if not self._cap:
            return self._gather_s
        return min(self._gather_s, self._quote_seconds(directory))

    @staticmethod
    def _quote_seconds(directory: Path) -> float:
        try:
            value = float((directory / "quote-seconds").read_text())
        except (OSError, ValueError):
            return FIRST_QUOTE_S
        return value if 0 <= value < 60 else FIRST_QUOTE_S

    @staticmethod
    def _sweep(directory: Path) -> None:
        """Remove responses nobody collected (their rank died)."""
        now = time.time()
        for path in directory.glob("resp-*"):
            with contextlib.suppress(FileNotFoundError):
                if now - path.stat().st_mtime > STALE_S:
                    path.unlink()
