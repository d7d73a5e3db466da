"""TDX verifier against every real TDX quote in shared/vectors (PROVENANCE.md section 2).

Positive cases assert the published parsed values; negative cases are the published ones
(an expired validation time) plus a flipped byte in each signed region, each of which must
fail with its own failure id. Validation times are the ones PROVENANCE.md names: 2023-07-01
for full collateral of the FMSPC 50806f000000 quotes, 2026-02-03 for quote-and-PCK checks.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import struct
from pathlib import Path

import pytest
from cryptography import x509
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attest.interface import MalformedEvidence, VerificationContext, VerificationResult
from attest.tdx import IntelTrustStore, TdxCollateral, TdxVerifier, parse_quote
from attest.tdx.collateral import CollateralError, TcbInfo

VECTORS = Path(__file__).resolve().parents[3] / "shared" / "vectors"
if not VECTORS.is_dir():
    VECTORS = Path("/work/shared/vectors")
GOTDX = VECTORS / "tdx" / "go-tdx-guest"
TRUSTEE = VECTORS / "tdx" / "trustee"

JULY_2023 = dt.datetime(2023, 7, 1, tzinfo=dt.UTC)
FEB_2026 = dt.datetime(2026, 2, 3, tzinfo=dt.UTC)
NOV_2025 = dt.datetime(2025, 11, 1, tzinfo=dt.UTC)
YEAR_2053 = dt.datetime(2053, 7, 1, tzinfo=dt.UTC)

QUOTES = {
    "trustee-v4": "tdx/trustee/tdx_quote_4.dat",
    "trustee-v5": "tdx/trustee/tdx_quote_5.dat",
    "trustee-6": "tdx/trustee/tdx_quote_6.dat",
    "gotdx-spr-e4": "tdx/go-tdx-guest/tdx_prod_quote_SPR_E4.dat",
    "gotdx-v5": "tdx/go-tdx-guest/quote_v5_sample.dat",
    "azure": "azure-tdx-vtpm/td-quote.bin",
}
# name: (version, body type, FMSPC, declared size, trailing bytes) from PROVENANCE.md
SHAPES = {
    "trustee-v4": (4, 2, "50806f000000", 4936, 0),
    "trustee-v5": (5, 3, "90c06f000000", 5006, 0),
    "trustee-6": (4, 2, "00a06d080000", 4936, 70),
    "gotdx-spr-e4": (4, 2, "50806f000000", 4935, 39),
    "gotdx-v5": (5, 3, "90c06f000000", 5006, 0),
    "azure": (4, 2, "00806f050000", 4936, 70),
}


def _quote(name: str) -> bytes:
    return (VECTORS / QUOTES[name]).read_bytes()


def _collateral_2023() -> TdxCollateral:
    return TdxCollateral.load(
        tcb_info=(GOTDX / "sample_tcbInfo_response").read_bytes(),
        qe_identity=(GOTDX / "sample_qeIdentity_response").read_bytes(),
        signing_chain_pem=(GOTDX / "tcbInfoIssuerChain.pem").read_bytes(),
        pck_crl_der=(GOTDX / "pckcrl").read_bytes(),
        root_crl_der=(GOTDX / "rootcrl.der").read_bytes())


def _verify(quote: bytes, *, now: dt.datetime, collateral: TdxCollateral | None = None,
            expected: bytes | None = None,
            store: IntelTrustStore | None = None) -> VerificationResult:
    if expected is None:
        expected = parse_quote(quote).body.report_data
    reference: dict[str, object] = {"now": now}
    if collateral is not None:
        reference["tdx_collateral"] = collateral
    if store is not None:
        reference["tdx_trust_store"] = store
    return TdxVerifier().verify(
        quote, VerificationContext(expected_report_data=expected, reference=reference))


def _ids(result: VerificationResult) -> set[str]:
    return {f.id for f in result.failures if f.severity == "error"}


def _messages(result: VerificationResult) -> str:
    return " | ".join(f.message for f in result.failures)


# --- parsing -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(QUOTES))
def test_every_quote_parses_with_its_published_shape(name: str) -> None:
    data = _quote(name)
    quote = parse_quote(data)
    version, body_type, fmspc, declared, trailing = SHAPES[name]
    assert (quote.version, quote.body_type) == (version, body_type)
    assert quote.declared_size == declared and len(data) - declared == trailing
    assert quote.qe_vendor_id.hex() == "939a7233f79c4ca9940a0db3957f0607"
    assert quote.qe_auth_data == bytes(range(32))
    result = _verify(data, now=FEB_2026)
    assert result.claims["tdx.fmspc"] == fmspc
    assert result.claims["tdx.version"] == version


def test_trustee_v4_claims_equal_the_published_parse() -> None:
    expected = json.loads((TRUSTEE / "parse_tdx_claims_expected.json").read_text())
    body = expected["quote"]["body"]
    header = expected["quote"]["header"]
    claims = _verify(_quote("trustee-v4"), now=JULY_2023,
                     collateral=_collateral_2023()).claims
    assert claims["tdx.mr_td"] == body["mr_td"] == (
        "705ee9381b8633a9fbe532b52345e8433343d2868959f57889d84ca377c395b6"
        "89cac1599ccea1b7d420483a9ce5f031")
    for ours, theirs in (("mr_config_id", "mr_config_id"), ("mr_owner", "mr_owner"),
                         ("mr_owner_config", "mr_owner_config"), ("mr_seam", "mr_seam"),
                         ("mr_signer_seam", "mrsigner_seam"), ("report_data", "report_data"),
                         ("rtmr0", "rtmr_0"), ("rtmr1", "rtmr_1"), ("rtmr2", "rtmr_2"),
                         ("rtmr3", "rtmr_3"), ("seam_attributes", "seam_attributes"),
                         ("tee_tcb_svn", "tcb_svn"), ("td_attributes", "td_attributes"),
                         ("xfam", "xfam")):
        assert claims[f"tdx.{ours}"] == body[theirs], ours
    assert claims["tdx.mr_seam"].startswith("2fd279c1") and claims["tdx.mr_seam"].endswith(
        "63c656")
    assert claims["tdx.rtmr0"].endswith("b288") and claims["tdx.rtmr1"].endswith("a596")
    assert claims["tdx.tee_tcb_svn"].startswith("0300050000")
    assert claims["tdx.td_attributes"] == "0100001000000000"
    assert claims["tdx.debug"] is True and expected["td_attributes"]["debug"] is True
    assert claims["tdx.sept_ve_disable"] is True
    assert expected["td_attributes"]["septve_disable"] is True
    quote = parse_quote(_quote("trustee-v4"))
    assert quote.user_data.hex() == header["user_data"]
    # trustee prints the PCK platform instance id byte-reversed
    assert expected["platform_instance_id"] == "82548d228d94d5e204a95b354dc61a02"
    assert bytes.fromhex(claims["tdx.platform_instance_id"])[::-1].hex() == (
        expected["platform_instance_id"])


# --- full verification -----------------------------------------------------------------------

def test_trustee_v4_with_full_collateral_is_up_to_date() -> None:
    result = _verify(_quote("trustee-v4"), now=JULY_2023, collateral=_collateral_2023())
    assert result.ok, result.failures
    assert result.failures == ()
    c = result.claims
    assert c["evidence.verified"] is True and c["evidence.kind"] == "tdx"
    assert c["tdx.tcb.status"] == "UpToDate"
    assert (c["tdx.tcb.platform_status"], c["tdx.tcb.module_status"],
            c["tdx.tcb.qe_status"]) == ("UpToDate", "UpToDate", "UpToDate")
    assert c["tdx.tcb.advisory_ids"] == []
    assert c["tdx.tcb.evaluation_data_number"] == 15
    assert c["tdx.tcb.date"] == "2023-02-15T00:00:00Z"


def test_spr_e4_collateral_verifies_but_its_engineering_tcb_matches_no_level() -> None:
    # Every signature, chain, CRL and collateral check passes at 2023-07-01 (go-tdx-guest's
    # expectation); its CPU SVN (3,3,2,2,2,1,0,2) is below every level of that TCB Info, which
    # Intel's QVL reports as "TCB not supported".
    result = _verify(_quote("gotdx-spr-e4"), now=JULY_2023, collateral=_collateral_2023())
    assert _ids(result) == {"tdx.tcb"}
    assert "not supported" in _messages(result)
    assert result.claims["tdx.tcb.status"] == "Unknown"
    assert result.claims["tdx.debug"] is False


@pytest.mark.parametrize("name", sorted(QUOTES))
def test_quote_and_pck_chain_verify_for_every_quote_at_2026_02_03(name: str) -> None:
    result = _verify(_quote(name), now=FEB_2026)
    assert _ids(result) == {"tdx.collateral.missing"}, result.failures
    assert result.claims["tdx.tcb.status"] == "Unknown"
    assert result.claims["evidence.verified"] is False


def test_trustee_6_with_its_tcb_info_is_out_of_date() -> None:
    # tcbInfo.json (FMSPC 00A06D080000) and enclaveIdentity.json are both current on
    # 2025-11-01; the TCB Signing certificate we hold expired 2025-05-21 (PROVENANCE.md),
    # which is the one chain failure. PCESVN 11 < 13 puts the platform on the OutOfDate level.
    collateral = TdxCollateral.load(
        tcb_info=(TRUSTEE / "tcbInfo.json").read_bytes(),
        qe_identity=(TRUSTEE / "enclaveIdentity.json").read_bytes(),
        signing_chain_pem=(GOTDX / "tcbInfoIssuerChain.pem").read_bytes())
    result = _verify(_quote("trustee-6"), now=NOV_2025, collateral=collateral)
    assert _ids(result) == {"tdx.collateral.chain", "tdx.crl"}
    assert "not valid at validation time" in _messages(result)
    c = result.claims
    assert c["tdx.tcb.status"] == "OutOfDate"
    assert c["tdx.tcb.platform_status"] == "OutOfDate"
    assert c["tdx.tcb.module_status"] == "UpToDate"  # TDX_03, module SVN 5 >= 3
    assert c["tdx.tcb.evaluation_data_number"] == 17
    assert any(f.id == "tdx.tcb.status" and f.severity == "warning" for f in result.failures)


def test_v5_quotes_against_the_v5_tcb_info() -> None:
    collateral = TdxCollateral.load(
        tcb_info=(GOTDX / "sample_tcbinfo_response_v5").read_bytes(),
        qe_identity=None,
        signing_chain_pem=(GOTDX / "tcbInfoIssuerChain.pem").read_bytes())
    sample = _verify(_quote("gotdx-v5"), now=FEB_2026, collateral=collateral)
    assert sample.claims["tdx.tcb.platform_status"] == "UpToDate"
    assert sample.claims["tdx.tcb.module_status"] == "UpToDate"
    assert "tdx.tcb" not in _ids(sample)
    trustee = _verify(_quote("trustee-v5"), now=FEB_2026, collateral=collateral)
    assert "tdx.tcb" in _ids(trustee)  # CPU SVN (1,1,...) is below every level
    for result in (sample, trustee):
        assert "tdx.collateral.qe_identity" in _ids(result)  # none valid at that time


def test_published_negative_2053_pck_expired_and_tcb_info_expired() -> None:
    result = _verify(_quote("gotdx-spr-e4"), now=YEAR_2053, collateral=_collateral_2023())
    ids = _ids(result)
    assert {"tdx.pck.chain", "tdx.collateral.tcb_info", "tdx.collateral.qe_identity"} <= ids
    messages = _messages(result)
    assert "not valid at validation time" in messages
    assert "tcbInfo has expired" in messages


def test_session_binding_is_checked() -> None:
    result = _verify(_quote("trustee-v4"), now=JULY_2023, collateral=_collateral_2023(),
                     expected=hashlib.sha256(b"another session").digest())
    assert _ids(result) == {"tdx.report_data"}


def test_an_untrusted_root_fails_the_pck_and_collateral_chains() -> None:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "Intel SGX Root CA")])
    rogue = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
             .public_key(key.public_key()).serial_number(1)
             .not_valid_before(dt.datetime(2000, 1, 1)).not_valid_after(dt.datetime(2090, 1, 1))
             .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
             .sign(key, hashes.SHA256()))
    result = _verify(_quote("trustee-v4"), now=JULY_2023, collateral=_collateral_2023(),
                     store=IntelTrustStore(roots=(rogue,)))
    assert {"tdx.pck.chain", "tdx.collateral.chain"} <= _ids(result)


# --- mutations: one byte in each signed region ---------------------------------------------

def _sig_data_offset(quote: bytes) -> int:
    return 48 + (584 if quote[0] == 4 else 6 + struct.unpack_from("<I", quote, 50)[0]) + 4


def _region(quote: bytes, name: str) -> int:
    sig = _sig_data_offset(quote)
    body = 48 if quote[0] == 4 else 54
    return {
        "header.user_data": 30,
        "body.mr_td": body + 136,
        "body.td_attributes": body + 120,
        "body.rtmr3": body + 472,
        "body.report_data": body + 520,
        "signature": sig + 5,
        "attestation_key": sig + 64 + 7,
        "qe_report.mr_enclave": sig + 134 + 64,
        "qe_report.isv_svn": sig + 134 + 258,
        "qe_report_signature": sig + 134 + 384 + 10,
        "qe_auth_data": sig + 134 + 384 + 64 + 2 + 3,
    }[name]


MUTATIONS = {
    "header.user_data": {"tdx.quote.signature"},
    "body.mr_td": {"tdx.quote.signature"},
    "body.td_attributes": {"tdx.quote.signature"},
    "body.rtmr3": {"tdx.quote.signature"},
    "body.report_data": {"tdx.quote.signature", "tdx.report_data"},
    "signature": {"tdx.quote.signature"},
    "attestation_key": {"tdx.quote.signature", "tdx.qe_report.binding"},
    "qe_report.mr_enclave": {"tdx.qe_report.signature"},
    "qe_report.isv_svn": {"tdx.qe_report.signature"},
    "qe_report_signature": {"tdx.qe_report.signature"},
    "qe_auth_data": {"tdx.qe_report.binding"},
}


@pytest.mark.parametrize("region", sorted(MUTATIONS))
@pytest.mark.parametrize("name", ["trustee-v4", "gotdx-v5"])
def test_a_flipped_byte_in_each_signed_region_fails_its_check(name: str, region: str) -> None:
    original = _quote(name)
    expected = parse_quote(original).body.report_data
    tampered = bytearray(original)
    tampered[_region(original, region)] ^= 0x01
    collateral = _collateral_2023() if name == "trustee-v4" else None
    when = JULY_2023 if name == "trustee-v4" else FEB_2026
    result = _verify(bytes(tampered), now=when, collateral=collateral, expected=expected)
    ids = _ids(result) - {"tdx.collateral.missing"}
    assert ids == MUTATIONS[region], (region, result.failures)
    assert result.claims["evidence.verified"] is False


def test_a_pck_chain_from_another_platform_fails_the_qe_report_and_fmspc() -> None:
    # quotes 4 and 6 carry PCK chains of the same length from different platforms
    four, six = bytearray(_quote("trustee-v4")), _quote("trustee-6")
    start = four.index(b"-----BEGIN CERTIFICATE-----")
    assert six.index(b"-----BEGIN CERTIFICATE-----") == start
    four[start:4936] = six[start:4936]
    result = _verify(bytes(four), now=JULY_2023, collateral=_collateral_2023())
    assert {"tdx.qe_report.signature", "tdx.collateral.tcb_info"} <= _ids(result)
    assert "tdx.quote.signature" not in _ids(result)


def test_tampered_collateral_fails_its_signature() -> None:
    raw = (GOTDX / "sample_tcbInfo_response").read_bytes()
    tampered = raw.replace(b'"tcbStatus":"OutOfDate"', b'"tcbStatus":"UpToDate"', 1)
    assert tampered != raw
    collateral = TdxCollateral.load(
        tcb_info=tampered,
        qe_identity=(GOTDX / "sample_qeIdentity_response").read_bytes(),
        signing_chain_pem=(GOTDX / "tcbInfoIssuerChain.pem").read_bytes(),
        pck_crl_der=(GOTDX / "pckcrl").read_bytes(),
        root_crl_der=(GOTDX / "rootcrl.der").read_bytes())
    result = _verify(_quote("trustee-v4"), now=JULY_2023, collateral=collateral)
    assert _ids(result) == {"tdx.collateral.tcb_info"}
    assert "signature does not verify" in _messages(result)
    ident = (GOTDX / "sample_qeIdentity_response").read_bytes().replace(
        b'"isvprodid":2', b'"isvprodid":3')
    collateral = TdxCollateral.load(
        tcb_info=raw, qe_identity=ident,
        signing_chain_pem=(GOTDX / "tcbInfoIssuerChain.pem").read_bytes(),
        pck_crl_der=(GOTDX / "pckcrl").read_bytes(),
        root_crl_der=(GOTDX / "rootcrl.der").read_bytes())
    result = _verify(_quote("trustee-v4"), now=JULY_2023, collateral=collateral)
    assert _ids(result) == {"tdx.collateral.qe_identity", "tdx.qe_identity"}


def test_crls_from_the_wrong_issuer_are_refused() -> None:
    collateral = TdxCollateral.load(
        tcb_info=(GOTDX / "sample_tcbInfo_response").read_bytes(),
        qe_identity=(GOTDX / "sample_qeIdentity_response").read_bytes(),
        signing_chain_pem=(GOTDX / "tcbInfoIssuerChain.pem").read_bytes(),
        pck_crl_der=(GOTDX / "rootcrl.der").read_bytes(),
        root_crl_der=(GOTDX / "pckcrl").read_bytes())
    result = _verify(_quote("trustee-v4"), now=JULY_2023, collateral=collateral)
    assert _ids(result) == {"tdx.crl"}
    assert "is not signed by" in _messages(result)


def test_collateral_validity_window_is_enforced_for_crls() -> None:
    # the PCK CRL and QE identity expire 2023-07-08 (PROVENANCE.md)
    result = _verify(_quote("trustee-v4"), now=dt.datetime(2023, 7, 9, tzinfo=dt.UTC),
                     collateral=_collateral_2023())
    assert _ids(result) == {"tdx.crl", "tdx.collateral.qe_identity"}


# --- malformed input -------------------------------------------------------------------------

def test_truncation_anywhere_inside_the_declared_lengths_is_malformed() -> None:
    data = _quote("trustee-v4")
    for cut in (0, 47, 48, 631, 632, 635, 700, 766, 1150, 1214, 1216, 1248, 1254, 4000, 4935):
        with pytest.raises(MalformedEvidence):
            parse_quote(data[:cut])


@pytest.mark.parametrize(("offset", "value", "fmt", "what"), [
    (0, 3, "<H", "version"),
    (2, 3, "<H", "attestation key type"),
    (4, 0, "<I", "tee_type"),
    (632, 0xFFFFFFFF, "<I", "sig_data_len"),
    (632 + 4 + 128, 7, "<H", "certification data type"),
    (632 + 4 + 130, 10**6, "<I", "certification data size"),
    (632 + 4 + 134 + 448, 60000, "<H", "QE auth data length"),
    (632 + 4 + 134 + 448 + 2 + 32 + 2, 0x7FFFFFFF, "<I", "PCK chain size"),
])
def test_bad_length_and_type_fields_are_malformed(offset: int, value: int, fmt: str,
                                                  what: str) -> None:
    data = bytearray(_quote("trustee-v4"))
    struct.pack_into(fmt, data, offset, value)
    with pytest.raises(MalformedEvidence):
        parse_quote(bytes(data))


def test_v5_body_type_and_size_must_agree() -> None:
    data = bytearray(_quote("gotdx-v5"))
    struct.pack_into("<I", data, 50, 584)
    with pytest.raises(MalformedEvidence, match="648"):
        parse_quote(bytes(data))


def test_oversized_quotes_are_refused_before_parsing() -> None:
    with pytest.raises(MalformedEvidence, match="more than"):
        parse_quote(_quote("trustee-v4") + bytes(40000))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_random_damage_is_malformed_or_a_failure_never_a_crash(data: st.DataObject) -> None:
    quote = bytearray(_quote("trustee-v4"))
    for _ in range(data.draw(st.integers(1, 4))):
        index = data.draw(st.integers(0, len(quote) - 1))
        quote[index] = data.draw(st.integers(0, 255))
    try:
        result = _verify(bytes(quote), now=FEB_2026,
                         expected=parse_quote(_quote("trustee-v4")).body.report_data)
    except MalformedEvidence:
        return
    # every byte of this quote lies inside its declared lengths, so any change is caught
    assert bytes(quote) == _quote("trustee-v4") or not result.ok


def test_collateral_that_is_not_pcs_json_is_refused_at_load() -> None:
    for bad in (b"", b"[]", b'{"tcbInfo":{}}', b'{"tcbInfo":{"id":"TDX"},"signature":"zz"}',
                b"{" * 10):
        with pytest.raises(CollateralError):
            TcbInfo.parse(bad)


# --- Azure TDX (HCL report + vTPM), PROVENANCE.md 2c ------------------------------------------

AZURE = VECTORS / "azure-tdx-vtpm"


def _azure(hcl: bytes | None = None, expected: bytes = bytes(32)) -> VerificationResult:
    from attest.tdx import encode_azure_evidence

    evidence = encode_azure_evidence((AZURE / "td-quote.bin").read_bytes(),
                                     hcl or (AZURE / "hcl-report.bin").read_bytes())
    return TdxVerifier().verify(evidence, VerificationContext(
        expected_report_data=expected, reference={"now": FEB_2026}))


def test_azure_tdx_hcl_report_binds_to_the_quote() -> None:
    result = _azure()
    assert _ids(result) == {"tdx.collateral.missing"}
    c = result.claims
    assert c["tdx.hcl.user_data"] == "00" * 64  # the recorded VM's user-data
    assert c["tdx.hcl.vm.secure_boot"] is True and c["tdx.hcl.vm.tpm_enabled"] is True
    assert c["tdx.fmspc"] == "00806f050000"


def test_azure_published_negative_byte_0x880_breaks_the_var_data_binding() -> None:
    hcl = bytearray((AZURE / "hcl-report.bin").read_bytes())
    hcl[0x880] = (hcl[0x880] + 1) & 0xFF
    result = _azure(bytes(hcl))
    assert _ids(result) == {"tdx.collateral.missing", "tdx.hcl.var_data"}


def test_azure_tdreport_must_match_the_quote() -> None:
    hcl = bytearray((AZURE / "hcl-report.bin").read_bytes())
    hcl[0x20 + 528] ^= 1  # TDREPORT MRTD
    assert _ids(_azure(bytes(hcl))) == {"tdx.collateral.missing", "tdx.hcl.tdreport"}
    assert "tdx.report_data" in _ids(_azure(expected=hashlib.sha256(b"session").digest()))


def test_azure_vtpm_quote_verifies_under_the_hcl_ak() -> None:
    import base64

    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding, rsa

    from attest.snp.hcl import parse_hcl_report

    hcl = parse_hcl_report((AZURE / "hcl-report.bin").read_bytes(), report_type=4)
    jwk = hcl.jwk("HCLAkPub")
    assert jwk is not None

    def b64(value: str) -> int:
        return int.from_bytes(base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)), "big")

    key = rsa.RSAPublicNumbers(b64(jwk["e"]), b64(jwk["n"])).public_key()
    doc = json.loads((AZURE / "tpm-quote-v1.json").read_text())
    message = bytes.fromhex(doc["message"])
    key.verify(bytes.fromhex(doc["signature"]), message, padding.PKCS1v15(), hashes.SHA256())
    pcrs = [bytes.fromhex(p) for p in doc["pcrs"]]
    assert pcrs[0].hex() == "782b20b10f55cc46e2142cc2145d548698073e5beb82752c8d7f9279f0d8a273"
    # TPMS_ATTEST: magic, type, qualifiedSigner (TPM2B), extraData (TPM2B) = the nonce
    signer_len = struct.unpack_from(">H", message, 6)[0]
    pos = 8 + signer_len
    nonce_len = struct.unpack_from(">H", message, pos)[0]
    assert message[pos + 2:pos + 2 + nonce_len] == b"challenge"
    assert hashlib.sha256(b"".join(pcrs)).digest() in message


def test_collateral_parses_to_the_published_values() -> None:
    from attest.tdx.collateral import EnclaveIdentity

    info = TcbInfo.parse((TRUSTEE / "tcbInfo.json").read_bytes())
    assert (info.id, info.version, info.fmspc.hex(), info.pce_id.hex()) == (
        "TDX", 3, "00a06d080000", "0000")
    assert info.evaluation_data_number == 17
    assert info.issue_date == dt.datetime(2025, 10, 27, 13, 7, 17, tzinfo=dt.UTC)
    ident = EnclaveIdentity.parse((TRUSTEE / "enclaveIdentity.json").read_bytes())
    assert (ident.id, ident.version, ident.isv_prod_id) == ("TD_QE", 2, 2)
    go = TcbInfo.parse((GOTDX / "sample_tcbInfo_response").read_bytes())
    assert (go.fmspc.hex(), go.issue_date.date()) == ("50806f000000", dt.date(2023, 6, 18))
    v5 = TcbInfo.parse((GOTDX / "sample_tcbinfo_response_v5").read_bytes())
    assert (v5.fmspc.hex(), v5.issue_date.date()) == ("90c06f000000", dt.date(2026, 2, 1))
    collateral = _collateral_2023()
    assert collateral.pck_crl is not None and len(collateral.pck_crl) == 44
    assert collateral.root_crl is not None and len(collateral.root_crl) == 0
    # the signed bytes are the exact served bytes of the tcbInfo value
    raw = (GOTDX / "sample_tcbInfo_response").read_bytes()
    assert raw.startswith(b'{"tcbInfo":' + go.signed_bytes + b',"signature":"')


def test_spr_e4_verifies_without_collateral_at_2023_07_01() -> None:
    result = _verify(_quote("gotdx-spr-e4"), now=JULY_2023)
    assert _ids(result) == {"tdx.collateral.missing"}
    assert result.claims["tdx.fmspc"] == "50806f000000"


# --- TCB level matching over every status (software TEE collateral) -----------------------------

@pytest.fixture(scope="module")
def soft(tmp_path_factory: pytest.TempPathFactory):
    from tests.attest.softtee import SoftTdx

    return SoftTdx.create(tmp_path_factory.mktemp("soft-tdx"))


def _soft_verify(soft, collateral, tee_tcb_svn: bytes) -> VerificationResult:
    binding = hashlib.sha256(b"s").digest()
    quote = soft.quote(binding + bytes(32), tee_tcb_svn=tee_tcb_svn)
    return TdxVerifier(trust_store=soft.trust_store(), collateral=collateral).verify(
        quote, VerificationContext(expected_report_data=binding))


def _svn(*head: int) -> bytes:
    return bytes(head) + bytes(16 - len(head))


@pytest.mark.parametrize(("svn", "status", "ids"), [
    (_svn(3, 0, 9), "UpToDate", set()),
    (_svn(3, 0, 7), "SWHardeningNeeded", set()),
    (_svn(3, 0, 6), "ConfigurationNeeded", set()),
    (_svn(3, 0, 5), "OutOfDate", set()),
    (_svn(3, 0, 4), "OutOfDateConfigurationNeeded", set()),
    (_svn(3, 0, 2), "Revoked", {"tdx.tcb"}),
    (_svn(3, 0, 1), "Unknown", {"tdx.tcb"}),  # below every level: TCB not supported
])
def test_tcb_levels_match_to_each_status(soft, svn: bytes, status: str, ids: set[str]) -> None:
    collateral = soft.collateral(tcb_levels=[
        (_svn(3, 0, 9), "UpToDate"), (_svn(3, 0, 7), "SWHardeningNeeded"),
        (_svn(3, 0, 6), "ConfigurationNeeded"), (_svn(3, 0, 5), "OutOfDate"),
        (_svn(3, 0, 4), "OutOfDateConfigurationNeeded"), (_svn(3, 0, 2), "Revoked")])
    result = _soft_verify(soft, collateral, svn)
    assert result.claims["tdx.tcb.status"] == status
    assert _ids(result) == ids
    warned = {f.id for f in result.failures if f.severity == "warning"}
    assert warned == ({"tdx.tcb.status"} if status not in ("UpToDate", "Revoked", "Unknown")
                      else set())
    if status not in ("UpToDate", "Unknown"):
        assert result.claims["tdx.tcb.advisory_ids"]


def test_an_out_of_date_qe_lowers_the_status(soft) -> None:
    collateral = soft.collateral(qe_levels=[(5, "UpToDate"), (4, "OutOfDate")])
    result = _soft_verify(soft, collateral, _svn(3, 0, 5))  # the soft QE has ISVSVN 4
    assert (result.claims["tdx.tcb.platform_status"], result.claims["tdx.tcb.qe_status"],
            result.claims["tdx.tcb.status"]) == ("UpToDate", "OutOfDate", "OutOfDate")


def test_tdx_module_identity_gives_the_module_status(soft) -> None:
    zero = {"mrsigner": "00" * 48, "attributes": "00" * 8, "attributesMask": "ff" * 8}
    collateral = soft.collateral(
        tcb_levels=[(_svn(0, 0, 5), "UpToDate")],
        module_identities=[{"id": "TDX_01", **zero, "tcbLevels": [
            {"tcb": {"isvsvn": 6}, "tcbDate": "2024-03-13T00:00:00Z", "tcbStatus": "UpToDate"},
            {"tcb": {"isvsvn": 2}, "tcbDate": "2023-03-13T00:00:00Z",
             "tcbStatus": "OutOfDate"}]}])
    current = _soft_verify(soft, collateral, _svn(7, 1, 5))  # module 1.7: bytes 0-1 skipped
    assert (current.claims["tdx.tcb.module_status"], current.claims["tdx.tcb.status"]) == (
        "UpToDate", "UpToDate")
    old = _soft_verify(soft, collateral, _svn(3, 1, 5))
    assert (old.claims["tdx.tcb.module_status"], old.claims["tdx.tcb.status"]) == (
        "OutOfDate", "OutOfDate")
    unknown = _soft_verify(soft, collateral, _svn(3, 2, 5))
    assert "tdx.tcb" in _ids(unknown)  # no TDX_02 identity


def test_a_revoked_pck_is_refused(soft) -> None:
    result = _soft_verify(soft, soft.collateral(revoke_pck=True), _svn(3, 0, 5))
    assert _ids(result) == {"tdx.pck.revoked"}
    assert "Soft TEE SGX PCK Certificate" in result.failures[0].message
    assert _ids(_soft_verify(soft, soft.collateral(), _svn(3, 0, 5))) == set()


def test_the_pck_chain_must_be_canonical_and_exactly_the_path() -> None:
    data = _quote("trustee-v4")
    start = data.index(b"-----BEGIN CERTIFICATE-----")
    crlf = bytearray(data)
    crlf[start + 27] = 0x0D  # the first PEM line end, LF -> CR
    expected = parse_quote(data).body.report_data
    with pytest.raises(MalformedEvidence, match="canonical PEM"):
        _verify(bytes(crlf), now=FEB_2026, expected=expected)
    # the root copy in the quote is not on the validated path (the pinned root is); a damaged
    # copy that still parses is refused rather than ignored
    root_at = data.index(b"-----BEGIN CERTIFICATE-----", data.index(
        b"-----BEGIN CERTIFICATE-----", start + 1) + 1)
    damaged = bytearray(data)
    damaged[4090] = ord("A")  # in the root copy's issuer name (base64), still valid DER
    assert root_at < 4090
    result = _verify(bytes(damaged), now=FEB_2026, expected=expected)
    assert _ids(result) == {"tdx.collateral.missing", "tdx.pck.chain"}
    assert "not exactly the path" in _messages(result)
