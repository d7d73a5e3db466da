"""The audit log stays one intact hash chain when several processes (``serve --workers N``),
several threads in each, and several :class:`AuditLog` instances append to one file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from kms_broker.audit import AuditLog, verify_log
from kms_broker.domain.errors import Unavailable
from kms_broker.hsm.fake import FakeHsm

REPO = Path(__file__).resolve().parents[2]

# One worker process: builds its own AuditLog on the shared path, says "ready", waits for
# "go" on stdin (so all workers append at the same time), appends from several threads,
# optionally seals with a checkpoint, then prints the seqs append() returned per thread.
WORKER = r"""
import json, sys, threading, time
from pathlib import Path
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from kms_broker.audit import AuditLog

path, name, threads, per_thread, every, key_pem, final_checkpoint = sys.argv[1:8]
sign = None
if key_pem:
    key = serialization.load_pem_private_key(bytes.fromhex(key_pem), password=None)
    sign = lambda m: key.sign(m, ec.ECDSA(hashes.SHA256()))
log = AuditLog(Path(path), now_ms=lambda: time.time_ns() // 10**6, sign=sign,
               checkpoint_every=int(every))
print("ready", flush=True)
sys.stdin.readline()
seqs = {}

def work(t):
    mine = seqs.setdefault(t, [])
    for i in range(int(per_thread)):
        mine.append(log.append("release", actor=f"proc:{name}", subject=f"thread:{t}",
                               outcome="ok", reason=f"{name}/{t}/{i}"))

pool = [threading.Thread(target=work, args=(t,)) for t in range(int(threads))]
for th in pool:
    th.start()
for th in pool:
    th.join()
if final_checkpoint == "1":
    log.checkpoint()
log.close()
print(json.dumps(seqs), flush=True)
"""


def _signer() -> tuple[str, bytes]:
    """A P-256 key shared by all workers: (PEM as hex for argv, SEC1 uncompressed public key)."""
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.X962,
                                           serialization.PublicFormat.UncompressedPoint)
    return pem.hex(), public


def _run_workers(path: Path, names: list[str], *, threads: int, per_thread: int,
                 every: int = 64, key_pem: str = "", final_checkpoint: bool = False
                 ) -> dict[str, dict[str, list[int]]]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get(
        "PYTHONPATH", "")])}
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-c", WORKER, str(path), name, str(threads), str(per_thread),
             str(every), key_pem, "1" if final_checkpoint else "0"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, cwd=REPO, env=env)
        for name in names
    }
    try:
        for name, p in procs.items():  # every worker has opened the log: start them together
            assert p.stdout is not None
            line = p.stdout.readline()
            assert line == "ready\n", f"worker {name} failed to start: {p.stderr.read()}"
        for p in procs.values():
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        results = {}
        for name, p in procs.items():
            out, err = p.communicate()
            assert p.returncode == 0, f"worker {name} failed: {err}"
            results[name] = json.loads(out.strip().splitlines()[-1])
        return results
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()


def _records(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_processes_and_threads_append_to_one_intact_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    key_pem, public = _signer()
    names, threads, per_thread = ["w1", "w2", "w3"], 3, 100
    seqs = _run_workers(path, names, threads=threads, per_thread=per_thread, every=50,
                        key_pem=key_pem)

    records = _records(path)
    result = verify_log(path, public)
    assert result.ok, result.problem
    assert result.records == len(records)
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
    releases = [r for r in records if r["event"] == "release"]
    assert len(releases) == len(names) * threads * per_thread
    assert Counter(r["actor"] for r in releases) == {f"proc:{n}": threads * per_thread
                                                     for n in names}
    # every record is present exactly once, and append() returned each record's real seq
    by_seq = {r["seq"]: r for r in records}
    assert len({r["reason"] for r in releases}) == len(releases)
    for name, per in seqs.items():
        for t, got in per.items():
            assert len(got) == per_thread and got == sorted(got)
            for i, seq in enumerate(got):
                rec = by_seq[seq]
                assert (rec["actor"], rec["subject"], rec["reason"]) == (
                    f"proc:{name}", f"thread:{t}", f"{name}/{t}/{i}")
    # each worker counts its own records towards its checkpoints (every 50 of 300)
    checkpoints = [r for r in records if r["event"] == "checkpoint"]
    assert len(checkpoints) == len(names) * (threads * per_thread // 50)


def test_checkpoints_from_two_processes_verify(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    key_pem, public = _signer()
    _run_workers(path, ["a", "b"], threads=2, per_thread=60, every=7, key_pem=key_pem,
                 final_checkpoint=True)

    records = _records(path)
    checkpoints = [r for r in records if r["event"] == "checkpoint"]
    assert len(checkpoints) >= 2 * (120 // 7) + 2  # periodic ones plus each final one
    for cp in checkpoints:  # each seals the record right before it
        assert cp["subject"] == f"seq:{cp['seq'] - 1}"
        assert cp["prev"] == records[cp["seq"] - 2]["hash"]
    assert records[-1]["event"] == "checkpoint"  # each worker's last write is a checkpoint
    result = verify_log(path, public)
    assert result.ok and "0 record(s) after it" in result.problem
    other = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    assert verify_log(path, other).first_bad_seq == checkpoints[0]["seq"]


def test_two_instances_in_one_process_interleave(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    hsm = FakeHsm()
    a = AuditLog(path, now_ms=lambda: 1, sign=hsm.sign, checkpoint_every=4)
    b = AuditLog(path, now_ms=lambda: 2, sign=hsm.sign, checkpoint_every=5)
    assert a.head == b.head == (0, "0" * 64)
    for i in range(30):
        writer, other = (a, b) if i % 3 else (b, a)
        seq = writer.append("release", actor=f"w:{id(writer)}", subject="s", outcome="ok",
                            reason=str(i))
        assert other.head == writer.head  # each sees the other's writes
        assert other.head[0] >= seq
    b.checkpoint()
    assert a.head == b.head
    seq = a.append("release", actor="a", subject="s", outcome="ok")
    assert seq == b.head[0] == a.head[0]
    a.close()
    b.close()
    records = _records(path)
    assert a.head == (records[-1]["seq"], records[-1]["hash"])
    assert sum(r["event"] == "release" for r in records) == 31
    assert sum(r["event"] == "checkpoint" for r in records) >= 3
    assert verify_log(path, hsm.signing_public_key()).ok
    reopened = AuditLog(path, now_ms=lambda: 0)
    assert reopened.head == a.head


@pytest.mark.parametrize("garbage", [
    b'{"actor":"proc:w2","event":"rel',  # a writer died mid-line
    b"not json at all\n",  # a whole line of garbage
    b"{}\n",  # JSON, but not a record
], ids=["partial-line", "garbage-line", "not-a-record"])
def test_garbage_tail_from_another_writer_fails_closed(tmp_path: Path, garbage: bytes) -> None:
    path = tmp_path / "audit.log"
    audit = AuditLog(path, now_ms=lambda: 0)
    for _ in range(3):
        audit.append("release", actor="x", subject="y", outcome="ok")
    good, head = path.read_bytes(), audit.head
    with path.open("ab") as other_writer:
        other_writer.write(garbage)
    corrupted = path.read_bytes()

    with pytest.raises(Unavailable, match="audit log unavailable"):
        audit.append("release", actor="x", subject="y", outcome="ok")
    with pytest.raises(Unavailable, match="audit log unavailable"):
        audit.write("release", actor="x", subject="y", outcome="ok")
    assert path.read_bytes() == corrupted  # nothing written after the garbage
    assert audit.head == head
    with pytest.raises(Unavailable):
        AuditLog(path, now_ms=lambda: 0)  # a new worker does not start on it either

    path.write_bytes(good)  # the operator removes the garbage: appends work again
    assert audit.append("release", actor="x", subject="y", outcome="ok") == 4
    assert verify_log(path).ok and verify_log(path).records == 4


def test_edited_last_record_is_not_chained_onto(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    audit = AuditLog(path, now_ms=lambda: 0)
    audit.append("release", actor="x", subject="y", outcome="ok")
    other = AuditLog(path, now_ms=lambda: 0)
    other.append("release", actor="x", subject="y", outcome="denied")
    path.write_bytes(path.read_bytes().replace(b'"outcome":"denied"', b'"outcome":"allowed"'))
    with pytest.raises(Unavailable, match="not a valid audit record"):
        audit.append("release", actor="x", subject="y", outcome="ok")
    assert verify_log(path).first_bad_seq == 2
