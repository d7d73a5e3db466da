"""Release policies: YAML documents whose rules are CEL expressions over evidence claims.

Document (YAML; unknown keys are errors, so a typo cannot silently drop a rule)::

    name: dev-swtpm              # [a-z0-9][a-z0-9_.-]{0,63}
    version: 1                   # positive integer
    description: ...             # optional text
    params:                      # optional: reference values a tenant may override
      allowed_code_digests: []
    rules:                       # at least one; names unique
      - name: ksm-off
        expr: claims.node.ksm.enabled == false
        reason: KSM merges identical pages across VMs and processes   # shown on failure
        help: echo 0 > /sys/kernel/mm/ksm/run                         # optional: how to fix

What CEL sees: ``claims``, the verifier's flat claim names (``node.ksm.enabled``) turned into
nested maps so rules read ``claims.node.ksm.enabled`` and ``has(claims.node.gpu.cc_mode)``
works; and ``params``, the policy's ``params`` with any tenant overrides. Nothing else: a rule
that names another variable is refused when the policy is loaded.

Evaluation: every rule is evaluated and listed in the :class:`Decision`. A rule passes only if
its expression returns ``true``; ``false``, a non-bool, or an evaluation error (a missing
claim, a type mismatch) is a failure with a readable reason naming the claims the rule reads
and their values. The decision allows only if every rule passed.

Digest: hex SHA-256 over canonical JSON (sorted keys, no spaces, UTF-8) of the parsed document
with defaults filled in, so key order, quoting and whitespace do not change it; rule order,
expressions, reasons and params do.

CEL engine: ``common-expression-language`` (Rust ``cel`` crate via PyO3), chosen over
``cel-python`` (``celpy``) because it follows the current CEL spec where the two differ
(heterogeneous numeric comparisons such as ``int >= uint`` and cross-type equality such as
``'x' == 1`` evaluate instead of raising; 17/17 edge cases vs 14/17) and evaluates the
production policy about 30x faster (benchmarks/bench_policy.py measures both; docs/policies.md
has the comparison table).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cel
import yaml

from attest.interface import EvidenceVerifier, Failure, VerificationContext, VerificationResult

__all__ = [
    "TPM2_FACT_NAMES",
    "Decision",
    "Policy",
    "PolicyError",
    "Rule",
    "RuleResult",
    "default_verifiers",
    "evidence_claims",
    "nest_claims",
    "test_policy_offline",
]

MAX_POLICY_BYTES = 256 * 1024
MAX_RULES = 256
MAX_EXPR_CHARS = 4096
MAX_TEXT_CHARS = 4096
MAX_PARAM_DEPTH = 8
CEL_VARIABLES = frozenset({"claims", "params"})
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
_PARAM_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_TOP_KEYS = frozenset({"name", "version", "description", "params", "rules"})
_RULE_KEYS = frozenset({"name", "expr", "reason", "help"})
_BOUND_RE = re.compile(r"\.\s*(?:all|exists|exists_one|map|filter)\s*\(\s*([A-Za-z_]\w*)\s*,")
_CLAIM_PATH_RE = re.compile(r"\bclaims((?:\s*\.\s*[A-Za-z_]\w*\b(?!\s*\())+)")
_PARAM_PATH_RE = re.compile(r"\bparams((?:\s*\.\s*[A-Za-z_]\w*\b(?!\s*\())+)")


class PolicyError(ValueError):
    """A policy document that cannot be used; the message names the rule or field."""


@dataclass(frozen=True, slots=True)
class RuleResult:
    name: str
    passed: bool
    reason: str


@dataclass(frozen=True, slots=True)
class Decision:
    policy_name: str
    policy_digest: str
    allowed: bool
    rules: tuple[RuleResult, ...]
    evidence_failures: tuple[Failure, ...] = ()

    @property
    def failed(self) -> tuple[RuleResult, ...]:
        return tuple(r for r in self.rules if not r.passed)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (for the Attest reply, the audit log and ``policy test``)."""
        return {
            "policy": self.policy_name,
            "policy_digest": self.policy_digest,
            "allowed": self.allowed,
            "rules": [{"name": r.name, "passed": r.passed, "reason": r.reason}
                      for r in self.rules],
            "evidence_failures": [{"id": f.id, "severity": f.severity, "message": f.message}
                                  for f in self.evidence_failures],
        }

    def summary(self) -> str:
        """Multi-line text: one line per rule, PASS/FAIL and the reason."""
        head = f"policy {self.policy_name} ({self.policy_digest[:12]}): " + (
            "ALLOWED" if self.allowed else f"DENIED ({len(self.failed)} rule(s) failed)")
        lines = [head]
        lines += [f"  {'PASS' if r.passed else 'FAIL'} {r.name}: {r.reason}" for r in self.rules]
        lines += [f"  evidence {f.severity} {f.id}: {f.message}" for f in self.evidence_failures]
        return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    expr: str
    reason: str
    help: str
    claim_paths: tuple[str, ...]
    param_paths: tuple[str, ...]
    program: Any = field(repr=False, compare=False)


def _fail(msg: str) -> PolicyError:
    return PolicyError(msg)


def _text(value: Any, where: str, *, required: bool, limit: int = MAX_TEXT_CHARS) -> str:
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value.strip()):
        raise _fail(f"{where} must be a non-empty string")
    if len(value) > limit:
        raise _fail(f"{where} is longer than {limit} characters")
    return value


def _check_param_value(value: Any, where: str, depth: int = 0) -> Any:
    if depth > MAX_PARAM_DEPTH:
        raise _fail(f"{where} is nested more than {MAX_PARAM_DEPTH} levels")
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _fail(f"{where} must be a finite number")
        return value
    if isinstance(value, list | tuple):
        return [_check_param_value(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise _fail(f"{where} has a non-string key {k!r}")
            out[k] = _check_param_value(v, f"{where}.{k}", depth + 1)
        return out
    raise _fail(f"{where} has a value of type {type(value).__name__}; use strings, numbers, "
                "booleans, lists or maps (quote dates and digests)")


def _compile_rule(raw: Any, index: int) -> Rule:
    where = f"rule #{index + 1}"
    if not isinstance(raw, Mapping):
        raise _fail(f"{where} must be a mapping with name, expr and reason")
    name = raw.get("name")
    if isinstance(name, str) and name:
        where = f"rule {name!r}"
    unknown = set(raw) - _RULE_KEYS
    if unknown:
        raise _fail(f"{where} has unknown field(s) {sorted(map(str, unknown))}; allowed: "
                    f"{sorted(_RULE_KEYS)}")
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise _fail(f"{where}: name must match [a-z0-9][a-z0-9_.-]{{0,63}}")
    expr = _text(raw.get("expr"), f"{where}: expr", required=True, limit=MAX_EXPR_CHARS)
    reason = _text(raw.get("reason"), f"{where}: reason", required=True)
    help_text = _text(raw.get("help"), f"{where}: help", required=False)
    try:
        program = cel.compile(expr)
    except (ValueError, RuntimeError) as exc:
        detail = str(exc).splitlines()
        raise _fail(f"{where}: CEL does not compile: {' '.join(d.strip() for d in detail)}") \
            from None
    bound = set(_BOUND_RE.findall(expr))
    stray = set(program.variables()) - CEL_VARIABLES - bound
    if stray:
        raise _fail(f"{where}: unknown variable(s) {sorted(stray)}; rules may only read "
                    "'claims' and 'params'")
    paths, param_paths = (
        tuple(dict.fromkeys(re.sub(r"\s+", "", m)[1:] for m in regex.findall(expr)))
        for regex in (_CLAIM_PATH_RE, _PARAM_PATH_RE))
    return Rule(name=name, expr=expr, reason=reason, help=help_text, claim_paths=paths,
                param_paths=param_paths, program=program)


def nest_claims(claims: Mapping[str, Any]) -> dict[str, Any]:
    """Flat dotted claim names -> nested maps; ValueError when a name is both leaf and group."""
    root: dict[str, Any] = {}
    for key in sorted(claims):
        if not isinstance(key, str) or not key:
            raise ValueError(f"claim name {key!r} is not a non-empty string")
        parts = key.split(".")
        node = root
        for i, part in enumerate(parts[:-1]):
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ValueError(f"claim {'.'.join(parts[:i + 1])!r} is both a value and a "
                                 f"group (of {key!r})")
            node = nxt
        value = claims[key]
        if isinstance(value, tuple):
            value = list(value)
        if parts[-1] in node:
            raise ValueError(f"claim {key!r} is both a value and a group")
        node[parts[-1]] = value
    return root


def _lookup(nested: Mapping[str, Any], path: str) -> tuple[bool, Any]:
    node: Any = nested
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _show(value: Any) -> str:
    if isinstance(value, Mapping):
        return "{...}"
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


class Policy:
    """A parsed, validated policy; immutable. Build with :meth:`from_yaml`/:meth:`from_file`."""

    __slots__ = ("_doc", "description", "digest", "name", "params", "rules", "version")

    def __init__(self, *, name: str, version: int, description: str,
                 params: Mapping[str, Any], rules: Sequence[Rule]) -> None:
        self.name = name
        self.version = version
        self.description = description
        self.params: Mapping[str, Any] = params
        self.rules: tuple[Rule, ...] = tuple(rules)
        self._doc = {
            "name": name,
            "version": version,
            "description": description,
            "params": params,
            "rules": [{"name": r.name, "expr": r.expr, "reason": r.reason, "help": r.help}
                      for r in self.rules],
        }
        canonical = json.dumps(self._doc, sort_keys=True, separators=(",", ":"),
                               ensure_ascii=False).encode()
        self.digest = hashlib.sha256(canonical).hexdigest()

    def __repr__(self) -> str:
        return f"Policy(name={self.name!r}, version={self.version}, digest={self.digest[:12]})"

    @classmethod
    def from_yaml(cls, text: str) -> Policy:
        if not isinstance(text, str):
            raise TypeError("policy text must be str")
        if len(text.encode()) > MAX_POLICY_BYTES:
            raise _fail(f"policy is larger than {MAX_POLICY_BYTES} bytes")
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(exc, "problem", None) or "invalid YAML"
            raise _fail(f"policy is not valid YAML{where}: {problem}") from None
        except ValueError as exc:  # an integer past Python's 4300-digit conversion limit
            raise _fail(f"policy is not valid YAML: {exc}") from None
        except RecursionError:
            raise _fail("policy is nested too deeply") from None
        try:
            return cls.from_mapping(doc)
        except RecursionError:
            raise _fail("policy is nested too deeply") from None

    @classmethod
    def from_file(cls, path: str | Path) -> Policy:
        p = Path(path)
        size = p.stat().st_size
        if size > MAX_POLICY_BYTES:
            raise _fail(f"{p} is larger than {MAX_POLICY_BYTES} bytes")
        return cls.from_yaml(p.read_text(encoding="utf-8"))

    @classmethod
    def from_mapping(cls, doc: Any) -> Policy:
        if not isinstance(doc, Mapping):
            raise _fail("policy must be a YAML mapping with name, version and rules")
        unknown = set(doc) - _TOP_KEYS
        if unknown:
            raise _fail(f"policy has unknown field(s) {sorted(map(str, unknown))}; allowed: "
                        f"{sorted(_TOP_KEYS)}")
        name = doc.get("name")
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
            raise _fail("policy name is missing or does not match [a-z0-9][a-z0-9_.-]{0,63}")
        version = doc.get("version")
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise _fail("policy version must be a positive integer")
        description = _text(doc.get("description"), "policy description", required=False)
        params_raw = doc.get("params") or {}
        if not isinstance(params_raw, Mapping):
            raise _fail("policy params must be a mapping")
        params: dict[str, Any] = {}
        for key, value in params_raw.items():
            if not isinstance(key, str) or not _PARAM_RE.fullmatch(key):
                raise _fail(f"param name {key!r} must match [A-Za-z_][A-Za-z0-9_]{{0,63}}")
            params[key] = _check_param_value(value, f"param {key!r}")
        rules_raw = doc.get("rules")
        if not isinstance(rules_raw, list) or not rules_raw:
            raise _fail("policy rules must be a non-empty list")
        if len(rules_raw) > MAX_RULES:
            raise _fail(f"policy has more than {MAX_RULES} rules")
        rules: list[Rule] = []
        seen: set[str] = set()
        for i, raw in enumerate(rules_raw):
            rule = _compile_rule(raw, i)
            if rule.name in seen:
                raise _fail(f"rule {rule.name!r} is defined more than once")
            seen.add(rule.name)
            rules.append(rule)
        return cls(name=name, version=version, description=description, params=params,
                   rules=rules)

    def with_params(self, overrides: Mapping[str, Any]) -> Policy:
        """A copy with tenant-supplied reference values; only declared params, same type."""
        params = dict(self.params)
        for key, value in overrides.items():
            if key not in params:
                raise _fail(f"param {key!r} is not declared by policy {self.name!r}; "
                            f"declared: {sorted(params)}")
            checked = _check_param_value(value, f"param {key!r}")
            if params[key] is not None and type(checked) is not type(params[key]):
                raise _fail(f"param {key!r} must be a {type(params[key]).__name__}, "
                            f"got {type(checked).__name__}")
            params[key] = checked
        return Policy(name=self.name, version=self.version, description=self.description,
                      params=params, rules=self.rules)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(self._doc))

    def evaluate(self, claims: Mapping[str, Any]) -> Decision:
        """Evaluate every rule over ``claims`` (flat dotted names or already nested maps)."""
        try:
            nested = nest_claims(claims)
        except ValueError as exc:
            reason = f"claims are inconsistent: {exc}"
            results = tuple(RuleResult(r.name, False, reason) for r in self.rules)
            return Decision(self.name, self.digest, False, results)
        context = cel.Context({"claims": nested, "params": dict(self.params)})
        results = tuple(self._run(rule, context, nested) for rule in self.rules)
        return Decision(self.name, self.digest, all(r.passed for r in results), results)

    def _observed(self, rule: Rule, nested: Mapping[str, Any]) -> tuple[str, list[str]]:
        shown, missing = [], []
        for path in rule.param_paths:
            found, value = _lookup(self.params, path)
            if found and not isinstance(value, list | Mapping):
                shown.append(f"params.{path}={_show(value)}")
        for path in rule.claim_paths:
            found, value = _lookup(nested, path)
            if found:
                shown.append(f"{path}={_show(value)}")
            elif not any(p != path and path.startswith(p + ".") and not _lookup(nested, p)[0]
                         for p in rule.claim_paths):
                missing.append(path)
        return ", ".join(shown), missing

    def _run(self, rule: Rule, context: Any, nested: Mapping[str, Any]) -> RuleResult:
        try:
            value = rule.program.execute(context)
            error = None
        except Exception as exc:  # any CEL runtime error fails the rule, never escapes
            value, error = None, exc
        if value is True:
            return RuleResult(rule.name, True, "ok")
        observed, missing = self._observed(rule, nested)
        if error is not None:
            if missing:
                why = f"missing claim(s) {', '.join(missing)}"
            else:
                why = f"could not evaluate ({type(error).__name__}: " \
                      f"{str(error).splitlines()[0][:160]})"
        elif value is False:
            why = "false"
        else:
            why = f"expression returned {type(value).__name__}, not bool"
        detail = f"{rule.reason} [{why}" + (f"; observed {observed}" if observed else "") + "]"
        if rule.help:
            detail += f" Fix: {rule.help}"
        return RuleResult(rule.name, False, detail)


# The tpm2 node agent (attest.facts, attest.code_digest) names facts without the agreed
# dotted prefixes; they are mapped here so policies read one naming (docs/policies.md).
# An agreed name the verifier already emits is never overwritten.
TPM2_FACT_NAMES: dict[str, str] = {
    "kernel_cmdline": "node.kernel.cmdline",
    "kernel_lockdown": "node.lockdown",
    "init_on_free": "node.init_on_free",
    "ptrace_scope": "node.ptrace_scope",
    "ksm_enabled": "node.ksm.enabled",
    "swap_enabled": "node.swap.enabled",
    "core_rlimit_soft": "node.core_dump.limit",
    "gpu_present": "node.gpu.present",
    "gpu_compute_mode": "node.gpu.compute_mode",
    "gpu_cc_mode": "node.gpu.cc_mode",
    "gpu_other_processes": "node.gpu.other_processes",
    "container_image_digest": "node.container.image_digest",
    "code_digest": "trainer.code_digest",
}


def local_fact_claims(facts: Mapping[str, Any]) -> dict[str, Any]:
    """``facts`` (the node agent's names) plus the agreed name of each
    (:data:`TPM2_FACT_NAMES`; ``container_image_digest`` "none" becomes ""). An agreed name
    already present is never overwritten. Adds nothing that verification establishes."""
    claims = dict(facts)
    for raw, agreed in TPM2_FACT_NAMES.items():
        if raw in claims and agreed not in claims:
            value = claims[raw]
            if raw == "container_image_digest" and value == "none":
                value = ""
            claims[agreed] = value
    return claims


def evidence_claims(result: VerificationResult) -> dict[str, Any]:
    """The claims a policy sees for one verification result.

    Adds the authoritative ``evidence.kind`` and ``evidence.verified`` (no error failure),
    overriding whatever the verifier put there. For ``tpm2``: maps the node agent's fact names
    to the agreed ones (:data:`TPM2_FACT_NAMES`; ``container_image_digest`` "none" becomes
    ""), and sets ``tpm.boot_pcrs_match`` (no ``tpm2.boot_pcr*`` failure) unless present.
    """
    claims = dict(result.claims)
    claims["evidence.kind"] = result.kind
    claims["evidence.verified"] = result.ok
    if result.kind == "tpm2":
        claims = local_fact_claims(claims)
        if "tpm.boot_pcrs_match" not in claims:
            claims["tpm.boot_pcrs_match"] = result.ok and not any(
                f.id.startswith("tpm2.boot_pcr") for f in result.failures)
    return claims


def default_verifiers() -> dict[str, EvidenceVerifier]:
    """Every verifier the broker offers, by kind."""
    from attest.nvidia import NvidiaGpuVerifier
    from attest.snp import SnpVerifier
    from attest.tdx import TdxVerifier

    verifiers: dict[str, EvidenceVerifier] = {
        "sev-snp": SnpVerifier(), "tdx": TdxVerifier(), "nvidia-gpu": NvidiaGpuVerifier()}
    try:
        from attest.tpm2.verifier import Tpm2Verifier
    except ImportError:  # pragma: no cover - the tpm2 package is part of this project
        pass
    else:
        verifiers["tpm2"] = Tpm2Verifier()
    from attest.composite import CompositeVerifier

    verifiers["composite"] = CompositeVerifier(dict(verifiers))
    return verifiers


def test_policy_offline(policy_text: str, evidence: bytes, kind: str,
                        context: VerificationContext, *,
                        params: Mapping[str, Any] | None = None,
                        verifiers: Mapping[str, EvidenceVerifier] | None = None) -> Decision:
    """Verify ``evidence`` of ``kind`` and evaluate the policy, as the broker's Attest does.

    Raises :class:`PolicyError` for a bad policy (or params), ``ValueError`` for an unknown
    kind, and :class:`~attest.interface.MalformedEvidence` for unparsable evidence. Evidence
    that parses but fails verification gives a Decision whose ``evidence_failures`` say why
    (and whose evidence rule fails).
    """
    policy = Policy.from_yaml(policy_text)
    if params:
        policy = policy.with_params(params)
    table = dict(verifiers) if verifiers is not None else default_verifiers()
    verifier = table.get(kind)
    if verifier is None:
        raise ValueError(f"unknown evidence kind {kind!r}; known: {sorted(table)}")
    result = verifier.verify(evidence, context)
    decision = policy.evaluate(evidence_claims(result))
    return Decision(decision.policy_name, decision.policy_digest, decision.allowed,
                    decision.rules, result.failures)


test_policy_offline.__test__ = False  # type: ignore[attr-defined]  # not a pytest test
