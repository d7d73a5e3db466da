"""Issue 11 item 4: the audit log's head is anchored, so records cut from its end are found.

Unit level (an :class:`AuditLog` with the broker's anchor writer over a FakeHsm): truncation
after the last checkpoint is found by ``verify_log`` with the anchor and by the start-up check;
a log that goes backwards under a running appender is anchored at the highest head seen; a
fully re-chained log passes without a key only with the "authenticity not checked" warning,
and fails with the key. End to end (``kms-broker serve`` on SoftHSM): the broker anchors every
``audit_checkpoint_s``; records deleted from the end while it runs or while it is down make
the restart refuse, naming the log and the anchor, and ``kms-broker audit verify`` (with the
key exported by ``kms-broker audit public-key``) reports it. Waits poll the anchor file with a
deadline; nothing depends on timing.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from kms_broker.app import audit_anchor_writer, check_audit_anchor
from kms_broker.audit import AuditLog, AuditTruncated, read_anchor_file, verify_log
from kms_broker.domain.errors import Unavailable
from kms_broker.encoding import canonical_json
from kms_broker.hsm.fake import FakeHsm
from tests.kms_broker.conftest import REPO, BrokerProc

DEADLINE_S = 120  # a guard on waits, never an assertion about speed


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines(keepends=True)


def _log(tmp_path: Path, hsm: FakeHsm, every: int = 5) -> AuditLog:
    clock = iter(range(1_000, 10_000_000, 7))
    return AuditLog(tmp_path / "audit.log", now_ms=lambda: next(clock), sign=hsm.sign,
                    checkpoint_every=every,
                    anchor=audit_anchor_writer(hsm, tmp_path / "audit.anchor"))


def _write(audit: AuditLog, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        audit.append("release", actor=f"node:n{i}", subject="dataset:acme/ds1",
                     outcome="allowed", reason=f"case {i}")


def test_records_cut_after_the_last_checkpoint_are_found(tmp_path: Path) -> None:
    hsm = FakeHsm()
    audit = _log(tmp_path, hsm, every=1000)
    _write(audit, 6)
    assert audit.seal() == 7  # checkpoint at 7, anchored
    _write(audit, 3, start=6)
    audit.seal()  # records 8..10, checkpoint 11, anchored
    path = tmp_path / "audit.log"
    anchor = read_anchor_file(tmp_path / "audit.anchor")
    assert anchor is not None and anchor.seq == 11 and hsm.audit_anchor()[0] == 11
    assert verify_log(path, hsm.signing_public_key(), anchor).ok
    # delete everything after the checkpoint at 7: the chain alone still looks intact
    path.write_text("".join(_lines(path)[:7]))
    assert verify_log(path, hsm.signing_public_key()).ok
    result = verify_log(path, hsm.signing_public_key(), anchor)
    assert not result.ok and "ends at record 7" in result.problem
    assert "records 8..11" in result.problem
    with pytest.raises(AuditTruncated, match=r"does not match the HSM anchor \(record 11\)"):
        check_audit_anchor(path, hsm, tmp_path / "audit.anchor")
    # deleting the anchor file too does not help: the HSM keeps its anchor
    (tmp_path / "audit.anchor").unlink()
    with pytest.raises(AuditTruncated, match="ends at record 7"):
        check_audit_anchor(path, hsm, tmp_path / "audit.anchor")


def test_appends_go_on_while_a_seal_stores_its_anchor(tmp_path: Path) -> None:
    """The anchor (an HSM object write, a signature, the anchor file's syncs) is stored
    outside the log's append lock: appends by this instance and by another appender on the
    file (another worker) finish while a seal is inside its anchor write; a second sealer
    waits for the first, so the anchor still only moves forward and names the record the
    seal checkpointed."""
    hsm = FakeHsm()
    store = audit_anchor_writer(hsm, tmp_path / "audit.anchor")
    inside, go = threading.Event(), threading.Event()
    anchored: list[int] = []

    def slow_anchor(seq: int, head: str) -> None:
        if not anchored:
            inside.set()
            assert go.wait(DEADLINE_S)
        store(seq, head)
        anchored.append(seq)

    clock = iter(range(1_000, 10_000_000, 7))
    audit = AuditLog(tmp_path / "audit.log", now_ms=lambda: next(clock), sign=hsm.sign,
                     checkpoint_every=1000, anchor=slow_anchor)
    other = _log(tmp_path, hsm, every=1000)  # a second appender on the same file
    _write(audit, 3)
    sealer = threading.Thread(target=audit.seal)
    sealer.start()
    assert inside.wait(DEADLINE_S)  # the first seal wrote checkpoint 4 and is anchoring it
    writers = [threading.Thread(target=_write, args=(log, 2, 10 * i))
               for i, log in enumerate((audit, other), start=1)]
    for w in writers:
        w.start()
    for w in writers:
        w.join(DEADLINE_S)
    assert not any(w.is_alive() for w in writers), "appends waited for the anchor"
    second = threading.Thread(target=other.seal)  # checkpoints 9 and must anchor after 4
    second.start()
    second.join(0.2)
    assert hsm.audit_anchor() is None  # neither seal has stored an anchor yet
    go.set()
    sealer.join(DEADLINE_S)
    second.join(DEADLINE_S)
    assert not sealer.is_alive() and not second.is_alive()
    assert anchored == [4]  # the first seal anchored its own checkpoint, not later records
    assert hsm.audit_anchor()[0] == 9 == read_anchor_file(tmp_path / "audit.anchor").seq
    assert verify_log(tmp_path / "audit.log", hsm.signing_public_key(),
                      read_anchor_file(tmp_path / "audit.anchor")).ok


def test_log_cut_under_a_running_appender_is_anchored_at_the_highest_head(
    tmp_path: Path,
) -> None:
    hsm = FakeHsm()
    audit = _log(tmp_path, hsm, every=1000)
    _write(audit, 4)
    audit.seal()  # 5 anchored
    _write(audit, 3, start=4)  # 6..8 not yet anchored
    path = tmp_path / "audit.log"
    path.write_text("".join(_lines(path)[:6]))  # the attacker cuts 7 and 8
    with pytest.raises(Unavailable, match="went back"):
        audit.seal()
    assert hsm.audit_anchor()[0] == 8  # the head this appender had seen
    with pytest.raises(AuditTruncated, match="ends at record 6"):
        check_audit_anchor(path, hsm, tmp_path / "audit.anchor")


def test_rechained_log_passes_only_with_a_warning_without_key(tmp_path: Path,
                                                             capsys) -> None:
    from kms_broker.cli import main

    hsm = FakeHsm()
    audit = _log(tmp_path, hsm, every=3)
    _write(audit, 8)
    audit.seal()
    path = tmp_path / "audit.log"
    # the attacker rewrites every record (drops the denials it dislikes, re-chains, keeps
    # the checkpoints' signatures which now sign the wrong heads)
    prev, out = "0" * 64, []
    for seq, line in enumerate(_lines(path)[2:], start=1):
        rec = json.loads(line)
        rec.pop("hash")
        rec["seq"], rec["prev"] = seq, prev
        prev = hashlib.sha256(bytes.fromhex(prev) + canonical_json(rec)).hexdigest()
        out.append(canonical_json({**rec, "hash": prev}).decode() + "\n")
    path.write_text("".join(out))
    (tmp_path / "audit.anchor").unlink()  # and removes the anchor file
    plain = verify_log(path)
    assert plain.ok and not plain.authenticated and "AUTHENTICITY NOT CHECKED" in plain.problem
    assert main(["audit", "verify", "--state-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().out.startswith("CHAIN INTACT, AUTHENTICITY NOT CHECKED")
    keyed = verify_log(path, hsm.signing_public_key())
    assert not keyed.ok and "checkpoint signature" in keyed.problem
    assert main(["audit", "verify", "--state-dir", str(tmp_path), "--public-key",
                 hsm.signing_public_key().hex()]) == 1
    assert capsys.readouterr().out.startswith("TAMPERED")


# --- end to end ------------------------------------------------------------------------------


def _wait_anchored(broker: BrokerProc) -> int:
    """Wait until the anchor covers the whole log (the broker's checkpointer did a round)."""
    deadline = time.monotonic() + DEADLINE_S
    while True:
        anchor = read_anchor_file(broker.state_dir / "audit.anchor")
        count = len(_lines(broker.state_dir / "audit.log"))
        if anchor is not None and anchor.seq == count:
            return count
        assert time.monotonic() < deadline, "the broker never anchored its audit log"
        time.sleep(0.05)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kms_broker.cli", *args], cwd=REPO,
                          capture_output=True, text=True, check=False, timeout=DEADLINE_S)


@pytest.fixture
def anchored_broker(broker_factory) -> BrokerProc:
    broker = broker_factory(f"anch{time.monotonic_ns() % 10**6}",
                            extra_config={"audit_checkpoint_s": 0.2})
    yield broker
    broker.stop()


def test_records_cut_while_the_broker_runs_stop_the_restart(anchored_broker) -> None:
    broker = anchored_broker
    with broker.tenant("acme") as acme:
        acme.register()
    count = _wait_anchored(broker)
    assert json.loads(_lines(broker.state_dir / "audit.log")[-1])["event"] == "checkpoint"
    with broker.tenant("beta") as beta:
        beta.register()
    _wait_anchored(broker)
    log = broker.state_dir / "audit.log"
    # cut every record after the checkpoint that sealed acme's registration
    log.write_text("".join(_lines(log)[:count]))
    broker.stop()
    with pytest.raises(RuntimeError, match=rf"ends at record {count} but record \d+ was "
                                           r"anchored"):
        broker.restart()
    cfg = str(broker.state_dir.parent / f"{broker.name}.yaml")
    pem = broker.state_dir.parent / "audit-key.pem"
    pem.write_text(_cli("audit", "public-key", "--config", cfg).stdout)
    verdict = _cli("audit", "verify", "--state-dir", str(broker.state_dir), "--public-key",
                   str(pem))
    assert verdict.returncode == 1 and verdict.stdout.startswith("TAMPERED")
    assert f"ends at record {count}" in verdict.stdout


def test_log_truncated_while_the_broker_is_down_is_refused(anchored_broker) -> None:
    broker = anchored_broker
    with broker.tenant("acme") as acme:
        acme.register()
    broker.stop()  # clean shutdown: a final checkpoint, anchored
    log = broker.state_dir / "audit.log"
    lines = _lines(log)
    assert json.loads(lines[-1])["event"] == "checkpoint"
    anchor = read_anchor_file(broker.state_dir / "audit.anchor")
    assert anchor is not None and anchor.seq == len(lines)
    log.write_text("".join(lines[:-2]))
    (broker.state_dir / "audit.anchor").unlink()  # the attacker removes the file as well
    with pytest.raises(RuntimeError) as info:
        broker.restart()
    assert "refusing to start" in str(info.value)
    assert f"audit log {log} does not match the HSM anchor (record {len(lines)})" in str(
        info.value)
    log.write_text("".join(lines))  # the untouched log starts again
    broker.restart()
