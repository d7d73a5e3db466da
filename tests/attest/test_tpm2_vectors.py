"""Real TPM quotes from producers no one here wrote verify with our quote core, and fail after
a one-byte change (see /work/shared/vectors/PROVENANCE.md section 4 and 1d/2c).

* keylime: tpm2-tools output from keylime's test_checkquote (AK PEM, nonce "Ai5M5SjYjnkyv4P7itH1")
* go-tpm-tools: a GCE Shielded VM vTPM, three PCR banks, nonce 0x9009, AK as TPMT_PUBLIC
* go-attestation: a GCP Windows Shielded VM vTPM, SHA-1 bank, RSASSA-SHA1, empty nonce
* Azure CVM vTPMs (SNP and TDX): HCLAkPub from the HCL report's var_data, nonce "challenge"
"""

from __future__ import annotations

import base64
import json
import struct
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from attest.interface import MalformedEvidence
from attest.tpm2.enrolment import EkTrustStore, check_ek_certificate
from attest.tpm2.marshal import (
    ALG_RSASSA,
    ALG_SHA256,
    TpmPublic,
    parse_attest,
    parse_public,
    trim_der,
)
from attest.tpm2.quote import PublicKey, check_quote
from attest.tpm2.tpm2tools import parse_tpm2tools_pcrs

VECTORS = Path("/work/shared/vectors")
TPM = VECTORS / "tpm"


@dataclass(frozen=True)
class Case:
    attest: bytes
    signature: bytes
    ak: PublicKey
    nonce: bytes
    pcrs: dict[int, dict[int, bytes]]


def keylime() -> Case:
    d = TPM / "keylime"
    return Case(
        (d / "quote.tpms_attest.bin").read_bytes(),
        (d / "quote.tpmt_signature.bin").read_bytes(),
        load_pem_public_key((d / "aik_pub.pem").read_bytes()),  # type: ignore[arg-type]
        (d / "nonce.txt").read_bytes().strip(),
        parse_tpm2tools_pcrs((d / "pcrs.tpm2tools_pcrs_output.bin").read_bytes()),
    )


def gce(index: int) -> Case:
    d = TPM / "go-tpm-tools/derived_from_nonce9009"
    parsed = json.loads((d / "parsed.json").read_text())
    quote = parsed["quotes"][index]
    stem = f"quote{index}_{quote['hash']}"
    bank = int(quote["hash"], 16)
    return Case(
        (d / f"{stem}.tpms_attest.bin").read_bytes(),
        (d / f"{stem}.tpmt_signature.bin").read_bytes(),
        parse_public((d / "ak_pub.tpmt_public.bin").read_bytes()).key,
        bytes.fromhex("9009"),
        {bank: {int(k): bytes.fromhex(v) for k, v in quote["pcrs"].items()}},
    )


def go_attestation() -> Case:
    j = json.loads((TPM / "go-attestation/windows_gcp_shielded_vm.json").read_text())
    pcrs = {p["Index"]: base64.b64decode(p["Digest"]) for p in j["Log"]["PCRs"]}
    return Case(
        base64.b64decode(j["Quote"]["Quote"]),
        base64.b64decode(j["Quote"]["Signature"]),
        parse_public(base64.b64decode(j["AK"]["Public"])).key,
        base64.b64decode(j["Quote"]["Nonce"]),
        {0x0004: pcrs},
    )


def _b64url_int(s: str) -> int:
    return int.from_bytes(base64.urlsafe_b64decode(s + "=" * (-len(s) % 4)), "big")


def azure(folder: str) -> Case:
    d = VECTORS / folder
    hcl = (d / "hcl-report.bin").read_bytes()
    var_data, _ = json.JSONDecoder().raw_decode(hcl[hcl.index(b'{"keys"') :].decode("latin-1"))
    jwk = next(k for k in var_data["keys"] if k["kid"] == "HCLAkPub")
    ak = rsa.RSAPublicNumbers(_b64url_int(jwk["e"]), _b64url_int(jwk["n"])).public_key()
    q = json.loads((d / "tpm-quote-v1.json").read_text())
    raw_sig = bytes.fromhex(q["signature"])
    # the JSON carries the bare RSA signature; wrap it as the TPMT_SIGNATURE the TPM returned
    tpmt = struct.pack(">HHH", ALG_RSASSA, ALG_SHA256, len(raw_sig)) + raw_sig
    return Case(
        bytes.fromhex(q["message"]),
        tpmt,
        ak,
        b"challenge",
        {ALG_SHA256: {i: bytes.fromhex(v) for i, v in enumerate(q["pcrs"])}},
    )


CASES = {
    "keylime": keylime,
    "gce-sha1-bank": lambda: gce(0),
    "gce-sha256-bank": lambda: gce(1),
    "gce-sha384-bank": lambda: gce(2),
    "go-attestation-windows": go_attestation,
    "azure-snp-vtpm": lambda: azure("azure-snp-vtpm"),
    "azure-tdx-vtpm": lambda: azure("azure-tdx-vtpm"),
}


@pytest.fixture(params=sorted(CASES))
def case(request) -> Case:
    return CASES[request.param]()


def _clock_offset(attest: bytes) -> int:
    signer_len = struct.unpack_from(">H", attest, 6)[0]
    extra_len = struct.unpack_from(">H", attest, 8 + signer_len)[0]
    return 8 + signer_len + 2 + extra_len + 7  # last byte of the 64-bit clock


def check(c: Case, *, attest=None, signature=None, nonce=None, pcrs=None):
    return check_quote(
        c.attest if attest is None else attest,
        c.signature if signature is None else signature,
        c.ak,
        expected_extra_data=c.nonce if nonce is None else nonce,
        pcr_values=c.pcrs if pcrs is None else pcrs,
    )


def test_published_quote_verifies(case):
    result = check(case)
    assert result.failures == ()
    assert result.attest.extra_data == case.nonce


def test_one_byte_change_in_the_attest_fails_the_signature(case):
    attest = bytearray(case.attest)
    attest[_clock_offset(case.attest)] ^= 1
    assert {f.id for f in check(case, attest=bytes(attest)).failures} == {"tpm2.signature"}


def test_one_byte_change_in_the_signature_fails(case):
    sig = bytearray(case.signature)
    sig[-5] ^= 0x40
    try:
        result = check(case, signature=bytes(sig))
    except MalformedEvidence:  # an ECDSA r/s change can break its framing; RSA cannot
        pytest.fail("a flipped signature byte must not change the signature framing")
    assert {f.id for f in result.failures} == {"tpm2.signature"}


def test_another_nonce_fails(case):
    assert {f.id for f in check(case, nonce=case.nonce + b"x").failures} == {"tpm2.nonce"}


def test_one_byte_change_in_a_quoted_pcr_fails_the_digest(case):
    attest = parse_attest(case.attest)
    bank, indices = attest.pcr_select.banks[0]
    pcrs = {b: dict(v) for b, v in case.pcrs.items()}
    value = bytearray(pcrs[bank][indices[-1]])
    value[5] ^= 1
    pcrs[bank][indices[-1]] = bytes(value)
    assert {f.id for f in check(case, pcrs=pcrs).failures} == {"tpm2.pcr_digest"}


def test_gce_ak_name_is_the_published_one():
    d = TPM / "go-tpm-tools/derived_from_nonce9009"
    published = json.loads((d / "parsed.json").read_text())["ak"]["name"]
    assert parse_public((d / "ak_pub.tpmt_public.bin").read_bytes()).name.hex() == published


def test_keylime_quote_covers_pcr16_with_the_published_value():
    c = keylime()
    assert parse_attest(c.attest).pcr_select.indices(ALG_SHA256) == (16,)
    assert c.pcrs[ALG_SHA256][16].hex() == (
        "d471c0674951f0ef075aecdd42fbefa6eca6019820add0bd222d1c4e6242ce6f"
    )


def test_truncated_attest_is_malformed():
    c = keylime()
    with pytest.raises(MalformedEvidence, match="TPMS_ATTEST"):
        check(c, attest=c.attest[:-1])


def test_wrong_magic_is_malformed():
    c = keylime()
    with pytest.raises(MalformedEvidence, match="magic"):
        check(c, attest=b"\x00" + c.attest[1:])


# -- real EK certificates (STMicro ST33, keylime's test data) against their vendor CAs ------

EK_CERTS = TPM / "keylime/ek_certs"
AT = datetime(2025, 1, 1, tzinfo=UTC)  # inside every certificate's validity window


def _ek_with_key_of(cert: x509.Certificate) -> TpmPublic:
    """A TpmPublic carrying the certified key (what the real TPM would have presented)."""
    key = cert.public_key()
    assert isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey)
    return TpmPublic(0x0001, ALG_SHA256, 0, b"", (0x0010, 0, 0), (0x0010, 0), key, 0, b"")


@pytest.mark.parametrize(
    ("leaf", "intermediate", "root"),
    [
        ("st_sha256_with_rsa.der", "STM_RSA_05I.pem", "STM_RSA_RT.pem"),
        ("st_ecdsa_sha256.der", "STM_ECC_01I.pem", "STM_ECC_01RT.pem"),
    ],
)
def test_real_vendor_ek_certificates_chain_to_their_root(leaf, intermediate, root):
    der = trim_der((EK_CERTS / leaf).read_bytes())  # NV padding after the DER is cut off
    cert = x509.load_der_x509_certificate(der)
    trust = EkTrustStore.from_pem([(EK_CERTS / root).read_bytes()],
                                  [(EK_CERTS / intermediate).read_bytes()])

    assert check_ek_certificate(der, _ek_with_key_of(cert), trust, now=AT) == []

    # without the vendor's root, or for another key, it is refused with the check named
    other_root = "STM_ECC_01RT.pem" if "RSA" in root else "STM_RSA_RT.pem"
    other = EkTrustStore.from_pem([(EK_CERTS / other_root).read_bytes()],
                                  [(EK_CERTS / intermediate).read_bytes()])
    assert {f.id for f in check_ek_certificate(der, _ek_with_key_of(cert), other, now=AT)} == {
        "tpm2.ek_cert_untrusted"}
    stranger = rsa.generate_private_key(65537, 2048).public_key()
    wrong_key = TpmPublic(0x0001, ALG_SHA256, 0, b"", (0x0010, 0, 0), (0x0010, 0), stranger, 0,
                          b"")
    assert {f.id for f in check_ek_certificate(der, wrong_key, trust, now=AT)} == {
        "tpm2.ek_mismatch"}


def test_untrimmed_nv_certificate_is_refused_with_a_reason():
    raw = (EK_CERTS / "st_sha256_with_rsa.der").read_bytes()
    assert len(raw) == 1600 and len(trim_der(raw)) == 1169
    trust = EkTrustStore.from_pem([(EK_CERTS / "STM_RSA_RT.pem").read_bytes()])
    key = rsa.generate_private_key(65537, 2048).public_key()
    ek = TpmPublic(0x0001, ALG_SHA256, 0, b"", (0x0010, 0, 0), (0x0010, 0), key, 0, b"")
    failures = check_ek_certificate(raw, ek, trust, now=AT)
    assert [f.id for f in failures] == ["tpm2.ek_cert_untrusted"]
    assert "DER" in failures[0].message


def test_tpm2_tools_pcr_file_errors_are_specific():
    data = (TPM / "keylime/pcrs.tpm2tools_pcrs_output.bin").read_bytes()
    with pytest.raises(MalformedEvidence, match="does not match the size"):
        parse_tpm2tools_pcrs(data[:-1])
    with pytest.raises(MalformedEvidence, match="truncated"):
        parse_tpm2tools_pcrs(data[:100])
    too_many = struct.pack("<I", 17) + data[4:]
    with pytest.raises(MalformedEvidence, match="17 banks"):
        parse_tpm2tools_pcrs(too_many)
