"""nvidia-gpu verifier against every NVIDIA vector in shared/vectors (PROVENANCE.md section 3).

Both real H100 reports are checked for what PROVENANCE.md publishes: the parsed claims
(all 64 measurements, FWID, versions, board), the SPDM signature, the 5-certificate chain to
the pinned NVIDIA Device Identity CA, the FWID binding and the request nonce. The three RIMs
verify (XMLDSig and chain) at 2025-01-01; they do not belong to these reports' firmware, and
only 13 of their 33 active indices match, each mismatch named. The published negative chains
(cases 2, 3, 4) fail as trustee says; flipped bytes fail their own checks.
"""

from __future__ import annotations

import datetime as dt
import json
import struct
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attest.interface import MalformedEvidence, VerificationContext, VerificationResult
from attest.nvidia import (
    GoldenMeasurement,
    NvidiaGpuVerifier,
    NvidiaTrustStore,
    Rim,
    RimStore,
    decode_evidence,
    encode_evidence,
    load_rim,
    parse_report,
)
from attest.nvidia.rim import RimError

VECTORS = Path(__file__).resolve().parents[3] / "shared" / "vectors"
if not VECTORS.is_dir():
    VECTORS = Path("/work/shared/vectors")
NVTRUST = VECTORS / "nvidia" / "nvtrust"
TRUSTEE = VECTORS / "nvidia" / "trustee"
RIM_DAY = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
STORE = NvidiaTrustStore.bundled()

NVTRUST_NONCE = "931d8dd0add203ac3d8b4fbde75e115278eefcdceac5b87671a748f32364dfcb"
COCO_NONCE = "87d8e24ab336adafe228d49e83d745f6dba4ae505372b6a5704820856b343fec"
DRIVER_RIM = NVTRUST / "Driver_RIM_test_no_gpu.swidtag"
VBIOS_RIM = NVTRUST / "1010_0200_882_96005E0001_test_no_gpu.swidtag"
VBIOS_RIM_PROD = NVTRUST / "1010_0200_882_96005E0001_PROD.swidtag"


def _report(name: str) -> bytes:
    path = {"nvtrust": NVTRUST / "hopperAttestationReport.txt",
            "coco": TRUSTEE / "hopper_coco_report1.txt"}[name]
    return bytes.fromhex(path.read_text().strip())


def _chain(path: Path) -> list[bytes]:
    return [c.public_bytes(Encoding.DER)
            for c in x509.load_pem_x509_certificates(path.read_bytes())]


def _certs(name: str) -> list[bytes]:
    return _chain({"nvtrust": NVTRUST / "hopperCertChain.txt",
                   "coco": TRUSTEE / "hopper_coco_certs1.txt"}[name])


def _rims(vbios: Path = VBIOS_RIM, at: dt.datetime = RIM_DAY) -> RimStore:
    return RimStore.load(driver=[DRIVER_RIM.read_bytes()], vbios=[vbios.read_bytes()],
                         roots=STORE.rim_roots, at=at, pinned=True)


def _verify(report: bytes, certs: list[bytes], *, nonce: bytes | None = None,
            rims: RimStore | None = None, facts: dict[str, object] | None = None,
            now: dt.datetime = RIM_DAY) -> VerificationResult:
    if nonce is None:
        nonce = parse_report(report).request_nonce
    reference: dict[str, object] = {"now": now}
    if rims is not None:
        reference["nvidia_rims"] = rims
    return NvidiaGpuVerifier().verify(
        encode_evidence(report, certs, facts),
        VerificationContext(expected_report_data=nonce, reference=reference))


def _ids(result: VerificationResult) -> set[str]:
    return {f.id for f in result.failures if f.severity == "error"}


_SHARED_RIMS = _rims()
RIM_IDS = {"nvidia.rim.missing", "nvidia.rim.version", "nvidia.measurements"}


# --- parsing ---------------------------------------------------------------------------------

def test_nvtrust_report_parses_to_the_published_claims() -> None:
    expected = json.loads((TRUSTEE / "hopperAttestationReport-claims.txt").read_text())
    report = parse_report(_report("nvtrust"))
    assert report.request_nonce.hex() == NVTRUST_NONCE
    assert report.response_nonce != report.request_nonce  # the GPU's own random value
    assert len(report.measurements) == 64
    for index, value in expected["measurements"].items():
        assert report.measurements[int(index)].hex() == value, index
    config = expected["config"]
    assert report.fwid.hex() == config["fwid"]
    assert report.vbios_version == config["vbios_version"] == "96.00.9f.00.01"
    assert report.driver_version == config["driver_version"] == "550.90.07"
    assert report.board_id == config["board_id"] == "b1030000"
    assert report.chip_sku == config["chip_sku"] == "882"
    assert (report.project, report.project_sku) == (config["project"], config["project_sku"])
    assert (report.project, report.project_sku) == ("1010", "0200")
    assert expected["arch"] == "Hopper"


def test_coco_report_parses_with_its_trailing_byte() -> None:
    data = _report("coco")
    assert data[-1] == 0
    report = parse_report(data)
    assert report.request_nonce.hex() == COCO_NONCE
    assert report.driver_version == "580.95.05"
    assert len(report.measurements) == 64


# --- verification ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["nvtrust", "coco"])
def test_signature_chain_fwid_and_nonce_verify_for_both_reports(name: str) -> None:
    result = _verify(_report(name), _certs(name), rims=_rims())
    assert not _ids(result) & {"nvidia.chain", "nvidia.spdm.signature", "nvidia.fwid",
                               "nvidia.nonce"}
    assert _ids(result) <= RIM_IDS  # the RIMs are not for this firmware (PROVENANCE.md)
    claims = result.claims
    assert claims["nvidia.architecture"] == "Hopper"
    assert claims["nvidia.nonce"] == {"nvtrust": NVTRUST_NONCE, "coco": COCO_NONCE}[name]
    assert claims["evidence.verified"] is False


def test_the_nvtrust_report_against_the_test_rims_matches_13_of_33() -> None:
    result = _verify(_report("nvtrust"), _certs("nvtrust"), rims=_rims())
    c = result.claims
    assert c["nvidia.measurements.compared"] == 33
    assert len(c["nvidia.measurements.mismatched"]) == 20
    assert c["nvidia.measurements.matched"] is False
    mismatches = [f for f in result.failures if f.id == "nvidia.measurements"]
    assert len(mismatches) == 20
    named = {int(f.message.split()[1]) for f in mismatches}
    assert named == set(c["nvidia.measurements.mismatched"])
    assert "measurement 7 (Measurement_7, driver RIM 545.00)" in mismatches[0].message
    versions = [f.message for f in result.failures if f.id == "nvidia.rim.version"]
    assert versions == ["driver RIM is for 545.00, the report says 550.90.07",
                        "vbios RIM is for 96.00.5E.00.01, the report says 96.00.9f.00.01"]
    # the production VBIOS RIM differs from the test one in one golden value: 14 match
    prod = _verify(_report("nvtrust"), _certs("nvtrust"), rims=_rims(VBIOS_RIM_PROD))
    assert len(prod.claims["nvidia.measurements.mismatched"]) == 19


def test_golden_values_that_match_pass_index_by_index() -> None:
    # Reference values taken from the report itself stand in for a RIM of its firmware:
    # then every check passes, so the mismatches above are the RIMs' and nothing else's.
    report = parse_report(_report("nvtrust"))
    signed = _rims()
    own = {}
    for kind, rim in (("driver", *signed.driver.values()), ("vbios", *signed.vbios.values())):
        golden = {i: GoldenMeasurement(i, g.name, (report.measurements[i + 1],))
                  for i, g in rim.golden.items()}
        own[kind] = {rim.version.lower(): Rim(rim.tag_id, rim.version, rim.signer, golden)}
    rims = RimStore(driver=own["driver"], vbios=own["vbios"], pinned=True)
    result = _verify(_report("nvtrust"), _certs("nvtrust"), rims=rims)
    assert _ids(result) == {"nvidia.rim.version"}
    assert result.claims["nvidia.measurements.matched"] is True


def test_without_rims_the_measurements_are_not_matched() -> None:
    result = _verify(_report("nvtrust"), _certs("nvtrust"))
    assert _ids(result) == {"nvidia.rim.missing"}
    assert result.claims["nvidia.measurements.matched"] is False
    by_version = RimStore.load(driver=[DRIVER_RIM.read_bytes()], vbios=[VBIOS_RIM.read_bytes()],
                               roots=STORE.rim_roots, at=RIM_DAY)
    result = _verify(_report("nvtrust"), _certs("nvtrust"), rims=by_version)
    messages = [f.message for f in result.failures if f.id == "nvidia.rim.missing"]
    assert messages == ["no driver RIM for version 550.90.07",
                        "no vbios RIM for version 96.00.9f.00.01"]


def test_session_binding_is_the_request_nonce() -> None:
    result = _verify(_report("nvtrust"), _certs("nvtrust"), nonce=bytes(32), rims=_rims())
    assert "nvidia.nonce" in _ids(result)
    response_nonce = parse_report(_report("nvtrust")).response_nonce
    result = _verify(_report("nvtrust"), _certs("nvtrust"), nonce=response_nonce,
                     rims=_rims())
    assert "nvidia.nonce" in _ids(result)


def test_the_published_signing_cert_is_the_leaf_that_signs() -> None:
    leaf = x509.load_pem_x509_certificate((TRUSTEE / "hopper_signing_cert.pem").read_bytes())
    assert leaf.public_bytes(Encoding.DER) == _certs("nvtrust")[0]
    assert leaf.subject.rfc4514_string().startswith("CN=GH100 A01 GSP FMC LF")


# --- published negative chains ------------------------------------------------------------------

def test_case2_root_only_chain() -> None:
    result = _verify(_report("nvtrust"), _chain(TRUSTEE / "hopper_cert_chain_case2.txt"))
    chain = [f.message for f in result.failures if f.id == "nvidia.chain"]
    assert chain and "at least the signing certificate and the root CA" in chain[0]
    assert {"nvidia.spdm.signature", "nvidia.fwid"} <= _ids(result)


def test_case3_missing_intermediate() -> None:
    result = _verify(_report("nvtrust"), _chain(TRUSTEE / "hopper_cert_chain_case3.txt"))
    assert _ids(result) - {"nvidia.rim.missing"} == {"nvidia.chain"}
    assert "failed to verify" in next(f.message for f in result.failures
                                      if f.id == "nvidia.chain")


def test_case4_missing_signing_cert() -> None:
    result = _verify(_report("nvtrust"), _chain(TRUSTEE / "hopper_cert_chain_case4.txt"))
    fwid = [f.message for f in result.failures if f.id == "nvidia.fwid"]
    assert fwid == ["FwId oid not found in the NVIDIA signing certificate"]
    assert "nvidia.spdm.signature" in _ids(result)


def test_a_chain_from_another_gpu_fails_signature_and_fwid() -> None:
    result = _verify(_report("nvtrust"), _certs("coco"), rims=_rims())
    assert {"nvidia.spdm.signature", "nvidia.fwid"} <= _ids(result)
    assert "nvidia.chain" not in _ids(result)  # a genuine chain, just not this GPU's


def test_an_untrusted_device_root_fails_the_chain() -> None:
    other = NvidiaTrustStore(device_roots=STORE.rim_roots, rim_roots=STORE.rim_roots)
    result = NvidiaGpuVerifier(trust_store=other).verify(
        encode_evidence(_report("nvtrust"), _certs("nvtrust")),
        VerificationContext(expected_report_data=bytes.fromhex(NVTRUST_NONCE),
                            reference={"now": RIM_DAY}))
    assert "nvidia.chain" in _ids(result)


# --- mutations -------------------------------------------------------------------------------

def _offsets(report: bytes) -> dict[str, int]:
    record = int.from_bytes(report[37 + 5:37 + 8], "little")
    opaque_at = 37 + 8 + record + 34
    fwid_at = report.index(bytes.fromhex(parse_report(report).fwid.hex()))
    return {
        "request.nonce": 4 + 7,
        "response.measurement_12": 37 + 8 + 11 * 55 + 7 + 3,
        "response.nonce": 37 + 8 + record + 5,
        "opaque.driver_version": report.index(b"550.90.07"),
        "opaque.fwid": fwid_at + 6,
        "signature": len(report) - 40,
        "opaque.board_id": opaque_at + 8 + 4 + 1,
    }


MUTATIONS = {
    "request.nonce": {"nvidia.spdm.signature", "nvidia.nonce"},
    "response.measurement_12": {"nvidia.spdm.signature", "nvidia.measurements"},
    "response.nonce": {"nvidia.spdm.signature"},
    "opaque.driver_version": {"nvidia.spdm.signature"},
    "opaque.fwid": {"nvidia.spdm.signature", "nvidia.fwid"},
    "signature": {"nvidia.spdm.signature"},
    "opaque.board_id": {"nvidia.spdm.signature"},
}


@pytest.mark.parametrize("field", sorted(MUTATIONS))
def test_a_flipped_byte_fails_its_check(field: str) -> None:
    original = _report("nvtrust")
    tampered = bytearray(original)
    tampered[_offsets(original)[field]] ^= 0x01
    result = _verify(bytes(tampered), _certs("nvtrust"),
                     nonce=bytes.fromhex(NVTRUST_NONCE), rims=_rims())
    ids = _ids(result) - RIM_IDS
    if "nvidia.measurements" in MUTATIONS[field]:
        assert 12 in result.claims["nvidia.measurements.mismatched"] or \
            11 in result.claims["nvidia.measurements.mismatched"]
    assert ids == MUTATIONS[field] - RIM_IDS, (field, result.failures)


# --- RIMs ------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", [DRIVER_RIM, VBIOS_RIM, VBIOS_RIM_PROD])
def test_every_rim_verifies_to_the_rim_root_at_2025_01_01(path: Path) -> None:
    rim = load_rim(path.read_bytes(), STORE.rim_roots, RIM_DAY)
    assert rim.trusted and rim.problems == ()
    assert "HCC RIM L4 Signer" in rim.signer
    assert len(rim.golden) == (21 if path == DRIVER_RIM else 12)


def test_rims_after_their_signer_expired_are_untrusted_and_not_compared() -> None:
    rims = _rims(at=dt.datetime(2025, 7, 1, tzinfo=dt.UTC))
    result = _verify(_report("nvtrust"), _certs("nvtrust"), rims=rims)
    chain = [f.message for f in result.failures if f.id == "nvidia.rim.chain"]
    assert len(chain) == 2 and all("HCC RIM L4 Signer" in m for m in chain)
    assert result.claims["nvidia.measurements.compared"] == 0
    assert result.claims["nvidia.measurements.matched"] is False


def test_a_tampered_rim_fails_its_signature() -> None:
    raw = DRIVER_RIM.read_bytes()
    tampered = raw.replace(b"0e0ee161b59bf124", b"0e0ee161b59bf125", 1)
    assert tampered != raw
    rim = load_rim(tampered, STORE.rim_roots, RIM_DAY)
    assert [p[0] for p in rim.problems] == ["signature"] and not rim.golden
    rims = RimStore.load(driver=[tampered], vbios=[VBIOS_RIM.read_bytes()],
                         roots=STORE.rim_roots, at=RIM_DAY, pinned=True)
    result = _verify(_report("nvtrust"), _certs("nvtrust"), rims=rims)
    assert "nvidia.rim.signature" in _ids(result)
    assert result.claims["nvidia.rim.driver"] == ""


def test_a_rim_under_another_root_fails_its_chain() -> None:
    rim = load_rim(DRIVER_RIM.read_bytes(), STORE.device_roots, RIM_DAY)
    assert [p[0] for p in rim.problems] == ["chain"] and not rim.golden


def test_rims_refuse_entities_and_oversize() -> None:
    bomb = (b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaa">]>'
            b"<SoftwareIdentity>&a;</SoftwareIdentity>")
    rim = load_rim(bomb, STORE.rim_roots, RIM_DAY)
    assert not rim.trusted
    with pytest.raises(RimError):
        load_rim(b"<x>" * 200_000, STORE.rim_roots, RIM_DAY)
    with pytest.raises(RimError):
        load_rim(b"not xml", STORE.rim_roots, RIM_DAY)


# --- facts -------------------------------------------------------------------------------------

def test_nvml_facts_become_claims_and_are_cross_checked() -> None:
    facts = {"cc_mode": "on", "cc_ready": True, "architecture": "Hopper",
             "driver_version": "550.90.07", "compute_mode": "exclusive_process",
             "mig_mode": False, "other_processes": 0, "ecc": True, "uuid": "GPU-1"}
    result = _verify(_report("nvtrust"), _certs("nvtrust"), facts=facts, rims=_rims())
    c = result.claims
    assert (c["nvidia.cc_mode"], c["nvidia.cc_ready"], c["nvidia.compute_mode"]) == (
        "on", True, "exclusive_process")
    assert (c["nvidia.other_processes"], c["nvidia.ecc"], c["nvidia.uuid"]) == (0, True,
                                                                                 "GPU-1")
    assert not _ids(result) & {"nvidia.facts", "nvidia.architecture"}
    lied = _verify(_report("nvtrust"), _certs("nvtrust"), rims=_rims(),
                   facts={**facts, "driver_version": "545.00", "architecture": "Blackwell"})
    assert {"nvidia.facts", "nvidia.architecture"} <= _ids(lied)
    with pytest.raises(MalformedEvidence):
        _verify(_report("nvtrust"), _certs("nvtrust"), facts={"other_processes": "none"})
    assert _verify(_report("nvtrust"), _certs("nvtrust")).claims["nvidia.cc_mode"] == "unknown"


# --- malformed input ---------------------------------------------------------------------------

def test_truncations_are_malformed() -> None:
    data = _report("nvtrust")
    for cut in (0, 36, 37, 44, 45, 300, 3565, 3590, 3600, 4000, len(data) - 1):
        with pytest.raises(MalformedEvidence):
            parse_report(data[:cut])


@pytest.mark.parametrize(("offset", "value", "what"), [
    (0, 0x10, "request version"),
    (1, 0xE1, "request code"),
    (2, 0x00, "no signature requested"),
    (37 + 1, 0x61, "response code"),
    (37 + 7, 0xFF, "record length"),
    (37 + 8 + 2, 0xFF, "block size"),
])
def test_bad_fields_are_malformed(offset: int, value: int, what: str) -> None:
    data = bytearray(_report("nvtrust"))
    data[offset] = value
    with pytest.raises(MalformedEvidence):
        parse_report(bytes(data))


def test_container_lengths_are_checked() -> None:
    good = encode_evidence(_report("nvtrust"), _certs("nvtrust"))
    assert decode_evidence(good).report == _report("nvtrust")
    for bad in (good[:11], good + b"x", b"XXXX" + good[4:], good[:5] + b"\x09" + good[6:]):
        with pytest.raises(MalformedEvidence):
            decode_evidence(bad)
    huge = bytearray(good)
    struct.pack_into(">I", huge, 8, 0x7FFFFFFF)
    with pytest.raises(MalformedEvidence):
        decode_evidence(bytes(huge))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_random_damage_is_malformed_or_a_failure_never_a_crash(data: st.DataObject) -> None:
    original = _report("nvtrust")
    report = bytearray(original)
    for _ in range(data.draw(st.integers(1, 4))):
        report[data.draw(st.integers(0, len(report) - 1))] = data.draw(st.integers(0, 255))
    try:
        result = _verify(bytes(report), _certs("nvtrust"),
                         nonce=bytes.fromhex(NVTRUST_NONCE), rims=_SHARED_RIMS)
    except MalformedEvidence:
        return
    # the report has no byte outside the signed request/response and the signature
    assert bytes(report) == original or "nvidia.spdm.signature" in _ids(result)


def test_deeply_nested_facts_are_malformed_not_a_crash() -> None:
    good = encode_evidence(_report("nvtrust"), _certs("nvtrust"))
    facts = b"[" * 4000 + b"]" * 4
    bad = good[:-4] + struct.pack(">I", len(facts)) + facts
    with pytest.raises(MalformedEvidence):
        decode_evidence(bad)
