"""``policy lint`` (attest/policy_lint.py): the project's policies lint clean, a misspelt
claim or param is an error with the right suggestion, and the claim catalogue covers every
claim the real verifiers produce on the recorded vectors (so lint cannot go stale silently).
``kms-broker policy put`` running it is tested in tests/kms_broker/test_cli_failures.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from attest.policy import Policy, evidence_claims
from attest.policy_lint import KNOWN_CLAIMS, _known, lint_policy

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "policies").glob("*.yaml")))
def test_project_policies_lint_clean(name: str) -> None:
    policy = Policy.from_file(REPO / "policies" / name)
    assert lint_policy(policy) == []


def _policy(expr: str, params: str = "{}") -> Policy:
    return Policy.from_yaml(f"name: p\nversion: 1\nparams: {params}\nrules:\n"
                            f"  - name: r\n    expr: \"{expr}\"\n    reason: because\n")


def test_misspelt_claim_is_an_error_with_a_suggestion() -> None:
    (finding,) = lint_policy(_policy("claims.node.ksm.enable == false"))
    assert finding.severity == "error" and finding.code == "unknown-claim"
    assert finding.suggestions[0] == "node.ksm.enabled"
    assert "did you mean claims.node.ksm.enabled" in finding.message


def test_unknown_param_is_an_error() -> None:
    (finding,) = lint_policy(_policy("claims.trainer.code_digest in params.allowed_code",
                                     "{allowed_code_digests: []}"))
    assert finding.code == "unknown-param" and finding.suggestions == ("allowed_code_digests",)


def test_prefixes_and_families_are_known() -> None:
    assert lint_policy(_policy("has(claims.snp.tcb.reported.bl)")) == []
    assert lint_policy(_policy("claims.gpus.all(g, g.cc_mode == 'on')")) == []
    assert lint_policy(_policy("has(claims.node.gpu)")) == []


def test_claim_of_another_kind_is_a_warning() -> None:
    policy = Policy.from_yaml(
        "name: p\nversion: 1\nrules:\n"
        "  - {name: k, expr: \"claims.evidence.kind == 'sev-snp'\", reason: r}\n"
        "  - {name: t, expr: \"claims.tdx.debug == false\", reason: r}\n")
    (finding,) = lint_policy(policy)
    assert finding.severity == "warning" and finding.code == "claim-not-from-kind"


def _real_claims() -> dict[str, dict]:
    from tests.attest import test_nvidia, test_snp, test_tdx

    snp = test_snp._verify(*test_snp.virtee())
    tdx = test_tdx._verify(test_tdx._quote("trustee-v4"), now=test_tdx.JULY_2023,
                           collateral=test_tdx._collateral_2023())
    gpu = test_nvidia._verify(test_nvidia._report("nvtrust"), test_nvidia._certs("nvtrust"),
                              rims=test_nvidia._rims())
    return {"sev-snp": evidence_claims(snp), "tdx": evidence_claims(tdx),
            "nvidia-gpu": evidence_claims(gpu)}


def test_catalogue_covers_what_the_verifiers_produce() -> None:
    for kind, claims in _real_claims().items():
        unknown = sorted(c for c in claims if not _known(c, KNOWN_CLAIMS))
        assert unknown == [], f"{kind}: claims missing from attest/policy_lint.py: {unknown}"


def test_catalogue_covers_the_tpm2_node_claims(tmp_path) -> None:
    """What a tpm2 node measures: its facts, the code digest and the job claims."""
    import yaml

    from attest.code_digest import code_digest
    from attest.facts import HostSource, collect_facts
    from attest.policy import local_fact_claims
    from trainer.config import JobConfig
    from trainer.job_identity import job_claims

    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({
        "job_id": "j", "tenant_id": "t", "dataset": {"id": "d", "key_version": 1,
                                                     "manifest": "manifests/" + "0" * 32,
                                                     "store": str(tmp_path)},
        "model": {"name": "tiny-gpt"}, "steps": 1,
        "checkpoint": {"dir": str(tmp_path / "ckpt"), "interval": 1, "keep_last": 1}}))
    claims = {**collect_facts(HostSource(root=Path("/"), gpu_probe=lambda: None)),
              **code_digest().claims(), **job_claims(JobConfig.from_yaml(job))}
    claims = local_fact_claims(claims)
    unknown = sorted(c for c in claims if not _known(c, KNOWN_CLAIMS))
    assert unknown == [], f"tpm2 claims missing from attest/policy_lint.py: {unknown}"
