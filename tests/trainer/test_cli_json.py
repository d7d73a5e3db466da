"""``trainer validate --format json`` (parsed, fields asserted) and the denial message that
names each failed rule once."""

from __future__ import annotations

import json
import subprocess

from tests.trainer.conftest import PY, REPO, child_env, job_dict, write_job
from trainer.cli import denial_lines
from trainer.keysource import AttestationDenied


def test_validate_format_json(tmp_path, dataset) -> None:
    job = write_job(tmp_path / "job.yaml", job_dict(dataset, tmp_path))
    proc = subprocess.run([PY, "-m", "trainer", "validate", "--job", str(job), "--format",
                           "json"], cwd=REPO, env=child_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["job_id"] == "job-1" and doc["tenant_id"] == "acme"
    assert doc["dataset"] == {"id": "corpus", "key_version": 1, "manifest": dataset.manifest,
                              "store": str(dataset.store)}
    assert doc["model"] == "tiny-gpt" and doc["steps"] == 60 and doc["batch_size"] == 8
    assert isinstance(doc["brokers"], list)


def test_denial_names_each_failed_rule_once() -> None:
    reasons = ("ksm-off: KSM must be off", "swap-off: swap must be off")
    exc = AttestationDenied("release denied by 127.0.0.1:7001: ksm-off: KSM must be off",
                            (*reasons, reasons[0]))
    text = "\n".join(denial_lines(exc, exc.reasons))
    assert text.count("KSM must be off") == 1 and text.count("swap must be off") == 1
    assert text.splitlines()[0] == "trainer: attestation denied: release denied by " \
                                   "127.0.0.1:7001"
    # the broker's own form: the reasons in parentheses after the policy line
    exc = AttestationDenied("release denied by b:7001: policy: no grant's policy for this job "
                            f"passes ({reasons[0]})", reasons[:1])
    lines = denial_lines(exc, exc.reasons)
    assert lines == ["trainer: attestation denied: release denied by b:7001: policy: no "
                     "grant's policy for this job passes (ksm-off)", f"  - {reasons[0]}"]


def test_check_format_json() -> None:
    proc = subprocess.run([PY, "-m", "trainer", "check", "-o", "json"], cwd=REPO,
                          env=child_env(), capture_output=True, text=True)
    doc = json.loads(proc.stdout)
    assert proc.returncode == (0 if doc["passed"] else 1), proc.stderr
    names = {c["name"] for c in doc["checks"]}
    assert "not-dumpable" in names
    assert all(isinstance(c["ok"], bool) and isinstance(c["required"], bool)
               for c in doc["checks"])
    assert doc["passed"] == all(c["ok"] for c in doc["checks"] if c["required"])
