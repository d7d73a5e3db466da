"""CEL release policies: the shipped policies, decisions with reasons, validation, digest."""

from __future__ import annotations

import datetime as dt
import textwrap
from pathlib import Path
from typing import Any

import pytest

from attest import policy as policy_mod
from attest.interface import Failure, MalformedEvidence, VerificationContext, VerificationResult
from attest.policy import Decision, Policy, PolicyError, evidence_claims, nest_claims

ROOT = Path(__file__).resolve().parents[2]
DEV = ROOT / "policies" / "dev-swtpm.yaml"
PROD = ROOT / "policies" / "production.yaml"
CODE = "5f" * 32
OTHER_CODE = "a0" * 32


def good_node(**overrides: Any) -> dict[str, Any]:
    """Claims of a hardened node with no GPU, as the tpm2 verifier + evidence_claims give."""
    claims: dict[str, Any] = {
        "evidence.kind": "tpm2",
        "evidence.verified": True,
        "tpm.boot_pcrs_match": True,
        "node.kernel.cmdline": "BOOT_IMAGE=/vmlinuz ro lockdown=integrity init_on_free=1",
        "node.ksm.enabled": False,
        "node.swap.enabled": False,
        "node.core_dump.limit": 0,
        "node.ptrace_scope": 2,
        "node.lockdown": "integrity",
        "node.init_on_free": True,
        "node.gpu.present": False,
        "node.container.image_digest": "",
        "trainer.code_digest": CODE,
    }
    claims.update(overrides)
    return claims


def gpu_node(**overrides: Any) -> dict[str, Any]:
    claims = good_node(**{
        "node.gpu.present": True,
        "node.gpu.compute_mode": "Exclusive_Process",
        "node.gpu.cc_mode": "on",
        "node.gpu.other_processes": 0,
    })
    claims.update(overrides)
    return claims


@pytest.fixture(scope="module")
def dev() -> Policy:
    return Policy.from_file(DEV).with_params({"allowed_code_digests": [CODE]})


@pytest.fixture(scope="module")
def prod() -> Policy:
    return Policy.from_file(PROD).with_params({"allowed_code_digests": [CODE]})


def only_failure(decision: Decision) -> policy_mod.RuleResult:
    assert not decision.allowed
    assert len(decision.failed) == 1, decision.summary()
    return decision.failed[0]


# --- the shipped policies -----------------------------------------------------------------

def test_shipped_policies_parse() -> None:
    dev = Policy.from_file(DEV)
    prod = Policy.from_file(PROD)
    assert dev.name == "dev-swtpm" and prod.name == "production"
    assert [r.name for r in dev.rules] == [
        "evidence-verified", "ksm-off", "swap-off", "core-dumps-disabled",
        "trainer-code-allowed", "job-model-allowed", "job-steps-bounded", "job-digest-allowed"]
    assert {"evidence-verified", "boot-pcrs-match", "ksm-off", "swap-off",
            "core-dumps-disabled", "ptrace-restricted", "kernel-lockdown", "init-on-free",
            "gpu-exclusive-process", "gpu-cc-on", "gpu-no-other-processes",
            "trainer-code-allowed", "job-model-allowed", "job-steps-bounded",
            "job-digest-allowed"} <= {r.name for r in prod.rules}
    assert dev.params == {"allowed_code_digests": [], "allowed_job_models": [],
                          "max_job_steps": 0, "allowed_job_digests": []}
    assert len(dev.digest) == 64 and dev.digest != prod.digest


def test_good_node_passes_dev_and_every_rule_is_listed(dev: Policy) -> None:
    decision = dev.evaluate(good_node())
    assert decision.allowed, decision.summary()
    assert [r.name for r in decision.rules] == [r.name for r in dev.rules]
    assert all(r.passed for r in decision.rules)
    assert decision.failed == ()
    assert decision.policy_digest == dev.digest


def test_shipped_policies_release_nothing_without_tenant_digests() -> None:
    decision = Policy.from_file(DEV).evaluate(good_node())
    assert only_failure(decision).name == "trainer-code-allowed"


def test_dev_relaxes_lockdown_init_on_free_and_gpu(dev: Policy) -> None:
    claims = good_node(**{"node.lockdown": "none", "node.init_on_free": False,
                          "node.ptrace_scope": 0, "node.gpu.present": True,
                          "node.gpu.compute_mode": "Default", "tpm.boot_pcrs_match": False})
    assert dev.evaluate(claims).allowed


@pytest.mark.parametrize(
    ("override", "rule", "words"),
    [
        ({"node.ksm.enabled": True}, "ksm-off", ["KSM", "node.ksm.enabled=true"]),
        ({"node.swap.enabled": True}, "swap-off", ["swap", "node.swap.enabled=true"]),
        ({"node.core_dump.limit": -1}, "core-dumps-disabled",
         ["core dump", "node.core_dump.limit=-1"]),
        ({"node.core_dump.limit": 4096}, "core-dumps-disabled", ["node.core_dump.limit=4096"]),
        ({"trainer.code_digest": OTHER_CODE}, "trainer-code-allowed",
         ["approved", f'trainer.code_digest="{OTHER_CODE}"']),
        ({"evidence.verified": False}, "evidence-verified", ["verified"]),
    ],
)
@pytest.mark.parametrize("which", ["dev", "prod"])
def test_each_weakness_fails_its_rule_with_a_reason(
        which: str, override: dict[str, Any], rule: str, words: list[str],
        dev: Policy, prod: Policy) -> None:
    pol = dev if which == "dev" else prod
    failed = only_failure(pol.evaluate(good_node(**override)))
    assert failed.name == rule
    for word in words:
        assert word in failed.reason
    assert "Fix:" in failed.reason


def test_dev_accepts_only_tpm2_evidence(dev: Policy) -> None:
    failed = only_failure(dev.evaluate(good_node(**{"evidence.kind": "sev-snp"})))
    assert failed.name == "evidence-verified"
    assert 'evidence.kind="sev-snp"' in failed.reason


def test_good_nodes_pass_production(prod: Policy) -> None:
    assert prod.evaluate(good_node()).allowed
    assert prod.evaluate(gpu_node()).allowed
    assert prod.evaluate(good_node(**{"node.lockdown": "confidentiality",
                                      "node.ptrace_scope": 3})).allowed


@pytest.mark.parametrize(
    ("claims", "rule"),
    [
        (good_node(**{"node.lockdown": "none"}), "kernel-lockdown"),
        (good_node(**{"node.init_on_free": False}), "init-on-free"),
        (good_node(**{"node.ptrace_scope": 1}), "ptrace-restricted"),
        (good_node(**{"tpm.boot_pcrs_match": False}), "boot-pcrs-match"),
        (gpu_node(**{"node.gpu.compute_mode": "Default"}), "gpu-exclusive-process"),
        (gpu_node(**{"node.gpu.cc_mode": "off"}), "gpu-cc-on"),
        (gpu_node(**{"node.gpu.other_processes": 2}), "gpu-no-other-processes"),
    ],
)
def test_production_strict_rules(prod: Policy, claims: dict[str, Any], rule: str) -> None:
    assert only_failure(prod.evaluate(claims)).name == rule


def test_production_image_allow_list_applies_when_given(prod: Policy) -> None:
    image = "sha256:" + "11" * 32
    pinned = prod.with_params({"allowed_image_digests": [image]})
    assert pinned.evaluate(good_node(**{"node.container.image_digest": image})).allowed
    failed = only_failure(pinned.evaluate(good_node()))
    assert failed.name == "container-image-allowed"


def test_missing_claim_is_a_failure_with_reason_not_an_exception(dev: Policy) -> None:
    claims = good_node()
    del claims["node.swap.enabled"]
    failed = only_failure(dev.evaluate(claims))
    assert failed.name == "swap-off"
    assert "missing claim(s) node.swap.enabled" in failed.reason


def test_empty_claims_fail_every_rule(prod: Policy) -> None:
    decision = prod.evaluate({})
    assert not decision.allowed
    assert len(decision.rules) == len(prod.rules)
    assert all(not r.passed and "missing claim" in r.reason for r in decision.failed)


def test_inconsistent_claims_fail_every_rule(dev: Policy) -> None:
    decision = dev.evaluate(good_node(**{"node.ksm": False}))
    assert not decision.allowed and len(decision.failed) == len(dev.rules)
    assert "both a value and a group" in decision.failed[0].reason


def test_nested_and_flat_claims_are_equivalent(dev: Policy) -> None:
    assert dev.evaluate(nest_claims(good_node())).allowed


# --- CEL semantics the engine gives (docs/policies.md, the comparison table) --------------

def _one_rule(expr: str, params: str = "{}") -> Policy:
    return Policy.from_yaml(textwrap.dedent(f"""
        name: t
        version: 1
        params: {params}
        rules:
          - name: r
            expr: {expr!r}
            reason: test rule
    """))


@pytest.mark.parametrize(
    ("expr", "claims", "passed", "why"),
    [
        ("claims.n >= 2u", {"n": 2}, True, ""),  # int vs uint compares by value
        ("claims.s == 1", {"s": "x"}, False, "false"),  # cross-type equality is false
        ("has(claims.a.b)", {"a.b": 1}, True, ""),
        ("has(claims.a.c)", {"a.b": 1}, False, "false"),
        ("claims.s in ['x', 'y']", {"s": "y"}, True, ""),
        ("'k' in claims.m", {"m.k": 1}, True, ""),
        ("claims.s.startsWith('sha256:') && claims.s.endsWith('ff')", {"s": "sha256:ff"},
         True, ""),
        ("claims.s.matches('^[0-9a-f]{4}$') && size(claims.s) == 4", {"s": "00af"}, True, ""),
        ("true || claims.missing", {}, True, ""),  # errors are absorbed by || like CEL says
        ("claims.missing || true", {}, True, ""),
        ("claims.missing == 1", {}, False, "missing claim(s) missing"),
        ("claims.n / 0 == 1", {"n": 1}, False, "could not evaluate"),
        ("claims.n", {"n": 1}, False, "returned int, not bool"),
        ("timestamp(claims.t) < timestamp('2030-01-01T00:00:00Z')",
         {"t": "2026-11-23T00:00:00Z"}, True, ""),
        ("claims.n + 1 > claims.n", {"n": 9223372036854775807}, False, "could not evaluate"),
        ("claims.l.exists(x, x == 'b')", {"l": ["a", "b"]}, True, ""),
    ],
)
def test_cel_semantics(expr: str, claims: dict[str, Any], passed: bool, why: str) -> None:
    result = _one_rule(expr).evaluate(claims).rules[0]
    assert result.passed is passed, result.reason
    if not passed:
        assert why in result.reason


# --- validation of policy documents -------------------------------------------------------

GOOD = """
name: p
version: 1
rules:
  - name: a
    expr: claims.x == 1
    reason: x must be 1
"""


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name: p\nrules: [\n", "not valid YAML at line"),
        ("- just\n- a list\n", "must be a YAML mapping"),
        (GOOD.replace("name: p\n", ""), "policy name is missing"),
        (GOOD.replace("version: 1", "version: one"), "version must be a positive integer"),
        (GOOD.replace("version: 1", "version: true"), "version must be a positive integer"),
        ("name: p\nversion: 1\nrules: []\n", "rules must be a non-empty list"),
        ("name: p\nversion: 1\n", "rules must be a non-empty list"),
        (GOOD.replace("    expr: claims.x == 1\n", ""), "rule 'a': expr must be"),
        (GOOD.replace("    reason: x must be 1\n", ""), "rule 'a': reason must be"),
        (GOOD.replace("claims.x == 1", "claims.x =="), "rule 'a': CEL does not compile"),
        (GOOD.replace("claims.x == 1", "claim.x == 1"),
         "rule 'a': unknown variable(s) ['claim']"),
        (GOOD + "  - name: a\n    expr: 'true'\n    reason: again\n",
         "rule 'a' is defined more than once"),
        (GOOD.replace("name: a", "name: A B"), "name must match"),
        (GOOD.replace("    reason:", "    reasn: x\n    reason:"), "unknown field(s) ['reasn']"),
        (GOOD + "extra: 1\n", "policy has unknown field(s) ['extra']"),
        (GOOD + "params:\n  since: 2024-01-01\n", "param 'since' has a value of type date"),
        (GOOD + "params: [1]\n", "params must be a mapping"),
        ("x" * (300 * 1024), "larger than"),
    ],
)
def test_malformed_policies_give_clear_errors(text: str, message: str) -> None:
    with pytest.raises(PolicyError) as info:
        Policy.from_yaml(text)
    assert message in str(info.value)


def test_comprehension_variables_are_not_unknown() -> None:
    pol = Policy.from_yaml(GOOD.replace(
        "claims.x == 1", "params.l.exists(d, d == claims.x)") + "params:\n  l: [1]\n")
    assert pol.evaluate({"x": 1}).allowed
    assert not pol.evaluate({"x": 2}).allowed


def test_digest_is_stable_across_key_order_whitespace_and_quoting() -> None:
    base = Policy.from_yaml(GOOD)
    reordered = Policy.from_yaml(textwrap.dedent("""
        rules:
          -   reason: "x must be 1"
              expr:   'claims.x == 1'
              name: a
        version:    1
        name: "p"
    """))
    flow = Policy.from_yaml(
        '{"name": "p", "version": 1, "rules": [{"name": "a", "expr": "claims.x == 1", '
        '"reason": "x must be 1"}]}')
    assert base.digest == reordered.digest == flow.digest
    assert Policy.from_file(DEV).digest == Policy.from_yaml(DEV.read_text()).digest
    assert Policy.from_yaml(GOOD.replace("== 1", "== 2")).digest != base.digest
    assert Policy.from_yaml(GOOD.replace("version: 1", "version: 2")).digest != base.digest


def test_params_override_changes_digest_and_is_checked() -> None:
    dev = Policy.from_file(DEV)
    tenant = dev.with_params({"allowed_code_digests": [CODE]})
    assert tenant.digest != dev.digest
    assert dev.params["allowed_code_digests"] == []  # the original is unchanged
    with pytest.raises(PolicyError, match="param 'allowed_codes' is not declared"):
        dev.with_params({"allowed_codes": [CODE]})
    with pytest.raises(PolicyError, match="must be a list, got str"):
        dev.with_params({"allowed_code_digests": CODE})


# --- evidence claims and the offline test -------------------------------------------------

def test_evidence_claims_are_authoritative() -> None:
    forged = VerificationResult(
        "tpm2", {"evidence.verified": True, "evidence.kind": "sev-snp", "node.ksm.enabled": False},
        (Failure("tpm2.boot_pcr", "PCR 0 differs"),))
    claims = evidence_claims(forged)
    assert claims["evidence.kind"] == "tpm2"
    assert claims["evidence.verified"] is False
    assert claims["tpm.boot_pcrs_match"] is False
    ok = evidence_claims(VerificationResult("tpm2", {}, ()))
    assert ok["evidence.verified"] is True and ok["tpm.boot_pcrs_match"] is True


def _snp_evidence() -> tuple[bytes, VerificationContext]:
    from attest.snp import encode_evidence, parse_report

    vectors = ROOT.parent / "shared" / "vectors" / "snp" / "virtee-sev"
    if not vectors.is_dir():
        vectors = Path("/work/shared/vectors/snp/virtee-sev")
    report = bytes.fromhex((vectors / "report_milan.hex").read_text().strip())
    evidence = encode_evidence(report, [(vectors / "vcek_milan.der").read_bytes()])
    context = VerificationContext(
        expected_report_data=parse_report(report).report_data,
        reference={"now": dt.datetime(2025, 6, 1, tzinfo=dt.UTC)})
    return evidence, context


SNP_POLICY = """
name: snp-guest
version: 1
params:
  measurements: []
rules:
  - name: evidence-verified
    expr: claims.evidence.kind == 'sev-snp' && claims.evidence.verified
    reason: SEV-SNP evidence must verify
  - name: not-debug
    expr: '!claims.snp.debug'
    reason: debug guests are refused
  - name: measurement
    expr: claims.snp.measurement in params.measurements
    reason: unknown launch measurement
"""
MILAN_MEASUREMENT = ("7a1e5c266c0108dbc9bb94fa926951320940915d0aafb42464bd88b579ea158d"
                     "3e1a0dc39b2c60bd95b9c480cd81841f")


def test_offline_policy_test_on_real_snp_evidence() -> None:
    evidence, context = _snp_evidence()
    decision = policy_mod.test_policy_offline(
        SNP_POLICY, evidence, "sev-snp", context, params={"measurements": [MILAN_MEASUREMENT]})
    assert decision.allowed, decision.summary()
    assert decision.evidence_failures == ()
    denied = policy_mod.test_policy_offline(SNP_POLICY, evidence, "sev-snp", context)
    assert only_failure(denied).name == "measurement"


def test_offline_policy_test_reports_evidence_failures() -> None:
    evidence, context = _snp_evidence()
    tampered = bytearray(evidence)
    tampered[12 + 21] ^= 0x80  # virtee's published negative: report byte 21
    decision = policy_mod.test_policy_offline(
        SNP_POLICY, bytes(tampered), "sev-snp", context,
        params={"measurements": [MILAN_MEASUREMENT]})
    assert [r.name for r in decision.failed] == ["evidence-verified"]
    assert [f.id for f in decision.evidence_failures] == ["snp.signature"]
    assert "snp.signature" in decision.summary()


def test_production_on_snp_evidence_needs_node_facts_and_measurement() -> None:
    evidence, context = _snp_evidence()
    decision = policy_mod.test_policy_offline(PROD.read_text(), evidence, "sev-snp", context)
    failed = {r.name for r in decision.failed}
    assert "evidence-verified" not in failed and "snp-not-debuggable" not in failed
    assert {"snp-measurement-allowed", "ksm-off", "trainer-code-allowed"} <= failed


def test_offline_policy_test_errors() -> None:
    evidence, context = _snp_evidence()
    with pytest.raises(ValueError, match="unknown evidence kind 'sgx'"):
        policy_mod.test_policy_offline(SNP_POLICY, evidence, "sgx", context)
    with pytest.raises(MalformedEvidence, match="TDX quote version"):  # tdx is known now
        policy_mod.test_policy_offline(SNP_POLICY, evidence, "tdx", context)
    with pytest.raises(MalformedEvidence):
        policy_mod.test_policy_offline(SNP_POLICY, evidence[:100], "sev-snp", context)
    with pytest.raises(PolicyError):
        policy_mod.test_policy_offline("name: [", evidence, "sev-snp", context)


def test_tpm2_agent_fact_names_map_to_agreed_claims(dev: Policy, prod: Policy) -> None:
    """attest.facts/attest.code_digest emit underscore names; policies read the agreed ones."""
    facts = {
        "kernel_cmdline": "ro lockdown=integrity init_on_free=1", "kernel_lockdown": "integrity",
        "init_on_free": True, "ptrace_scope": 2, "ksm_enabled": False, "swap_enabled": False,
        "swap_devices": [], "core_rlimit_soft": 0, "core_rlimit_hard": 0,
        "core_dumps_allowed": False, "gpu_present": False, "gpu_count": 0,
        "gpu_compute_mode": "none", "gpu_cc_mode": "none", "gpu_other_processes": 0,
        "container_image_digest": "none", "code_digest": CODE, "python_version": "3.11",
    }
    claims = evidence_claims(VerificationResult("tpm2", facts, ()))
    assert claims["node.container.image_digest"] == ""
    assert claims["node.core_dump.limit"] == 0
    assert dev.evaluate(claims).allowed
    assert prod.evaluate(claims).allowed
    swapping = evidence_claims(VerificationResult("tpm2", {**facts, "swap_enabled": True}, ()))
    assert only_failure(dev.evaluate(swapping)).name == "swap-off"
    agreed_wins = evidence_claims(VerificationResult(
        "tpm2", {**facts, "node.ksm.enabled": True}, ()))
    assert only_failure(dev.evaluate(agreed_wins)).name == "ksm-off"


def test_decision_to_dict_is_json_ready(dev: Policy) -> None:
    import json

    decision = dev.evaluate(good_node(**{"node.swap.enabled": True}))
    data = json.loads(json.dumps(decision.to_dict()))
    assert data["allowed"] is False and data["policy_digest"] == dev.digest
    assert [r["name"] for r in data["rules"] if not r["passed"]] == ["swap-off"]
    assert len(data["rules"]) == len(dev.rules)
