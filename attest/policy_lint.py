"""``policy lint``: catch the rule that can never pass before a policy is stored.

A rule on a claim no verifier produces fails on every node (CEL: "no such key"), so a typo
such as ``claims.node.ksm.enable`` denies the whole fleet and is found only when training
does not start. :func:`lint_policy` checks every claim path a rule reads
(:attr:`attest.policy.Rule.claim_paths`) against :data:`KNOWN_CLAIMS`, the claims this
project's verifiers and the policy layer can produce (docs/policies.md lists them with their
types), and every ``params.X`` a rule reads against the policy's own ``params``:

- error ``unknown-claim``: no verifier produces the claim, with the closest known names as a
  suggestion;
- error ``unknown-param``: the rule reads a param the policy does not define;
- warning ``claim-not-from-kind``: the policy pins ``claims.evidence.kind`` to kinds (``==``
  or ``in [...]`` in some rule) none of which produces a claim another rule reads.

A path is known when it is a known claim, a prefix of one (``claims.snp.tcb`` reads a map),
or lies under a claim family with open-ended names (:data:`CLAIM_FAMILIES`, e.g.
``snp.tcb.``, ``gpus``). Claims of a third-party verifier plugin are not known here;
``policy put --no-lint`` stores such a policy anyway.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Any

from attest.facts import CLAIM_NAMES
from attest.policy import TPM2_FACT_NAMES, Policy

__all__ = ["CLAIM_FAMILIES", "KNOWN_CLAIMS", "Finding", "lint_policy"]

_COMMON = ("evidence.kind", "evidence.verified")
_TPM2 = (
    *CLAIM_NAMES, *TPM2_FACT_NAMES.values(), "tpm.boot_pcrs_match", "tpm.present",
    "tpm.verified", "code_digest", "python_version", "torch_version", "trainer.code_digest",
    "job.digest", "job.id", "job.tenant", "job.dataset", "job.key_version", "job.model",
    "job.precision", "job.steps", "job.batch_size", "job.grad_accum", "job.seq_len",
    "job.checkpoint.interval", "job.checkpoint.keep_last",
)
_SNP = tuple(f"snp.{n}" for n in (
    "author_key_digest", "author_key_en", "cert_validity", "chain", "chip_id", "cpuid.family",
    "cpuid.model", "cpuid.stepping", "debug", "family_id", "firmware.committed",
    "firmware.current", "guest_svn", "hcl.ak_pub_n", "hcl.user_data", "hcl.var_data",
    "host_data", "id_key_digest", "image_id", "mask_chip_key", "measurement", "migrate_ma",
    "migration_agent", "platform_info", "policy", "policy_abi_major", "policy_abi_minor",
    "product", "product_name", "report_data", "report_id", "report_id_ma", "signature",
    "signing_key", "single_socket", "smt_allowed", "smt_enabled", "stepping", "tcb_binding",
    "tsme_enabled", "version", "vmpl"
))
_TDX = tuple(f"tdx.{n}" for n in (
    "body_type", "collateral.chain", "collateral.missing", "collateral.qe_identity",
    "collateral.tcb_info", "crl", "debug", "fmspc", "hcl.ak_pub_n", "hcl.tdreport",
    "hcl.user_data", "hcl.var_data", "mr_config_id", "mr_owner", "mr_owner_config", "mr_seam",
    "mr_servicetd", "mr_signer_seam", "mr_td", "pce_id", "pck.chain", "pck.revoked",
    "platform_instance_id", "qe.isv_svn", "qe_identity", "qe_report.binding",
    "qe_report.signature", "qe_vendor", "quote.signature", "report_data", "seam_attributes",
    "sept_ve_disable", "tcb", "tcb.status", "td_attributes", "tee_tcb_svn", "version", "xfam",
    "rtmr0", "rtmr1", "rtmr2", "rtmr3"
))
_NVIDIA = tuple(f"nvidia.{n}" for n in (
    "architecture", "board_id", "cc_mode", "cc_ready", "chain", "chip_sku", "compute_mode",
    "driver_version", "ecc", "facts", "fwid", "measurements", "measurements.compared",
    "measurements.count", "measurements.matched", "measurements.mismatched", "mig_mode",
    "nonce", "other_processes", "project", "project_sku", "rim.driver", "rim.missing",
    "rim.vbios", "rim.version", "spdm.signature", "uuid", "vbios_version"
))
_COMPOSITE = ("cpu.debug", "cpu.kind", "cpu.tcb_status", "cpu.verified", "gpu.count", "gpus")

#: Claims by evidence kind (``composite`` carries its CPU and GPU parts' claims too).
CLAIMS_BY_KIND: dict[str, frozenset[str]] = {
    "tpm2": frozenset((*_COMMON, *_TPM2)),
    "sev-snp": frozenset((*_COMMON, *_SNP)),
    "tdx": frozenset((*_COMMON, *_TDX)),
    "nvidia-gpu": frozenset((*_COMMON, *_NVIDIA)),
    "composite": frozenset((*_COMMON, *_COMPOSITE, *_SNP, *_TDX, *_NVIDIA, *_TPM2)),
}
KNOWN_CLAIMS: frozenset[str] = frozenset().union(*CLAIMS_BY_KIND.values())
#: Names under these prefixes are open-ended (per-GPU lists, TCB components, RIM suffixes).
CLAIM_FAMILIES = ("snp.tcb.", "snp.hcl.vm.", "tdx.tcb.", "tdx.hcl.vm.", "nvidia.rim.",
                  "nvidia.facts.", "gpus.", "nvidia.measurements.")
_KIND_PIN = re.compile(r"claims\s*\.\s*evidence\s*\.\s*kind\s*(?:==\s*['\"]([\w-]+)['\"]|"
                       r"in\s*\[([^\]]*)\])")


@dataclass(frozen=True)
class Finding:
    severity: str  # "error" or "warning"
    code: str
    rule: str
    message: str
    suggestions: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"severity": self.severity, "code": self.code, "rule": self.rule,
                "message": self.message, "suggestions": list(self.suggestions)}


def _known(path: str, names: frozenset[str]) -> bool:
    if path in names or any(n.startswith(path + ".") for n in names):
        return True
    return any(path.startswith(f) or path + "." == f for f in CLAIM_FAMILIES)


def _pinned_kinds(policy: Policy) -> set[str]:
    kinds: set[str] = set()
    for rule in policy.rules:
        for m in _KIND_PIN.finditer(rule.expr):
            if m.group(1):
                kinds.add(m.group(1))
            else:
                kinds.update(re.findall(r"['\"]([\w-]+)['\"]", m.group(2)))
    return kinds & set(CLAIMS_BY_KIND)


def lint_policy(policy: Policy) -> list[Finding]:
    """Every finding for ``policy`` (empty: nothing to say); see the module docstring."""
    findings: list[Finding] = []
    kinds = _pinned_kinds(policy)
    for_kinds = frozenset().union(*(CLAIMS_BY_KIND[k] for k in kinds)) if kinds else None
    for rule in policy.rules:
        for path in rule.claim_paths:
            if not _known(path, KNOWN_CLAIMS):
                close = tuple(difflib.get_close_matches(path, sorted(KNOWN_CLAIMS), n=3,
                                                        cutoff=0.6))
                hint = f"; did you mean {' or '.join(f'claims.{c}' for c in close)}?" \
                    if close else " (docs/policies.md lists the claims)"
                findings.append(Finding(
                    "error", "unknown-claim", rule.name,
                    f"rule {rule.name}: no verifier produces claims.{path}, so the rule fails "
                    f"on every node{hint}", close))
            elif for_kinds is not None and not _known(path, for_kinds):
                findings.append(Finding(
                    "warning", "claim-not-from-kind", rule.name,
                    f"rule {rule.name}: claims.{path} is not produced by evidence of kind "
                    f"{', '.join(sorted(kinds))}, which the policy requires"))
        for path in rule.param_paths:
            top = path.split(".", 1)[0]
            if top not in policy.params:
                close = tuple(difflib.get_close_matches(top, sorted(policy.params), n=3))
                hint = f"; did you mean {' or '.join(f'params.{c}' for c in close)}?" \
                    if close else ""
                findings.append(Finding(
                    "error", "unknown-param", rule.name,
                    f"rule {rule.name}: params.{top} is not defined in the policy's params"
                    f"{hint}", close))
    return findings
