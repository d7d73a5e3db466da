"""SEV-SNP verifier against the real published vectors (shared/vectors/PROVENANCE.md section 1).

Each positive case asserts the published parsed values; each negative case is the one the
source repository publishes (same byte, same change) and must fail with the published kind.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import struct
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attest.interface import MalformedEvidence, VerificationContext, VerificationResult
from attest.snp import (
    AmdTrustStore,
    SnpVerifier,
    decode_evidence,
    encode_evidence,
    parse_hcl_report,
    parse_report,
)
from attest.snp.certs import (
    cert_hwid,
    cert_tcb,
    load_certificate,
    load_certificates_pem,
    pss_signed_by,
)

VECTORS = Path(__file__).resolve().parents[3] / "shared" / "vectors"
if not VECTORS.is_dir():  # the checkout may sit elsewhere; the vectors live beside it
    VECTORS = Path("/work/shared/vectors")

# A day on which every certificate in the vectors was valid (the VLEK expired 2025-12-10).
VALID_DAY = dt.datetime(2025, 6, 1, tzinfo=dt.UTC)


def _read(rel: str) -> bytes:
    return (VECTORS / rel).read_bytes()


def _der(data: bytes) -> bytes:
    return load_certificate(data, "test cert").public_bytes(Encoding.DER)


def _flip(data: bytes, offset: int, *, xor: int | None = None, add: int | None = None,
          set_to: int | None = None) -> bytes:
    out = bytearray(data)
    if xor is not None:
        out[offset] ^= xor
    if add is not None:
        out[offset] = (out[offset] + add) & 0xFF
    if set_to is not None:
        out[offset] = set_to
    return bytes(out)


def _verify(report: bytes, certs: list[bytes], *, fmt: str = "raw",
            expected: bytes | None = None, now: dt.datetime = VALID_DAY,
            store: AmdTrustStore | None = None) -> VerificationResult:
    if expected is None:
        expected = (parse_report(report).report_data if fmt == "raw"
                    else parse_hcl_report(report).user_data)
    reference: dict[str, object] = {"now": now}
    if store is not None:
        reference["snp_trust_store"] = store
    evidence = encode_evidence(report, certs, report_format=fmt)  # type: ignore[arg-type]
    return SnpVerifier().verify(
        evidence, VerificationContext(expected_report_data=expected, reference=reference))


def _ids(result: VerificationResult) -> set[str]:
    return {f.id for f in result.failures}


# --- the vectors ---------------------------------------------------------------------------

def virtee() -> tuple[bytes, list[bytes]]:
    report = bytes.fromhex(_read("snp/virtee-sev/report_milan.hex").decode().strip())
    return report, [_read("snp/virtee-sev/vcek_milan.der")]


def gosev() -> tuple[bytes, list[bytes]]:
    return _read("snp/go-sev-guest/attestation.bin"), [_read("snp/go-sev-guest/vcek.testcer")]


def trustee_vcek() -> tuple[bytes, list[bytes]]:
    return _read("snp/trustee/test-report.bin"), [_read("snp/trustee/test-vcek.der")]


def trustee_vlek() -> tuple[bytes, list[bytes]]:
    return _read("snp/trustee/test-vlek-report.bin"), [_read("snp/trustee/test-vlek.der")]


def azure_hcl() -> tuple[bytes, list[bytes]]:
    chain = load_certificates_pem(_read("azure-snp-vtpm/vcek.pem"))
    return _read("azure-snp-vtpm/hcl-report.bin"), [c.public_bytes(Encoding.DER) for c in chain]


def azure_v2() -> tuple[bytes, list[bytes]]:
    doc = json.loads(_read("azure-snp-vtpm/evidence-v2.json"))
    return (base64.urlsafe_b64decode(doc["hcl_report"] + "=="),
            [base64.urlsafe_b64decode(doc["vcek"] + "==")])


def azure_genoa() -> tuple[bytes, list[bytes]]:
    doc = json.loads(_read("azure-snp-vtpm/evidence-genoa.json"))
    return bytes(doc["report"]), [_der(doc["vcek"].encode())]


# --- positive: every real report verifies and parses to the published values -------------

def test_virtee_milan_v2_verifies_with_published_fields() -> None:
    report, certs = virtee()
    result = _verify(report, certs)
    assert result.failures == ()
    assert result.ok and result.claims["evidence.verified"] is True
    c = result.claims
    assert c["evidence.kind"] == "sev-snp"
    assert c["snp.version"] == 2
    assert c["snp.policy"] == 0x30000
    assert c["snp.vmpl"] == 0
    assert c["snp.platform_info"] == 0x1
    for name in ("current", "reported", "committed", "launch"):
        assert c[f"snp.tcb.{name}.raw"] == "0300000000000873"
    assert (c["snp.tcb.reported.bl"], c["snp.tcb.reported.tee"], c["snp.tcb.reported.snp"],
            c["snp.tcb.reported.ucode"]) == (3, 0, 8, 115)
    assert c["snp.firmware.current"] == "1.52.4"
    assert c["snp.measurement"] == (
        "7a1e5c266c0108dbc9bb94fa926951320940915d0aafb42464bd88b579ea158d"
        "3e1a0dc39b2c60bd95b9c480cd81841f")
    assert c["snp.report_data"] == (
        "d447b55d197491bfe15cf298f9de9986b7a7c4be2468b4f6e2d53b71d7c64581"
        "0b0f2cdfca0040433be063fc1a8293f0f3f8dae7b79fecb3d1cd82bd6a93ebfd")
    assert c["snp.chip_id"].startswith("d49554ec") and c["snp.chip_id"].endswith("541eb6")
    assert c["snp.chip_id"] == cert_hwid(load_certificate(certs[0], "vcek")).hex()
    assert c["snp.report_id"].startswith("92b3b47d")
    assert c["snp.report_id"].endswith("c28d5b")
    assert c["snp.report_id_ma"] == "ff" * 32
    assert c["snp.migration_agent"] is False
    assert c["snp.debug"] is False and c["snp.smt_allowed"] is True
    assert c["snp.signing_key"] == "vcek" and c["snp.product"] == "Milan"


def test_gosev_milan_v2_verifies_with_published_fields() -> None:
    report, certs = gosev()
    result = _verify(report, certs)
    assert result.failures == ()
    c = result.claims
    assert c["snp.version"] == 2
    assert c["snp.policy"] == 0xB0000
    assert c["snp.debug"] is True  # bit 19 of 0xb0000 is set: a debug guest
    assert c["snp.vmpl"] == 0
    assert c["snp.tcb.reported.raw"] == "0200000000000544"
    assert (c["snp.tcb.reported.bl"], c["snp.tcb.reported.tee"], c["snp.tcb.reported.snp"],
            c["snp.tcb.reported.ucode"]) == (2, 0, 5, 68)
    assert c["snp.firmware.current"] == "1.49.3"
    assert c["snp.report_data"] == "0102030405" + "00" * 59
    assert c["snp.measurement"] == (
        "b07af9620f3b839b47996422ddec6058338951d984e312115131ea82705eaf5b"
        "6bdf8a9ece31a5a608eb0cf2e4872b01")
    assert c["snp.chip_id"] == (
        "3ac3fe21e13fb0990eb28a802e3fb6a29483a6b0753590c951bdd3b8e5378618"
        "4ca39e359669a2b76a1936776b564ea464cdce40c05f63c9b610c5068b006b5d")
    assert c["snp.product"] == "Milan"


def test_gosev_vcek_chain_checked_at_its_issue_date() -> None:
    """TestVerifyVcekCert checks the chain at 2022-09-24, the VCEK's first valid day."""
    report, certs = gosev()
    assert _verify(report, certs, now=dt.datetime(2022, 9, 24, 12, tzinfo=dt.UTC)).ok
    early = _verify(report, certs, now=dt.datetime(2022, 9, 23, tzinfo=dt.UTC))
    assert _ids(early) == {"snp.cert_validity"}
    assert "SEV-VCEK" in early.failures[0].message


def test_trustee_vcek_v2_with_id_block_verifies_with_published_fields() -> None:
    report, certs = trustee_vcek()
    result = _verify(report, certs)
    assert result.failures == ()
    c = result.claims
    assert c["snp.version"] == 2
    assert c["snp.guest_svn"] == 4
    assert c["snp.policy"] == 0x3001F
    assert c["snp.family_id"] == "01" + "00" * 15
    assert c["snp.image_id"] == "02" + "00" * 15
    assert c["snp.id_key_digest"].startswith("0356215882a8")
    assert c["snp.id_key_digest"].endswith("7a44a3")
    assert c["snp.tcb.current.ucode"] == 206
    assert c["snp.tcb.reported.raw"] == "0300000000000873"
    assert c["snp.report_data"] == (
        "ec6c52d7533cc2c4f45be7849cf112ab82b2009fe7bd43e71ed08c14400ad7e2" + "00" * 32)
    assert c["snp.measurement"] == (
        "a1f3930413247bb38cfc171579ea3c12d5fe4901f0c792f63fd75d98f1ef827c"
        "23500644e0e692e6be917f9050d3d38c")
    assert c["snp.chip_id"].startswith("c38427a3") and c["snp.chip_id"].endswith("77524e")


def test_trustee_vlek_v3_verifies_through_asvk_with_published_fields() -> None:
    report, certs = trustee_vlek()
    result = _verify(report, certs)
    assert result.failures == ()
    c = result.claims
    assert c["snp.version"] == 3
    assert c["snp.vmpl"] == 1
    assert parse_report(report).key_info == 0x4
    assert c["snp.signing_key"] == "vlek"
    assert c["snp.chip_id"] == "00" * 64
    assert c["snp.tcb.reported.raw"] == "04000000000018d9"
    assert (c["snp.tcb.reported.bl"], c["snp.tcb.reported.snp"],
            c["snp.tcb.reported.ucode"]) == (4, 24, 217)
    assert c["snp.measurement"] == (
        "8922ebbdd00ec2c541f36a6e7a82a8773a7accb451ed67bc94e740dbe92c93c4"
        "e8c9af857f5ceeb5a493df2a570d7bf0")
    assert c["snp.cpuid.family"] == 0x19


def test_azure_hcl_report_verifies_and_binds_var_data() -> None:
    report, certs = azure_hcl()
    assert len(report) == 2600
    result = _verify(report, certs, fmt="azure-hcl")
    assert result.failures == ()
    hcl = parse_hcl_report(report)
    assert bytes.fromhex(result.claims["snp.report_data"])[:32] == hcl.var_data_digest()
    assert result.claims["snp.hcl.vm.secure_boot"] is True
    assert result.claims["snp.hcl.ak_pub_n"].startswith("qR7LqAABDczZ")


def test_azure_v2_milan_v3_report_binds_published_nonce() -> None:
    report, certs = azure_v2()
    nonce = bytes.fromhex(
        "982f5c6e45df0ed3f10b6f60b02f0c8390e281300f3805e2279c16168cd6ae9a"
        "a398f647caa2338748cd0fd9f5f819ef")
    result = _verify(report, certs, fmt="azure-hcl", expected=nonce.ljust(64, b"\0"))
    assert result.failures == ()
    assert result.claims["snp.version"] == 3
    assert result.claims["snp.hcl.user_data"] == nonce.hex() + "00" * 16


def test_azure_genoa_v3_report_verifies_with_published_cpuid_and_tcb() -> None:
    report, certs = azure_genoa()
    result = _verify(report, certs, fmt="azure-hcl")
    assert result.failures == ()
    c = result.claims
    assert c["snp.product"] == "Genoa"
    assert (c["snp.cpuid.family"], c["snp.cpuid.model"]) == (0x19, 0x11)
    assert (c["snp.tcb.reported.bl"], c["snp.tcb.reported.snp"],
            c["snp.tcb.reported.ucode"]) == (10, 23, 84)


def test_turin_vcek_chains_to_pinned_turin_ark() -> None:
    """virtee `turin_ca_stack`: Turin VCEK <- ASK <- ARK (no report in the vectors)."""
    vcek = load_certificate(_read("snp/virtee-sev/vcek_turin.der"), "vcek")
    ask, ark = load_certificates_pem(_read("snp/virtee-sev/cert_chain_turin"))
    store = AmdTrustStore.bundled()
    assert store.arks["ARK-Turin"] == ark
    assert pss_signed_by(vcek, ask) is None
    assert pss_signed_by(ask, store.arks["ARK-Turin"]) is None
    assert cert_tcb(vcek) == {"fmc": 0, "bl": 0, "tee": 0, "snp": 0, "ucode": 9}
    assert cert_hwid(vcek) == bytes.fromhex("1e550a8ee5cf9f4d")  # Turin hwID is 8 bytes


def test_bundled_roots_are_the_published_amd_certificates() -> None:
    store = AmdTrustStore.bundled()
    for gen in ("milan", "genoa", "turin"):
        ask, ark, asvk = load_certificates_pem(_read(f"snp/trustee/{gen}_ask_ark_asvk.pem"))
        name = gen.capitalize()
        assert store.arks[f"ARK-{name}"] == ark
        assert store.intermediates[f"SEV-{name}"] == ask
        assert store.intermediates[f"SEV-VLEK-{name}"] == asvk


# --- negative: the published failing cases ------------------------------------------------

def test_virtee_vcek_byte_40_flipped_fails_chain() -> None:
    report, certs = virtee()
    result = _verify(report, [_flip(certs[0], 40, xor=0xFF)])
    assert "snp.chain" in _ids(result)
    assert not result.ok and result.claims["evidence.verified"] is False


def test_virtee_report_byte_21_flipped_fails_signature() -> None:
    report, certs = virtee()
    result = _verify(_flip(report, 21, xor=0x80), certs)
    assert _ids(result) == {"snp.signature"}


def test_trustee_report_byte_42_incremented_fails_signature() -> None:
    report, certs = trustee_vcek()
    assert _ids(_verify(_flip(report, 42, add=1), certs)) == {"snp.signature"}


def test_trustee_reported_tcb_bl_incremented_fails_tcb_binding() -> None:
    report, certs = trustee_vcek()
    result = _verify(_flip(report, 384, add=1), certs)
    assert _ids(result) == {"snp.signature", "snp.tcb_binding"}
    tcb = next(f for f in result.failures if f.id == "snp.tcb_binding")
    assert "bl: certificate 3, report 4" in tcb.message


def test_trustee_vcek_against_asvk_fails_chain() -> None:
    report, certs = trustee_vcek()
    milan = load_certificates_pem(_read("snp/trustee/milan_ask_ark_asvk.pem"))
    ark, asvk = milan[1], milan[2]
    vcek = load_certificate(certs[0], "vcek")
    assert pss_signed_by(vcek, asvk) is not None
    only_asvk = AmdTrustStore.from_certificates([ark], [asvk])
    result = _verify(report, [certs[0], asvk.public_bytes(Encoding.DER)], store=only_asvk)
    assert _ids(result) == {"snp.chain"}


@pytest.mark.parametrize("name", ["test-vcek-invalid-legacy.der", "test-vcek-invalid-new.der"])
def test_trustee_invalid_vceks_parse_hwid_but_fail_chain(name: str) -> None:
    cert_bytes = _read(f"snp/trustee/{name}")
    assert cert_hwid(load_certificate(cert_bytes, "vcek")) == bytes(range(64))
    report, _ = trustee_vcek()
    result = _verify(report, [cert_bytes])
    assert {"snp.chain", "snp.signature", "snp.chip_id"} <= _ids(result)


def test_azure_snp_spl_zeroed_fails_tcb_binding() -> None:
    """trustee az_snp_vtpm: byte 0x1a6 set to 0 gives "SNP version mismatch"."""
    report, certs = azure_hcl()
    result = _verify(_flip(report, 0x1A6, set_to=0), certs, fmt="azure-hcl")
    assert "snp.tcb_binding" in _ids(result)
    tcb = next(f for f in result.failures if f.id == "snp.tcb_binding")
    assert "snp: certificate 8, report 0" in tcb.message


def test_azure_var_data_changed_fails_digest() -> None:
    """trustee az_snp_vtpm: byte 0x6e0 += 1 gives "HCL variable data digest doesn't match"."""
    report, certs = azure_hcl()
    result = _verify(_flip(report, 0x6E0, add=1), certs, fmt="azure-hcl")
    assert _ids(result) == {"snp.hcl.var_data"}


def test_vlek_expired_today_fails_validity_only() -> None:
    report, certs = trustee_vlek()
    result = _verify(report, certs, now=dt.datetime(2026, 1, 1, tzinfo=dt.UTC))
    assert _ids(result) == {"snp.cert_validity"}
    assert "SEV-VLEK" in result.failures[0].message


def test_vlek_report_with_a_vcek_fails_signing_key_and_signature() -> None:
    report, _ = trustee_vlek()
    _, vcek = trustee_vcek()
    ids = _ids(_verify(report, vcek))
    assert {"snp.signing_key", "snp.signature"} <= ids


def test_chip_id_of_another_chip_fails() -> None:
    report, _ = virtee()
    _, other = gosev()
    ids = _ids(_verify(report, other))
    assert {"snp.signature", "snp.chip_id", "snp.tcb_binding"} <= ids


def test_report_data_of_another_session_fails_binding_only() -> None:
    report, certs = virtee()
    result = _verify(report, certs, expected=b"\x01" * 32)
    assert _ids(result) == {"snp.report_data"}
    assert "not bound to this session" in result.failures[0].message


def test_unpinned_root_fails_chain() -> None:
    report, certs = virtee()
    genoa_only = AmdTrustStore.from_certificates(
        [load_certificates_pem(_read("snp/trustee/genoa_ask_ark_asvk.pem"))[1]],
        load_certificates_pem(_read("snp/trustee/milan_ask_ark_asvk.pem"))[:1])
    result = _verify(report, certs, store=genoa_only)
    assert _ids(result) == {"snp.chain"}
    assert "not a pinned AMD root" in result.failures[0].message


def test_offered_ark_in_evidence_is_not_trusted() -> None:
    """An ARK sent with the evidence is never an anchor: with no pinned ARK the chain fails."""
    report, certs = azure_hcl()  # vcek.pem carries VCEK, ASK and ARK
    empty = AmdTrustStore()
    assert _ids(_verify(report, certs, fmt="azure-hcl", store=empty)) == {"snp.chain"}


# --- malformed evidence -------------------------------------------------------------------

def _good_evidence() -> bytes:
    report, certs = virtee()
    return encode_evidence(report, certs)


def test_container_round_trip() -> None:
    report, certs = virtee()
    decoded = decode_evidence(encode_evidence(report, certs))
    assert decoded.report == report and decoded.certificates == tuple(certs)
    assert decoded.report_format == "raw"


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: b[:-1], "truncated inside certificate 0"),
        (lambda b: b + b"\0", "1 trailing bytes"),
        (lambda b: b"XXXX" + b[4:], "'SNPE' header"),
        (lambda b: b[:4] + b"\x02" + b[5:], "container version 2"),
        (lambda b: b[:5] + b"\x09" + b[6:], "report format 9"),
        (lambda b: b[:6] + struct.pack(">H", 0) + b[8:], "0 certificates"),
        (lambda b: b[:8] + struct.pack(">I", 1183) + b[12:], "must be 1184 bytes"),
        (lambda b: b[:12 + 1184] + struct.pack(">I", 10**9) + b[12 + 1188:], "length"),
        (lambda b: b[:12] + struct.pack("<I", 4) + b[16:], "version 4 is not supported"),
        (lambda b: b[:6] + struct.pack(">H", 1) + b[8:12 + 1184] + struct.pack(">I", 9)
         + b"\x30\x07garbage", "not a valid X.509 certificate"),
        (lambda b: b[:20] * 5000, "more than"),
        (lambda b: b"", "'SNPE' header"),
    ],
)
def test_malformed_evidence_raises_specific_error(mutate, message: str) -> None:  # type: ignore[no-untyped-def]
    bad = mutate(_good_evidence())
    context = VerificationContext(expected_report_data=b"\0" * 32)
    with pytest.raises(MalformedEvidence, match=message):
        SnpVerifier().verify(bad, context)


def test_hcl_report_with_bad_sizes_is_malformed() -> None:
    report, _ = azure_hcl()
    bad = report[:0x4D0] + struct.pack("<I", 5000) + report[0x4D4:]
    with pytest.raises(MalformedEvidence, match="variable data size"):
        parse_hcl_report(bad)
    with pytest.raises(MalformedEvidence, match="HCLA"):
        parse_hcl_report(b"ABCD" + report[4:])


def test_bad_expected_report_data_length_is_a_usage_error() -> None:
    with pytest.raises(ValueError, match="32 or 64"):
        SnpVerifier().verify(_good_evidence(),
                             VerificationContext(expected_report_data=b"\0" * 16))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_any_corruption_is_malformed_or_a_failure(data: st.DataObject) -> None:
    """Flipping bytes anywhere never escapes as an unexpected error, and never verifies."""
    evidence = bytearray(_good_evidence())
    positions = data.draw(st.lists(st.integers(0, len(evidence) - 1), min_size=1, max_size=4))
    for pos in positions:
        evidence[pos] ^= data.draw(st.integers(1, 255))
    report, _ = virtee()
    context = VerificationContext(expected_report_data=parse_report(report).report_data,
                                  reference={"now": VALID_DAY})
    try:
        result = SnpVerifier().verify(bytes(evidence), context)
    except MalformedEvidence:
        return
    # A flip in the unsigned, unchecked parts could leave a valid result only if it changed
    # nothing the verifier reads; every byte here is read (header, report, certificate).
    if result.ok:
        decoded = decode_evidence(bytes(evidence))
        assert decoded.report == report, "a changed report verified"
        assert load_certificate(decoded.certificates[0], "vcek").public_key() == \
            load_certificate(virtee()[1][0], "vcek").public_key()


def test_gosev_product_stepping_as_published() -> None:
    """go-sev-guest: passes with product Milan stepping 0; stepping 12 is refused."""
    report, certs = gosev()
    evidence = encode_evidence(report, certs)
    expected = parse_report(report).report_data

    def run(stepping: int) -> VerificationResult:
        return SnpVerifier().verify(evidence, VerificationContext(
            expected_report_data=expected,
            reference={"now": VALID_DAY, "snp_expected_stepping": stepping}))

    good = run(0)
    assert good.ok
    assert good.claims["snp.product_name"] == "Milan-B0"
    assert good.claims["snp.stepping"] == 0
    bad = run(12)
    assert _ids(bad) == {"snp.product"}
    assert bad.failures[0].message == "expected product stepping 12, got 0"
