"""Must-show 5: editing, deleting or reordering any audit record is found, naming the first
bad record; checkpoints are signed by the HSM key; appends fail closed and recover."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from kms_broker.app import audit_anchor_writer
from kms_broker.audit import AuditLog, verify_log
from kms_broker.cli import main
from kms_broker.domain.errors import Unavailable
from kms_broker.hsm.fake import FakeHsm


@pytest.fixture
def log(tmp_path: Path) -> tuple[Path, FakeHsm]:
    hsm = FakeHsm()
    clock = iter(range(1_000, 10_000_000, 7))
    audit = AuditLog(tmp_path / "audit.log", now_ms=lambda: next(clock), sign=hsm.sign,
                     checkpoint_every=5)
    for i in range(12):
        audit.append("release", actor=f"node:n{i}", subject="dataset:acme/ds1",
                     outcome="allowed" if i % 3 else "denied", reason=f"case {i}")
    return tmp_path / "audit.log", hsm


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines(keepends=True)


def _cli_verify(path: Path, capsys: pytest.CaptureFixture[str], key: bytes | None = None):
    args = ["audit", "verify", "--state-dir", str(path.parent)]
    if key:
        args += ["--public-key", key.hex()]
    code = main(args)
    return code, capsys.readouterr().out


def test_intact_log_verifies(log, capsys) -> None:
    path, hsm = log
    result = verify_log(path, hsm.signing_public_key())
    assert result.ok and result.records == 14  # 12 records + 2 signed checkpoints
    assert sum(json.loads(x)["event"] == "checkpoint" for x in _lines(path)) == 2
    code, out = _cli_verify(path, capsys, hsm.signing_public_key())
    assert code == 1 and "no anchor file" in out  # with a key, a missing anchor is a finding
    code, out = _cli_verify(path, capsys)
    assert code == 2 and out.startswith("CHAIN INTACT, AUTHENTICITY NOT CHECKED")
    AuditLog(path, now_ms=lambda: 0, sign=hsm.sign,
             anchor=audit_anchor_writer(hsm, path.with_name("audit.anchor"))).seal()
    code, out = _cli_verify(path, capsys, hsm.signing_public_key())
    assert code == 0 and out.startswith("OK") and "anchored up to record 15" in out


@pytest.mark.parametrize("index", [0, 4, 13])
def test_edited_record_is_named(log, capsys, index: int) -> None:
    path, _ = log
    lines = _lines(path)
    lines[index] = lines[index].replace('"outcome":"denied"', '"outcome":"allowed"') \
        .replace('"outcome":"ok"', '"outcome":"xx"').replace('"reason":"case', '"reason":"kase')
    path.write_text("".join(lines))
    result = verify_log(path)
    assert not result.ok and result.first_bad_seq == index + 1
    assert "edited" in result.problem
    code, out = _cli_verify(path, capsys)
    assert code == 1 and f"record {index + 1}:" in out


@pytest.mark.parametrize("index", [0, 6, 13])
def test_deleted_record_is_named(log, capsys, index: int) -> None:
    path, _ = log
    lines = _lines(path)
    del lines[index]
    path.write_text("".join(lines))
    result = verify_log(path)
    if index == 13:  # the last record: only the seal of the chain head can tell
        assert result.ok and result.records == 13
        return
    assert not result.ok and result.first_bad_seq == index + 1
    assert "deleted or reordered" in result.problem
    code, out = _cli_verify(path, capsys)
    assert code == 1 and f"record {index + 1}:" in out


@pytest.mark.parametrize("index", [0, 7, 12])
def test_reordered_records_are_named(log, capsys, index: int) -> None:
    path, _ = log
    lines = _lines(path)
    lines[index], lines[index + 1] = lines[index + 1], lines[index]
    path.write_text("".join(lines))
    result = verify_log(path)
    assert not result.ok and result.first_bad_seq == index + 1
    code, out = _cli_verify(path, capsys)
    assert code == 1 and f"record {index + 1}:" in out


def test_rehashed_edit_is_found_at_the_next_record(log) -> None:
    """An attacker who recomputes the edited record's hash breaks the next record's prev."""
    import hashlib

    from kms_broker.encoding import canonical_json

    path, _ = log
    lines = _lines(path)
    rec = json.loads(lines[2])
    rec.pop("hash")
    rec["reason"] = "forged"
    rec["hash"] = hashlib.sha256(bytes.fromhex(rec["prev"]) + canonical_json(rec)).hexdigest()
    lines[2] = canonical_json(rec).decode() + "\n"
    path.write_text("".join(lines))
    result = verify_log(path)
    assert not result.ok and result.first_bad_seq == 4


def test_forged_checkpoint_signature_is_found(log) -> None:
    path, hsm = log
    other = FakeHsm()
    assert verify_log(path, other.signing_public_key()).first_bad_seq == 6
    assert verify_log(path, hsm.signing_public_key()).ok


def test_append_fails_closed_and_recovers(tmp_path: Path) -> None:
    clock = iter(range(10**6))
    audit = AuditLog(tmp_path / "audit.log", now_ms=lambda: next(clock))
    audit.append("a", actor="x", subject="y", outcome="ok")
    head = audit.head
    os.rename(tmp_path / "audit.log", tmp_path / "aside")
    (tmp_path / "audit.log").mkdir()
    with pytest.raises(Unavailable, match="audit log unavailable"):
        audit.append("b", actor="x", subject="y", outcome="ok")
    assert audit.head == head
    (tmp_path / "audit.log").rmdir()
    os.rename(tmp_path / "aside", tmp_path / "audit.log")
    assert audit.append("c", actor="x", subject="y", outcome="ok") == 2
    assert verify_log(tmp_path / "audit.log").ok
    reopened = AuditLog(tmp_path / "audit.log", now_ms=lambda: 0)
    assert reopened.head == audit.head


def test_cli_tail_prints_last_records(log, capsys) -> None:
    path, _ = log
    assert main(["audit", "tail", "--state-dir", str(path.parent), "--limit", "3"]) == 0
    out = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["seq"] for r in out] == [12, 13, 14]


def test_failed_sync_fails_only_its_records_and_recovers(tmp_path: Path, monkeypatch) -> None:
    import kms_broker.audit as audit_module

    audit = AuditLog(tmp_path / "audit.log", now_ms=lambda: 0)
    audit.append("a", actor="x", subject="y", outcome="ok")
    real = os.fdatasync

    def broken(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(audit_module.os, "fdatasync", broken)
    seq = audit.write("b", actor="x", subject="y", outcome="ok")
    with pytest.raises(Unavailable, match="Input/output error"):
        audit.wait_durable(seq)
    monkeypatch.setattr(audit_module.os, "fdatasync", real)
    assert audit.append("c", actor="x", subject="y", outcome="ok") == seq + 1
    with pytest.raises(Unavailable):
        audit.wait_durable(seq)  # a record whose sync failed is never reported durable
    audit.close()
    assert verify_log(tmp_path / "audit.log").ok


def test_shutdown_checkpoint_seals_the_tail(log) -> None:
    path, hsm = log
    assert "2 record(s) after it" in verify_log(path, hsm.signing_public_key()).problem
    audit = AuditLog(path, now_ms=lambda: 0, sign=hsm.sign)
    audit.checkpoint()
    result = verify_log(path, hsm.signing_public_key())
    assert result.ok and "0 record(s) after it" in result.problem


def test_short_write_is_taken_back(tmp_path: Path, monkeypatch) -> None:
    import kms_broker.audit as audit_module

    path = tmp_path / "audit.log"
    audit = AuditLog(path, now_ms=lambda: 0)
    audit.append("a", actor="x", subject="y", outcome="ok")
    before, head = path.read_bytes(), audit.head
    real = os.write
    monkeypatch.setattr(audit_module.os, "write", lambda fd, data: real(fd, data[:10]))
    with pytest.raises(Unavailable, match="short write"):
        audit.append("b", actor="x", subject="y", outcome="ok")
    monkeypatch.setattr(audit_module.os, "write", real)
    assert path.read_bytes() == before and audit.head == head  # the partial line is gone
    assert audit.append("c", actor="x", subject="y", outcome="ok") == 2
    assert verify_log(path).ok


def test_log_that_went_backwards_fails_closed(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    audit = AuditLog(path, now_ms=lambda: 0)
    for _ in range(3):
        audit.append("a", actor="x", subject="y", outcome="ok")
    full = path.read_bytes()
    path.write_bytes(b"".join(full.splitlines(keepends=True)[:2]))  # last record cut off
    with pytest.raises(Unavailable, match="went back to record 2 after record 3"):
        audit.append("b", actor="x", subject="y", outcome="ok")
    assert len(path.read_bytes().splitlines()) == 2
    path.write_bytes(full)
    assert audit.append("c", actor="x", subject="y", outcome="ok") == 4
    assert verify_log(path).ok
