"""Composite evidence from the software TEE through the production verifiers and
policies/production-gpu-cc.yaml, offline (the broker runs the same code; the end-to-end tests
in tests/integration/test_composite_e2e.py go through two real brokers).

Each denial the issue names is shown here with the rule that names it: a missing GPU report,
a GPU report from another session, a debug TD, an out-of-date TCB, a GPU not in CC mode.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from attest.composite import (
    CompositeEvidence,
    CompositeVerifier,
    decode_composite,
    encode_composite,
)
from attest.interface import MalformedEvidence, VerificationContext, VerificationResult
from attest.policy import Decision, Policy, evidence_claims
from tests.attest.softtee import OUT_OF_DATE_TEE_TCB_SVN, SoftGpu, SoftTdx, composite_evidence

POLICY = (Path(__file__).resolve().parents[2] / "policies" / "production-gpu-cc.yaml")
RTMR3 = hashlib.sha384(b"approved trainer code").digest()


def approved_image() -> dict[str, str]:
    """The software TD's image measurements, as a tenant would pin them (see softtee)."""
    from tests.attest.softtee import SOFT_TD_MEASUREMENTS

    return {**SOFT_TD_MEASUREMENTS, "rtmr3": RTMR3.hex()}


@pytest.fixture(scope="module")
def tee(tmp_path_factory: pytest.TempPathFactory) -> tuple[SoftTdx, list[SoftGpu]]:
    root = tmp_path_factory.mktemp("softtee")
    return SoftTdx.create(root / "tdx"), [SoftGpu.create(root / f"gpu{i}") for i in range(2)]


def _reference(tee: tuple[SoftTdx, list[SoftGpu]]) -> dict[str, object]:
    tdx, gpus = tee
    # both test GPUs share one RIM pair; each GPU has its own device root
    nvidia = gpus[0].reference()
    nvidia["device_roots"] = [r for g in gpus for r in g.reference()["device_roots"]]
    return {"tdx": tdx.reference(), "nvidia-gpu": nvidia}


def _verify(tee: tuple[SoftTdx, list[SoftGpu]], evidence: bytes, binding: bytes,
            reference: dict[str, object] | None = None) -> VerificationResult:
    return CompositeVerifier().verify(evidence, VerificationContext(
        expected_report_data=binding,
        reference=_reference(tee) if reference is None else reference))


def _decide(result: VerificationResult, gpus: int = 2) -> Decision:
    policy = Policy.from_yaml(POLICY.read_text()).with_params(
        {"gpus_per_node": gpus, "allowed_tdx_images": [approved_image()]})
    return policy.evaluate(evidence_claims(result))


def _failed_rules(decision: Decision) -> set[str]:
    return {r.name for r in decision.rules if not r.passed}


def _ids(result: VerificationResult) -> set[str]:
    return {f.id for f in result.failures if f.severity == "error"}


@pytest.fixture()
def binding() -> bytes:
    return os.urandom(32)


def test_a_composite_node_is_allowed(tee, binding) -> None:
    tdx, gpus = tee
    result = _verify(tee, composite_evidence(tdx, gpus, binding, rtmr3=RTMR3), binding)
    assert result.ok and result.failures == ()
    c = result.claims
    assert (c["cpu.kind"], c["cpu.debug"], c["cpu.tcb_status"], c["gpu.count"]) == (
        "tdx", False, "UpToDate", 2)
    assert [g["uuid"] for g in c["gpus"]] == ["GPU-soft-0", "GPU-soft-1"]
    assert all(g["measurements_matched"] and g["cc_mode"] == "on" for g in c["gpus"])
    decision = _decide(result)
    assert decision.allowed, [(r.name, r.reason) for r in decision.rules if not r.passed]


def test_a_missing_gpu_report_is_denied_by_gpu_count(tee, binding) -> None:
    tdx, gpus = tee
    result = _verify(tee, composite_evidence(tdx, gpus[:1], binding, rtmr3=RTMR3), binding)
    assert result.ok
    assert _failed_rules(_decide(result)) == {"gpu-count"}


def test_a_gpu_report_from_another_session_is_denied(tee, binding) -> None:
    tdx, gpus = tee
    other = os.urandom(32)
    evidence = composite_evidence(tdx, gpus, binding, rtmr3=RTMR3, gpu_nonces=[binding, other])
    result = _verify(tee, evidence, binding)
    assert _ids(result) == {"gpu1.nvidia.nonce"}
    assert _failed_rules(_decide(result)) == {"evidence-verified", "gpus-verified"}


def test_a_gpu_report_lifted_into_another_node_evidence_fails_the_cpu_binding(tee,
                                                                              binding) -> None:
    # the GPU report carries the right nonce, but the CPU report covers other GPU evidence
    tdx, gpus = tee
    first = decode_composite(composite_evidence(tdx, gpus, binding, rtmr3=RTMR3))
    lifted = gpus[1].evidence(binding, index=1)
    swapped = CompositeEvidence("tdx", first.cpu, (first.gpus[0], lifted))
    result = _verify(tee, encode_composite(swapped), binding)
    assert _ids(result) == {"cpu.tdx.report_data"}
    reordered = CompositeEvidence("tdx", first.cpu, tuple(reversed(first.gpus)))
    assert _ids(_verify(tee, encode_composite(reordered), binding)) == {"cpu.tdx.report_data"}
    dropped = CompositeEvidence("tdx", first.cpu, first.gpus[:1])
    assert _ids(_verify(tee, encode_composite(dropped), binding)) == {"cpu.tdx.report_data"}


def test_a_debug_td_is_denied(tee, binding) -> None:
    tdx, gpus = tee
    result = _verify(tee, composite_evidence(tdx, gpus, binding, rtmr3=RTMR3, debug=True),
                     binding)
    assert result.ok and result.claims["tdx.debug"] is True
    assert _failed_rules(_decide(result)) == {"cpu-not-debuggable"}


def test_an_out_of_date_tcb_is_denied(tee, binding) -> None:
    tdx, gpus = tee
    evidence = composite_evidence(tdx, gpus, binding, rtmr3=RTMR3,
                                  tee_tcb_svn=OUT_OF_DATE_TEE_TCB_SVN)
    result = _verify(tee, evidence, binding)
    assert result.ok  # OutOfDate is a warning for the verifier; the policy decides
    assert result.claims["tdx.tcb.status"] == "OutOfDate"
    assert result.claims["tdx.tcb.advisory_ids"] == ["INTEL-SA-00837"]
    assert [f.id for f in result.failures] == ["cpu.tdx.tcb.status"]
    assert _failed_rules(_decide(result)) == {"tdx-tcb-up-to-date"}


@pytest.mark.parametrize("mode", ["off", "devtools"])
def test_a_gpu_not_in_cc_mode_is_denied(tee, binding, mode: str) -> None:
    tdx, gpus = tee
    evidence = composite_evidence(tdx, gpus, binding, rtmr3=RTMR3, gpu_cc_modes=["on", mode])
    result = _verify(tee, evidence, binding)
    assert result.ok
    assert _failed_rules(_decide(result)) == {"gpus-cc-mode-on"}


def test_other_trainer_code_is_denied(tee, binding) -> None:
    tdx, gpus = tee
    result = _verify(tee, composite_evidence(tdx, gpus, binding), binding)
    assert _failed_rules(_decide(result)) == {"trainer-code-pinned"}


def test_a_gpu_measurement_off_its_rim_is_named(tee, binding) -> None:
    tdx, gpus = tee
    gpu_evidence = [gpus[0].evidence(binding), gpus[1].evidence(binding, index=1,
                                                                tampered_measurement=23)]
    from attest.composite import cpu_report_data

    quote = tdx.quote(cpu_report_data(binding, gpu_evidence), rtmr3=RTMR3)
    result = _verify(tee, encode_composite(CompositeEvidence("tdx", quote,
                                                             tuple(gpu_evidence))), binding)
    assert _ids(result) == {"gpu1.nvidia.measurements"}
    assert "measurement 23 (Measurement_23, driver RIM" in result.failures[0].message
    assert result.claims["gpus"][1]["measurements_mismatched"] == [23]
    assert "gpus-measurements-match" in _failed_rules(_decide(result))


def test_production_roots_refuse_the_software_tee(tee, binding) -> None:
    # no test roots configured: the bundled Intel and NVIDIA roots are the only anchors
    tdx, gpus = tee
    tdx_ref = tdx.reference()
    nvidia_ref = {k: v for k, v in gpus[0].reference().items() if "roots" not in k}
    result = _verify(tee, composite_evidence(tdx, gpus, binding, rtmr3=RTMR3), binding,
                     reference={"tdx": {"collateral": tdx_ref["collateral"]},
                                "nvidia-gpu": nvidia_ref})
    ids = _ids(result)
    assert {"cpu.tdx.pck.chain", "cpu.tdx.collateral.chain", "gpu0.nvidia.chain",
            "gpu1.nvidia.chain", "gpu0.nvidia.rim.chain"} <= ids
    assert not _decide(result).allowed


def test_malformed_composites(tee, binding) -> None:
    tdx, gpus = tee
    good = composite_evidence(tdx, gpus, binding)
    parts = decode_composite(good)
    for bad in (good[:7], good + b"\x00", b"XXXX" + good[4:], good[:5] + b"\x00" + good[6:]):
        with pytest.raises(MalformedEvidence):
            decode_composite(bad)
    no_cpu = bytearray(b"CMPE\x01\x01\x00\x00")
    no_cpu += bytes([10]) + b"nvidia-gpu" + len(parts.gpus[0]).to_bytes(4, "big") + \
        parts.gpus[0]
    with pytest.raises(MalformedEvidence, match="exactly one CPU TEE report"):
        decode_composite(bytes(no_cpu))
    unknown = b"CMPE\x01\x01\x00\x00" + bytes([4]) + b"evil" + (3).to_bytes(4, "big") + b"abc"
    with pytest.raises(MalformedEvidence, match="cannot be part"):
        decode_composite(unknown)
    with pytest.raises(MalformedEvidence):
        _verify(tee, good[:-1], binding)


# --- SEV-SNP as the CPU TEE -------------------------------------------------------------------

@pytest.fixture(scope="module")
def snp():
    from tests.attest.softtee import SoftSnp

    return SoftSnp.create()


def _snp_decide(result: VerificationResult, measurement: str) -> Decision:
    policy = Policy.from_yaml(POLICY.read_text()).with_params(
        {"gpus_per_node": 2, "allowed_snp_measurements": [measurement],
         "min_snp_tcb": {"bl": 3, "tee": 0, "snp": 8, "ucode": 115}})
    return policy.evaluate(evidence_claims(result))


def test_an_snp_composite_node_is_allowed_and_a_debug_guest_denied(tee, snp, binding) -> None:
    from tests.attest.softtee import snp_composite_evidence

    _, gpus = tee
    reference = {**_reference(tee), "sev-snp": {"snp_trust_store": snp.trust_store()}}
    result = _verify(tee, snp_composite_evidence(snp, gpus, binding), binding, reference)
    assert result.ok, result.failures
    c = result.claims
    assert (c["cpu.kind"], c["cpu.debug"], c["snp.product"], c["gpu.count"]) == (
        "sev-snp", False, "Milan", 2)
    decision = _snp_decide(result, c["snp.measurement"])
    assert decision.allowed, [(r.name, r.reason) for r in decision.rules if not r.passed]
    debug = _verify(tee, snp_composite_evidence(snp, gpus, binding, debug=True), binding,
                    reference)
    assert debug.ok and debug.claims["snp.debug"] is True
    assert _failed_rules(_snp_decide(debug, c["snp.measurement"])) == {"cpu-not-debuggable"}
    # without the test ARK pinned, the bundled AMD roots refuse the software TEE's chain
    refused = _verify(tee, snp_composite_evidence(snp, gpus, binding), binding,
                      _reference(tee))
    assert "cpu.snp.chain" in _ids(refused)


def test_random_damage_to_a_composite_is_malformed_or_refused(tee) -> None:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    tdx, gpus = tee
    binding = bytes(range(32))
    good = composite_evidence(tdx, gpus, binding, rtmr3=RTMR3)
    reference = _reference(tee)

    @settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(st.tuples(st.integers(0, len(good) - 1), st.integers(0, 255)),
                    min_size=1, max_size=4))
    def damaged(changes: list[tuple[int, int]]) -> None:
        data = bytearray(good)
        for index, value in changes:
            data[index] = value
        try:
            result = _verify(tee, bytes(data), binding, reference)
        except MalformedEvidence:
            return
        # every byte is covered by a signature, a length, or (NVML facts) the GPU digest in
        # the CPU report, so any change that still parses must fail verification
        assert bytes(data) == good or not result.ok

    damaged()
