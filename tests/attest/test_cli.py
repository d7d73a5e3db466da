"""``attest collect | verify | doctor`` as real subprocesses, against a real swtpm."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from attest.swtpm import Swtpm
from attest.tpm2.marshal import parse_public
from attest.tpm2.node import TpmNode

REPO = Path(__file__).resolve().parents[2]
ZERO_BOOT = {str(i): "00" * 32 for i in range(8)}


def attest(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "attest.cli", *args],
        cwd=REPO, capture_output=True, text=True, check=False,
    )


@pytest.fixture(scope="module")
def ak_pem(swtpm: Swtpm, tmp_path_factory) -> Path:
    with TpmNode(swtpm.tcti) as node:
        key = parse_public(node.ak_public()).key
    path = tmp_path_factory.mktemp("ak") / "ak.pem"
    path.write_bytes(key.public_bytes(serialization.Encoding.PEM,
                                      serialization.PublicFormat.SubjectPublicKeyInfo))
    return path


def test_collect_prints_facts_and_code_digest_as_json():
    proc = attest("collect", "--json", "--no-gpu")
    assert proc.returncode == 0, proc.stderr
    claims = json.loads(proc.stdout)
    assert len(claims["code_digest"]) == 64
    assert {"ksm_enabled", "swap_enabled", "core_dumps_allowed", "torch_version"} <= set(claims)


@pytest.mark.integration
def test_collect_evidence_then_verify(swtpm, ak_pem, tmp_path):
    nonce = os.urandom(32).hex()
    binding = ["--nonce", nonce, "--session-id", "s1", "--node-key", "04" + "ab" * 64]
    out = tmp_path / "evidence.bin"
    boot = tmp_path / "boot.json"
    boot.write_text(json.dumps(ZERO_BOOT))

    made = attest("collect", "--no-gpu", "--evidence", str(out), "--tcti", swtpm.tcti, *binding)
    assert made.returncode == 0, made.stderr
    assert "quoting" in made.stderr

    ok = attest("verify", str(out), "--ak", str(ak_pem), "--boot-pcrs", str(boot), "--json",
                *binding)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    result = json.loads(ok.stdout)
    assert result["ok"] is True and result["failures"] == []
    assert result["claims"]["code_digest"] == json.loads(
        attest("collect", "--json", "--no-gpu").stdout)["code_digest"]

    other = ["--nonce", os.urandom(32).hex(), "--session-id", "s1", "--node-key", "04" + "ab" * 64]
    refused = attest("verify", str(out), "--ak", str(ak_pem), "--boot-pcrs", str(boot), *other)
    assert refused.returncode == 1
    assert "REFUSED" in refused.stdout and "tpm2.nonce" in refused.stdout

    no_ref = attest("verify", str(out), "--ak", str(ak_pem), *binding)
    assert no_ref.returncode == 1 and "tpm2.boot_pcr" in no_ref.stdout

    out.write_bytes(out.read_bytes()[:-1])
    broken = attest("verify", str(out), "--ak", str(ak_pem), *binding)
    assert broken.returncode == 1 and "malformed evidence" in broken.stderr


def test_usage_errors_exit_2(tmp_path):
    assert attest().returncode == 2
    bad_nonce = attest("verify", str(tmp_path / "x"), "--ak", "ak.pem", "--report-data", "zz")
    assert bad_nonce.returncode == 2
    missing = attest("verify", str(tmp_path / "missing"), "--ak", "x", "--report-data", "00" * 32)
    assert missing.returncode == 2 and "No such file" in missing.stderr
    no_tcti = attest("collect", "--evidence", str(tmp_path / "e"), "--report-data", "00" * 32)
    assert no_tcti.returncode == 2 and "--tcti" in no_tcti.stderr
    assert not (tmp_path / "e").exists()


def test_help_describes_every_command():
    proc = attest("--help")
    assert proc.returncode == 0
    for cmd in ("collect", "verify", "doctor"):
        assert cmd in proc.stdout


def _hostile_root(root: Path) -> Path:
    for rel, text in {
        "proc/cmdline": "quiet\n",
        "sys/kernel/mm/ksm/run": "1\n",
        "proc/swaps": "Filename Type Size Used Priority\n/dev/sda2 partition 1 0 -2\n",
        "proc/self/limits": "Max core file size        unlimited            unlimited  bytes\n",
    }.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_doctor_names_failing_rules_with_fixes(tmp_path):
    policy = tmp_path / "p.yaml"
    policy.write_text(
        "name: doctor-test\nversion: 1\nrules:\n"
        "  - name: ksm-off\n    expr: claims.node.ksm.enabled == false\n"
        "    reason: KSM must be off\n    help: echo 0 > /sys/kernel/mm/ksm/run\n"
        "  - name: swap-off\n    expr: claims.node.swap.enabled == false\n"
        "    reason: swap must be off\n    help: swapoff -a\n"
    )
    root = _hostile_root(tmp_path / "root")
    proc = attest("doctor", "--no-gpu", "--root", str(root), "--policy", str(policy), "--json")
    assert proc.returncode == 1, proc.stderr
    rules = {r["name"]: r for r in json.loads(proc.stdout)["policy"]["rules"]}
    assert rules["ksm-off"]["passed"] is False
    assert rules["ksm-off"]["fix"] == "echo 0 > /sys/kernel/mm/ksm/run"
    assert rules["swap-off"]["passed"] is False

    text = attest("doctor", "--no-gpu", "--root", str(root), "--policy", str(policy))
    assert "FAIL ksm-off" in text.stdout and "2 rule(s) would fail" in text.stdout

    (root / "sys/kernel/mm/ksm/run").write_text("0\n")
    (root / "proc/swaps").write_text("Filename Type Size Used Priority\n")
    fixed = attest("doctor", "--no-gpu", "--root", str(root), "--policy", str(policy))
    assert fixed.returncode == 0 and "every rule passes" in fixed.stdout


def test_doctor_rejects_a_bad_policy_with_exit_2(tmp_path):
    policy = tmp_path / "bad.yaml"
    policy.write_text("name: x\nversion: 1\nrules: []\n")
    proc = attest("doctor", "--no-gpu", "--policy", str(policy))
    assert proc.returncode == 2 and "--policy" in proc.stderr
