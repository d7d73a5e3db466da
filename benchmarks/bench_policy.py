"""Policy evaluation and SEV-SNP verification, side by side with what they contain.

1. CEL correctness: a table of edge-case expressions, the CEL spec's answer, and what
   ``common-expression-language`` (Rust, what attest.policy uses) and ``cel-python`` (celpy,
   pure Python) give.
2. Policy evaluation: the shipped production policy (19 rules) over a hardened GPU node's
   claims through ``Policy.evaluate`` (ours: nesting claims, every rule, reasons), the same
   compiled programs executed bare with the Rust engine, and with celpy.
3. SEV-SNP: ``SnpVerifier.verify`` on a real Milan report (container parse, report parse,
   ECDSA P-384, VCEK <- ASK <- ARK RSA-PSS, TCB/chip-id binding) beside the one raw ECDSA
   P-384 verification it contains, and beside the raw RSA-4096 PSS chain links.

Run: ``.venv/bin/python -m benchmarks policy`` (``--quick`` for fewer iterations).
"""

from __future__ import annotations

import datetime as dt
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cel
import celpy

from attest.interface import VerificationContext
from attest.policy import Policy, nest_claims
from attest.snp import SnpVerifier, encode_evidence, parse_report
from attest.snp.certs import AmdTrustStore, load_certificate, pss_signed_by
from attest.snp.verifier import verify_report_signature

ROOT = Path(__file__).resolve().parents[1]
VECTORS = ROOT.parent / "shared" / "vectors"
if not VECTORS.is_dir():
    VECTORS = Path("/work/shared/vectors")

# (expression, claims, what the CEL spec says: a value or "error")
CORRECTNESS: list[tuple[str, dict[str, Any], object]] = [
    ("claims.n >= 2u", {"n": 2}, True),
    ("claims.s == 1", {"s": "x"}, False),
    ("claims.n == 2.0", {"n": 2}, True),
    ("has(claims.a.b)", {"a": {"b": 1}}, True),
    ("has(claims.a.c)", {"a": {"b": 1}}, False),
    ("claims.missing == 1", {}, "error"),
    ("true || claims.missing", {}, True),
    ("claims.missing || true", {}, True),
    ("claims.s in ['x', 'y']", {"s": "y"}, True),
    ("'k' in claims.m", {"m": {"k": 1}}, True),
    ("claims.s.startsWith('sha256:')", {"s": "sha256:ab"}, True),
    ("claims.s.matches('^[0-9a-f]+$')", {"s": "00af"}, True),
    ("size(claims.s) == 4", {"s": "00af"}, True),
    ("claims.n / 0 == 1", {"n": 1}, "error"),
    ("claims.n + 1 > 0", {"n": 2**63 - 1}, "error"),
    ("timestamp('2026-01-01T00:00:00Z') > timestamp('2025-01-01T00:00:00Z')", {}, True),
    ("claims.l.exists(x, x == 'b')", {"l": ["a", "b"]}, True),
]


def _rust(expr: str, claims: dict[str, Any]) -> object:
    try:
        return cel.compile(expr).execute({"claims": claims, "params": {}})
    except Exception:
        return "error"


_CELPY_ENV = celpy.Environment()


def _celpy(expr: str, claims: dict[str, Any]) -> object:
    try:
        program = _CELPY_ENV.program(_CELPY_ENV.compile(expr))
        value = program.evaluate({"claims": celpy.json_to_cel(claims),
                                  "params": celpy.json_to_cel({})})
        return bool(value) if isinstance(value, celpy.celtypes.BoolType) else value
    except Exception:
        return "error"


def _per_call_us(fn: Callable[[], object], iterations: int, repeats: int = 5) -> float:
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iterations):
            fn()
        samples.append((time.perf_counter() - start) / iterations * 1e6)
    return statistics.median(samples)


def _goal(name: str, value: float, op: str, target: float, unit: str = "") -> None:
    met = value <= target if op == "<=" else value >= target
    shown = f"{value:d}" if isinstance(value, int) else f"{value:.1f}"
    print(f"goal {name}: {shown}{unit} (target {op} {target:g}{unit}) "
          f"{'met' if met else 'missed'}")


def correctness() -> tuple[int, int]:
    print(f"{'expression':62} {'spec':6} {'cel-rust':9} {'celpy':6}")
    rust_ok = celpy_ok = 0
    for expr, claims, spec in CORRECTNESS:
        r, p = _rust(expr, claims), _celpy(expr, claims)
        rust_ok += r == spec
        celpy_ok += p == spec
        print(f"{expr[:62]:62} {spec!s:6} {r!s:9} {p!s:6}")
    print(f"spec agreement: cel-rust {rust_ok}/{len(CORRECTNESS)}, "
          f"celpy {celpy_ok}/{len(CORRECTNESS)}")
    return rust_ok, celpy_ok


def policy_speed(quick: bool) -> tuple[float, float, float]:
    policy = Policy.from_file(ROOT / "policies" / "production.yaml").with_params(
        {"allowed_code_digests": ["5f" * 32]})
    claims = {
        "evidence.kind": "tpm2", "evidence.verified": True, "tpm.boot_pcrs_match": True,
        "node.kernel.cmdline": "ro lockdown=integrity init_on_free=1",
        "node.ksm.enabled": False, "node.swap.enabled": False, "node.core_dump.limit": 0,
        "node.ptrace_scope": 2, "node.lockdown": "integrity", "node.init_on_free": True,
        "node.gpu.present": True, "node.gpu.compute_mode": "Exclusive_Process",
        "node.gpu.cc_mode": "on", "node.gpu.other_processes": 0,
        "node.container.image_digest": "", "trainer.code_digest": "5f" * 32,
    }
    assert policy.evaluate(claims).allowed
    nested = nest_claims(claims)
    params = dict(policy.params)
    programs = [r.program for r in policy.rules]

    def rust_bare() -> None:
        ctx = cel.Context({"claims": nested, "params": params})
        for p in programs:
            p.execute(ctx)

    celpy_programs = [_CELPY_ENV.program(_CELPY_ENV.compile(r.expr)) for r in policy.rules]
    activation = {"claims": celpy.json_to_cel(nested), "params": celpy.json_to_cel(params)}
    for prog in celpy_programs:
        assert bool(prog.evaluate(activation))

    def celpy_bare() -> None:
        act = {"claims": celpy.json_to_cel(nested), "params": celpy.json_to_cel(params)}
        for prog in celpy_programs:
            prog.evaluate(act)

    n = 200 if quick else 2000
    ours = _per_call_us(lambda: policy.evaluate(claims), n)
    rust = _per_call_us(rust_bare, n)
    py = _per_call_us(celpy_bare, max(20, n // 10))
    rules = len(policy.rules)
    print(f"production policy, {rules} rules, hardened GPU node (per evaluation of all rules):")
    print(f"  Policy.evaluate (ours, cel-rust)   {ours:9.1f} us  ({ours / rules:.1f} us/rule)")
    print(f"  cel-rust programs bare             {rust:9.1f} us  (ours/bare {ours / rust:.2f}x)")
    print(f"  celpy programs bare                {py:9.1f} us  (celpy/cel-rust {py / rust:.1f}x)")
    return ours, rust, py


def snp_speed(quick: bool) -> tuple[float, float]:
    base = VECTORS / "snp" / "virtee-sev"
    report = bytes.fromhex((base / "report_milan.hex").read_text().strip())
    vcek_der = (base / "vcek_milan.der").read_bytes()
    evidence = encode_evidence(report, [vcek_der])
    context = VerificationContext(
        expected_report_data=parse_report(report).report_data,
        reference={"now": dt.datetime(2025, 6, 1, tzinfo=dt.UTC)})
    verifier = SnpVerifier()
    assert verifier.verify(evidence, context).ok
    parsed = parse_report(report)
    vcek = load_certificate(vcek_der, "vcek")
    store = AmdTrustStore.bundled()
    ask, ark = store.intermediates["SEV-Milan"], store.arks["ARK-Milan"]
    n = 50 if quick else 300
    full = _per_call_us(lambda: verifier.verify(evidence, context), n)
    ecdsa = _per_call_us(lambda: verify_report_signature(parsed, vcek), n)
    rsa = _per_call_us(lambda: (pss_signed_by(vcek, ask), pss_signed_by(ask, ark)), n)
    print("SEV-SNP report verification (virtee Milan v2, per report):")
    print(f"  SnpVerifier.verify (everything)    {full:9.1f} us")
    print(f"  raw ECDSA P-384 report signature   {ecdsa:9.1f} us  (verify/raw {full / ecdsa:.2f}x)")
    print(f"  raw RSA-4096 PSS x2 (VCEK, ASK)    {rsa:9.1f} us")
    print(f"  everything else (parsing, binding) {full - ecdsa - rsa:9.1f} us")
    return full, ecdsa


def main(quick: bool) -> None:
    rust_ok, celpy_ok = correctness()
    print()
    ours, rust, py = policy_speed(quick)
    print()
    full, ecdsa = snp_speed(quick)
    print()
    _goal("cel_rust_spec_agreement", rust_ok, ">=", len(CORRECTNESS))
    _goal("policy_eval_us", ours, "<=", 200, " us")
    _goal("policy_overhead_vs_bare_cel", ours / rust, "<=", 3, "x")
    _goal("celpy_slower_than_cel_rust", py / rust, ">=", 5, "x")
    _goal("snp_verify_us", full, "<=", 5000, " us")
    _goal("snp_verify_vs_raw_ecdsa", full / ecdsa, "<=", 3, "x")
    print(f"(celpy agrees with the spec on {celpy_ok}/{len(CORRECTNESS)})")


if __name__ == "__main__":
    import sys

    main(quick="--quick" in sys.argv)
