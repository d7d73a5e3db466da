"""``attest doctor``: what this node would be refused for, said honestly.

The doctor runs on the node, without the broker. It can judge a policy rule only when every
input of the rule is known here:

* claims that come from this node's own facts and code digest (``attest.facts``,
  ``attest.code_digest``, under the agreed names of :data:`attest.policy.TPM2_FACT_NAMES`);
* params that are constants of the policy file (a non-empty value), or reference values the
  tenant gave on the command line (``--expected-code-digest``, ``--expected FILE``).

Everything else is decided by the broker from verified evidence or from reference values the
doctor does not have: ``evidence.*`` (was the quote verified), ``tpm.boot_pcrs_match``, the
TEE and GPU verifiers' claims, an empty allow-list the tenant fills at the broker. A rule
that needs one of them is reported as ``not checked`` with what it needs, never as PASS.

The CPU-TEE and GPU sections say what this machine offers, never PASS either:
``present``/``not present`` for SEV-SNP (``/dev/sev-guest``), TDX (``/dev/tdx_guest``), the
kernel's configfs-tsm report interface (``/sys/kernel/config/tsm/report``), and NVIDIA GPUs
(NVML when ``pynvml`` is importable and the root is ``/``, else ``/dev/nvidia<N>`` nodes).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from attest.policy import Policy, local_fact_claims, nest_claims

__all__ = ["DoctorRule", "Presence", "check_rules", "hardware_sections"]

Status = Literal["pass", "fail", "not checked"]


@dataclass(frozen=True, slots=True)
class DoctorRule:
    name: str
    status: Status
    reason: str
    fix: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status,
                "passed": {"pass": True, "fail": False}.get(self.status),
                "reason": self.reason, "fix": self.fix}


@dataclass(frozen=True, slots=True)
class Presence:
    section: str  # "cpu-tee" | "gpu"
    name: str
    present: bool
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return {"section": self.section, "name": self.name,
                "status": "present" if self.present else "not present", "detail": self.detail}


def _known(value: Any) -> bool:
    return value is not None and value != [] and value != {} and value != ""


def _lookup(nested: Mapping[str, Any], path: str) -> bool:
    node: Any = nested
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False
        node = node[part]
    return True


def check_rules(policy: Policy, facts: Mapping[str, Any],
                given: Mapping[str, Any]) -> list[DoctorRule]:
    """Judge each rule of ``policy`` on this node's ``facts`` (raw agent names) with the
    tenant's reference values ``given`` (param name -> value)."""
    policy = policy.with_params(given) if given else policy
    claims = local_fact_claims(facts)
    nested = nest_claims(claims)
    known_params = {k for k, v in policy.params.items() if k in given or _known(v)}
    decision = policy.evaluate(claims)
    results = {r.name: r for r in decision.rules}
    out = []
    for rule in policy.rules:
        result = results[rule.name]
        unknown_params = [p for p in rule.param_paths if p.split(".")[0] not in known_params]
        missing = [p for p in rule.claim_paths if not _lookup(nested, p)]
        if unknown_params:
            need = ", ".join(f"params.{p}" for p in unknown_params)
            hint = (" (give --expected-code-digest)" if any(
                "code_digest" in p for p in unknown_params) else " (give --expected FILE)")
            out.append(DoctorRule(rule.name, "not checked",
                                  f"needs the tenant's reference value {need}{hint}", rule.help))
        elif result.passed:
            out.append(DoctorRule(rule.name, "pass", result.reason, rule.help))
        elif missing:
            out.append(DoctorRule(
                rule.name, "not checked",
                f"needs {', '.join(missing)}, which only the broker's verification of the "
                "evidence establishes (see `attest verify`)", rule.help))
        else:
            out.append(DoctorRule(rule.name, "fail", result.reason, rule.help))
    return out


def _nvml() -> list[Presence] | None:
    try:
        import pynvml  # type: ignore[import-not-found]
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # NVML present but no driver / no device
        return [Presence("gpu", "nvidia", False, f"NVML: {type(exc).__name__}: {exc}")]
    try:
        count = pynvml.nvmlDeviceGetCount()
        names = [pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(i))
                 for i in range(count)]
    finally:
        pynvml.nvmlShutdown()
    return [Presence("gpu", "nvidia", bool(count),
                     f"NVML: {count} device(s)" + (f": {', '.join(map(str, names))}"
                                                   if names else ""))]


def hardware_sections(root: Path) -> list[Presence]:
    """What CPU TEE and GPU this machine offers (``root``: read paths under it)."""
    def node(rel: str) -> Path:
        return root / rel.lstrip("/")

    found = [
        Presence("cpu-tee", "sev-snp", node("/dev/sev-guest").exists(), "/dev/sev-guest"),
        Presence("cpu-tee", "tdx", node("/dev/tdx_guest").exists(), "/dev/tdx_guest"),
        Presence("cpu-tee", "configfs-tsm", node("/sys/kernel/config/tsm/report").is_dir(),
                 "/sys/kernel/config/tsm/report"),
    ]
    gpu = _nvml() if str(root) == "/" else None
    if gpu is None:
        dev = node("/dev")
        nodes = sorted(p.name for p in dev.glob("nvidia*") if re.fullmatch(r"nvidia\d+", p.name)) \
            if dev.is_dir() else []
        gpu = [Presence("gpu", "nvidia", bool(nodes),
                        "device nodes: " + (", ".join(f"/dev/{n}" for n in nodes) or "none"))]
    return found + gpu
