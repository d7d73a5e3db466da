"""EK certificate chains are validated by ``cryptography``'s X.509 path validation under the
TCG EK profile (``attest.tpm2.enrolment``), with a specific reason for each refusal.

A small manufacturer PKI (root -> intermediate -> EK) is built here per case, each with one
defect: wrong key usage on the intermediate, a path length the root forbids, an unknown
critical extension (on the EK or on the intermediate), an expired EK, an EK not issued by the
CA it names, an EK that is a CA, an EK whose EKU is not the TCG EK one. The well-formed chain
passes, so each refusal is due to its defect. Real vendor and swtpm chains are covered by
test_tpm2_vectors.py and test_tpm2_enrolment.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from attest.tpm2.enrolment import TCG_KP_EK_CERTIFICATE, EkTrustStore, check_ek_certificate
from attest.tpm2.marshal import ALG_SHA256, TpmPublic

NOW = datetime(2026, 6, 1, tzinfo=UTC)
UNKNOWN = x509.ObjectIdentifier("1.3.6.1.4.1.55555.1")


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _ca_usage(cert_sign: bool = True) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=not cert_sign, content_commitment=False,
                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                         key_cert_sign=cert_sign, crl_sign=cert_sign, encipher_only=False,
                         decipher_only=False)


EK_USAGE = x509.KeyUsage(digital_signature=False, content_commitment=False,
                         key_encipherment=False, data_encipherment=False, key_agreement=True,
                         key_cert_sign=False, crl_sign=False, encipher_only=False,
                         decipher_only=False)


@dataclass
class Defects:
    inter_usage: x509.KeyUsage = field(default_factory=_ca_usage)
    root_path_length: int | None = 1
    ek_critical_unknown: bool = False
    inter_critical_unknown: bool = False
    ek_not_after: datetime = NOW + timedelta(days=365)
    ek_signed_by_stranger: bool = False
    ek_is_ca: bool = False
    ek_eku: x509.ObjectIdentifier | None = TCG_KP_EK_CERTIFICATE


def _cert(subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePublicKey,
          signer: ec.EllipticCurvePrivateKey, exts: list[tuple[x509.ExtensionType, bool]],
          issuer_key: ec.EllipticCurvePublicKey, *,
          not_after: datetime = NOW + timedelta(days=3650)) -> x509.Certificate:
    b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key)
         .serial_number(x509.random_serial_number())
         .not_valid_before(NOW - timedelta(days=30)).not_valid_after(not_after)
         .add_extension(x509.SubjectKeyIdentifier.from_public_key(key), critical=False)
         .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key),
                        critical=False))
    for ext, critical in exts:
        b = b.add_extension(ext, critical=critical)
    return b.sign(signer, hashes.SHA256())


def _chain(d: Defects) -> tuple[bytes, TpmPublic, EkTrustStore]:
    root_key, inter_key, ek_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    root = _cert(_name("Vendor TPM Root"), _name("Vendor TPM Root"), root_key.public_key(),
                 root_key, [(x509.BasicConstraints(True, d.root_path_length), True),
                            (_ca_usage(), True)], root_key.public_key())
    inter_exts: list[tuple[x509.ExtensionType, bool]] = [
        (x509.BasicConstraints(True, None), True), (d.inter_usage, True)]
    if d.root_path_length == 0:  # a second intermediate the root's path length forbids
        inter_exts = [(x509.BasicConstraints(True, None), True), (_ca_usage(), True)]
    if d.inter_critical_unknown:
        inter_exts.append((x509.UnrecognizedExtension(UNKNOWN, b"\x05\x00"), True))
    inter = _cert(_name("Vendor TPM Issuing CA"), root.subject, inter_key.public_key(),
                  root_key, inter_exts, root_key.public_key())
    intermediates = [inter]
    issuer, issuer_key = inter, inter_key
    if d.root_path_length == 0:
        lower_key = ec.generate_private_key(ec.SECP256R1())
        lower = _cert(_name("Vendor TPM Issuing CA 2"), inter.subject, lower_key.public_key(),
                      inter_key, [(x509.BasicConstraints(True, None), True),
                                  (_ca_usage(), True)], inter_key.public_key())
        intermediates.append(lower)
        issuer, issuer_key = lower, lower_key
    san = x509.SubjectAlternativeName([x509.DirectoryName(x509.Name([
        x509.NameAttribute(x509.ObjectIdentifier("2.23.133.2.1"), "id:56454E44"),
        x509.NameAttribute(x509.ObjectIdentifier("2.23.133.2.2"), "model"),
        x509.NameAttribute(x509.ObjectIdentifier("2.23.133.2.3"), "id:00010002"),
    ]))])
    ek_exts: list[tuple[x509.ExtensionType, bool]] = [
        (san, True), (EK_USAGE, True), (x509.BasicConstraints(d.ek_is_ca, None), True)]
    if d.ek_eku is not None:
        ek_exts.append((x509.ExtendedKeyUsage([d.ek_eku]), False))
    if d.ek_critical_unknown:
        ek_exts.append((x509.UnrecognizedExtension(UNKNOWN, b"\x05\x00"), True))
    signer = ec.generate_private_key(ec.SECP256R1()) if d.ek_signed_by_stranger else issuer_key
    ek_cert = _cert(x509.Name([]), issuer.subject, ek_key.public_key(), signer, ek_exts,
                    issuer_key.public_key(), not_after=d.ek_not_after)
    from cryptography.hazmat.primitives.serialization import Encoding

    ek = TpmPublic(0x0023, ALG_SHA256, 0, b"", (0x0010, 0, 0), (0x0010, 0),
                   ek_key.public_key(), 0, b"")
    trust = EkTrustStore((root,), tuple(intermediates))
    return ek_cert.public_bytes(Encoding.DER), ek, trust


def _reasons(d: Defects) -> list[str]:
    der, ek, trust = _chain(d)
    failures = check_ek_certificate(der, ek, trust, now=NOW)
    assert {f.id for f in failures} <= {"tpm2.ek_cert_untrusted"}
    return [f.message for f in failures]


def test_well_formed_ek_chain_is_accepted() -> None:
    assert _reasons(Defects()) == []


@pytest.mark.parametrize(("defect", "expected"), [
    (Defects(inter_usage=_ca_usage(cert_sign=False)), "keyCertSign"),
    (Defects(root_path_length=0), "path length"),
    (Defects(ek_critical_unknown=True),
     "unknown critical extension 1.3.6.1.4.1.55555.1"),
    (Defects(inter_critical_unknown=True), "unaccounted-for critical extensions"),
    (Defects(ek_not_after=NOW - timedelta(days=1)), "expired on 2026-05-31"),
    (Defects(ek_signed_by_stranger=True), "signature"),
    (Defects(ek_is_ca=True), "is a CA certificate"),
    (Defects(ek_eku=x509.ObjectIdentifier("1.3.6.1.5.5.7.3.2")), "tcg-kp-EKCertificate"),
], ids=["intermediate-key-usage", "path-length", "ek-unknown-critical",
        "intermediate-unknown-critical", "expired", "wrong-issuer-key", "ek-is-ca",
        "ek-wrong-eku"])
def test_each_defect_is_refused_with_a_specific_reason(defect: Defects, expected: str) -> None:
    reasons = _reasons(defect)
    assert len(reasons) == 1 and expected in reasons[0], reasons


def test_ek_from_an_untrusted_manufacturer_is_refused() -> None:
    der, ek, _ = _chain(Defects())
    _, _, other = _chain(Defects())
    (reason,) = [f.message for f in check_ek_certificate(der, ek, other, now=NOW)]
    assert "does not chain to a trusted manufacturer CA" in reason
