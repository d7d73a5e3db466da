"""``attest doctor`` is honest (issue 10 item 5): a rule it cannot evaluate on the node is
NOT CHECKED (never PASS), the tenant's expected code digest makes the code rule checkable,
and CPU-TEE and GPU sections say "not present" on a machine without them. Real subprocesses
of the ``attest`` CLI over a facts root the test writes."""

from __future__ import annotations

import json
from pathlib import Path

from tests.attest.conftest import hardened_root
from tests.attest.test_cli import REPO, attest

DEV_POLICY = REPO / "policies" / "dev-swtpm.yaml"
PRODUCTION_POLICY = REPO / "policies" / "production.yaml"


def _doctor(root: Path, policy: Path, *extra: str) -> tuple[int, dict[str, dict]]:
    proc = attest("doctor", "--no-gpu", "--root", str(root), "--policy", str(policy),
                  "--json", *extra)
    assert proc.returncode in (0, 1), proc.stderr
    report = json.loads(proc.stdout)
    return proc.returncode, {r["name"]: r for r in report["policy"]["rules"]}


def _code_digest(root: Path) -> str:
    proc = attest("collect", "--no-gpu", "--root", str(root), "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["code_digest"]


def test_rules_it_cannot_evaluate_are_not_checked_never_pass(tmp_path):
    root = hardened_root(tmp_path / "root")
    code, rules = _doctor(root, DEV_POLICY)
    # the quote's verification happens at the broker: the doctor cannot claim it
    assert rules["evidence-verified"]["status"] == "not checked"
    assert rules["evidence-verified"]["passed"] is None
    assert "evidence.kind" in rules["evidence-verified"]["reason"]
    # the allow-list is the tenant's (empty in the file): not checked, and says how
    assert rules["trainer-code-allowed"]["status"] == "not checked"
    assert "--expected-code-digest" in rules["trainer-code-allowed"]["reason"]
    # what the node knows itself is judged
    assert rules["ksm-off"]["status"] == "pass" and rules["swap-off"]["status"] == "pass"
    assert code == 0  # nothing checked fails
    text = attest("doctor", "--no-gpu", "--root", str(root), "--policy", str(DEV_POLICY))
    assert "NOT CHECKED evidence-verified" in text.stdout
    assert "PASS evidence-verified" not in text.stdout
    # evidence-verified, trainer-code-allowed, and the job allow-lists (job-model-allowed,
    # job-digest-allowed) whose params are the tenant's
    assert "4 not checked here" in text.stdout


def test_expected_code_digest_makes_the_code_rule_checkable(tmp_path):
    root = hardened_root(tmp_path / "root")
    digest = _code_digest(root)
    code, rules = _doctor(root, DEV_POLICY, "--expected-code-digest", digest)
    assert rules["trainer-code-allowed"]["status"] == "pass"
    assert code == 0
    code, rules = _doctor(root, DEV_POLICY, "--expected-code-digest", "ab" * 32)
    assert rules["trainer-code-allowed"]["status"] == "fail"
    assert code == 1
    expected = tmp_path / "expected.json"
    expected.write_text(json.dumps({"allowed_code_digests": [digest]}))
    _, rules = _doctor(root, DEV_POLICY, "--expected", str(expected))
    assert rules["trainer-code-allowed"]["status"] == "pass"
    bad = attest("doctor", "--no-gpu", "--root", str(root), "--policy", str(DEV_POLICY),
                 "--expected-code-digest", "not-hex")
    assert bad.returncode == 2 and "64 hex digits" in bad.stderr


def test_production_policy_boot_and_tee_rules_are_not_checked(tmp_path):
    root = hardened_root(tmp_path / "root")
    _, rules = _doctor(root, PRODUCTION_POLICY)
    statuses = {name: r["status"] for name, r in rules.items()}
    assert "pass" not in {statuses[n] for n, r in rules.items()
                          if "evidence." in r["reason"] or "tpm." in r["reason"]}
    not_checked = {n for n, s in statuses.items() if s == "not checked"}
    assert len(not_checked) >= 3, statuses  # evidence, boot PCRs, SNP measurement, ...


def test_cpu_tee_and_gpu_not_present_on_a_machine_without_them(tmp_path):
    root = hardened_root(tmp_path / "root")
    proc = attest("doctor", "--no-gpu", "--root", str(root), "--json")
    assert proc.returncode == 0, proc.stderr
    hardware = {h["name"]: h for h in json.loads(proc.stdout)["hardware"]}
    assert set(hardware) == {"sev-snp", "tdx", "configfs-tsm", "nvidia"}
    assert {h["status"] for h in hardware.values()} == {"not present"}
    text = attest("doctor", "--no-gpu", "--root", str(root)).stdout
    assert "sev-snp       not present" in text and "PASS" not in text

    (root / "dev").mkdir()
    (root / "dev" / "sev-guest").write_text("")
    (root / "dev" / "nvidia0").write_text("")
    (root / "sys/kernel/config/tsm/report").mkdir(parents=True)
    proc = attest("doctor", "--no-gpu", "--root", str(root), "--json")
    hardware = {h["name"]: h for h in json.loads(proc.stdout)["hardware"]}
    assert hardware["sev-snp"]["status"] == "present"
    assert hardware["configfs-tsm"]["status"] == "present"
    assert hardware["nvidia"]["status"] == "present"
    assert hardware["tdx"]["status"] == "not present"
    assert "pass" not in {h["status"] for h in hardware.values()}
