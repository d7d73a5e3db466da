"""Verifier-side enrolment: bind an AK to a genuine TPM's EK (pure Python, no TSS).

1. The node sends its EK certificate (DER), EK public (TPMT_PUBLIC) and AK public (TPMT_PUBLIC).
2. :func:`begin_enrolment` checks the EK certificate chains to a manufacturer CA configured for
   the broker (``tpm2.ek_cert_untrusted``; ``cryptography``'s X.509 path validation with
   the TCG EK profile as its leaf policy: signatures, issuer names, validity, basic
   constraints and path lengths, key usages, no unknown critical extension), that the
   certified key is the EK the TPM presented (``tpm2.ek_mismatch``) and that the AK is a
   restricted, fixed-TPM signing key created inside the TPM (``tpm2.ak_attributes``). It
   then makes a credential for the AK's Name, encrypted to the certified EK
   (:func:`attest.tpm2.credential.make_credential`).
3. The node answers with ActivateCredential; :func:`complete_enrolment` compares the answer in
   constant time (``tpm2.credential_activation``). Only a TPM that holds that EK and has that
   AK loaded can answer, so the AK is bound to the EK.

Refusals raise :class:`EnrolmentRefused` carrying every :class:`~attest.interface.Failure`.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509 import verification

from attest.interface import Failure, MalformedEvidence
from attest.tpm2.credential import make_credential
from attest.tpm2.marshal import (
    ATTR_DECRYPT,
    ATTR_FIXED_PARENT,
    ATTR_FIXED_TPM,
    ATTR_RESTRICTED,
    ATTR_SENSITIVE_DATA_ORIGIN,
    ATTR_SIGN,
    TpmPublic,
    parse_public,
)

__all__ = [
    "EkTrustStore",
    "EnrolledAk",
    "EnrolmentChallenge",
    "EnrolmentRefused",
    "PendingEnrolment",
    "begin_enrolment",
    "check_ek_certificate",
    "complete_enrolment",
]

MAX_CERT = 4096
MAX_CHAIN_DEPTH = 4


class EnrolmentRefused(Exception):
    """Enrolment refused; ``failures`` lists every reason (ids ``tpm2.*``)."""

    def __init__(self, failures: Sequence[Failure]) -> None:
        self.failures = tuple(failures)
        super().__init__("; ".join(f"{f.id}: {f.message}" for f in self.failures))


@dataclass(frozen=True, slots=True)
class EkTrustStore:
    """Manufacturer CAs the broker trusts for EK certificates, plus their intermediates."""

    roots: tuple[x509.Certificate, ...]
    intermediates: tuple[x509.Certificate, ...] = ()

    @classmethod
    def from_pem(cls, roots: Iterable[bytes], intermediates: Iterable[bytes] = ()) -> EkTrustStore:
        r = tuple(c for pem in roots for c in x509.load_pem_x509_certificates(pem))
        i = tuple(c for pem in intermediates for c in x509.load_pem_x509_certificates(pem))
        if not r:
            raise ValueError("an EK trust store needs at least one root CA")
        return cls(r, i)


# TCG EK Credential Profile: the EK certificate's EKU, when present, names tcg-kp-EKCertificate
TCG_KP_EK_CERTIFICATE = x509.ObjectIdentifier("2.23.133.8.1")


class _Refused(Exception):
    """A hand check inside the verifier's extension policy failed (message is specific)."""


def _ek_key_usage(_policy: object, _cert: x509.Certificate, ku: x509.KeyUsage) -> None:
    # an EK decrypts credentials (RSA: keyEncipherment) or agrees keys (ECC: keyAgreement);
    # it never signs certificates
    if not (ku.key_encipherment or ku.key_agreement):
        raise _Refused("EK certificate key usage allows neither keyEncipherment nor "
                       "keyAgreement")
    if ku.key_cert_sign or ku.crl_sign:
        raise _Refused("EK certificate key usage allows signing certificates")


def _ek_not_a_ca(_policy: object, _cert: x509.Certificate,
                 bc: x509.BasicConstraints | None) -> None:
    if bc is not None and bc.ca:
        raise _Refused("EK certificate is a CA certificate (basicConstraints cA=true)")


def _ek_usage(_policy: object, _cert: x509.Certificate,
              eku: x509.ExtendedKeyUsage | None) -> None:
    if eku is not None and TCG_KP_EK_CERTIFICATE not in eku:
        raise _Refused("EK certificate extended key usage does not name tcg-kp-EKCertificate")


def _policies() -> tuple[verification.ExtensionPolicy, verification.ExtensionPolicy]:
    """(CA policy, EK policy) for ``cryptography``'s path validation.

    CAs: the Web PKI CA profile (basicConstraints cA with path length enforced, keyUsage
    keyCertSign when present, ...) that also accepts certificatePolicies, which TPM vendors
    mark critical. EK (leaf): the TCG EK profile, which the Web PKI leaf profile does not fit
    (empty subject, a critical subjectAltName with the TPM's manufacturer, model and version as
    a directoryName, no serverAuth/clientAuth EKU): keyUsage required as above, not a CA,
    EKU (if any) tcg-kp-EKCertificate, subjectAltName and certificatePolicies accepted. Every
    other critical extension, on any certificate, fails the path ("unaccounted-for critical
    extensions"); validity, signatures, issuer names and path lengths are the verifier's.
    """
    agnostic = verification.Criticality.AGNOSTIC
    ca = verification.ExtensionPolicy.webpki_defaults_ca().may_be_present(
        x509.CertificatePolicies, agnostic, None)
    ek = (
        verification.ExtensionPolicy.permit_all()
        .require_present(x509.KeyUsage, agnostic, _ek_key_usage)
        .may_be_present(x509.BasicConstraints, agnostic, _ek_not_a_ca)
        .may_be_present(x509.ExtendedKeyUsage, agnostic, _ek_usage)
        .may_be_present(x509.SubjectAlternativeName, agnostic, None)
        .may_be_present(x509.CertificatePolicies, agnostic, None)
    )
    return ca, ek


def _chain_failure(
    cert: x509.Certificate, trust: EkTrustStore, now: datetime
) -> str | None:
    """Why ``cert`` does not chain to a trusted root under the EK profile, or None."""
    ca_policy, ek_policy = _policies()
    verifier = (
        verification.PolicyBuilder()
        .store(verification.Store(list(trust.roots)))
        .time(now)
        .max_chain_depth(MAX_CHAIN_DEPTH)
        .extension_policies(ca_policy=ca_policy, ee_policy=ek_policy)
        .build_client_verifier()
    )
    try:
        verifier.verify(cert, list(trust.intermediates))
    except verification.VerificationError as exc:
        return str(exc)
    return None


def _leaf_failures(cert: x509.Certificate, now: datetime) -> list[str]:
    """Specific reasons for the leaf itself, checked by hand before path validation (whose
    error names only the first problem it met)."""
    out = []
    if now < cert.not_valid_before_utc:
        out.append(f"EK certificate is not valid before {cert.not_valid_before_utc:%Y-%m-%d}")
    if now > cert.not_valid_after_utc:
        out.append(f"EK certificate expired on {cert.not_valid_after_utc:%Y-%m-%d}")
    known = {x509.KeyUsage.oid, x509.BasicConstraints.oid, x509.ExtendedKeyUsage.oid,
             x509.SubjectAlternativeName.oid, x509.CertificatePolicies.oid}
    for ext in cert.extensions:
        if ext.critical and ext.oid not in known:
            out.append(f"EK certificate has an unknown critical extension {ext.oid.dotted_string}")
    return out


def check_ek_certificate(
    cert_der: bytes, ek: TpmPublic, trust: EkTrustStore, *, now: datetime | None = None
) -> list[Failure]:
    """Failures of the EK certificate: untrusted chain (validated by ``cryptography``'s X.509
    path validation under the EK profile, :func:`_policies`), expired, unknown critical
    extensions, wrong key usage, or not certifying ``ek``."""
    now = now or datetime.now(UTC)
    if len(cert_der) > MAX_CERT:
        return [Failure("tpm2.ek_cert_untrusted", f"EK certificate over {MAX_CERT} bytes")]
    try:
        cert = x509.load_der_x509_certificate(cert_der)
    except ValueError:
        return [Failure("tpm2.ek_cert_untrusted", "EK certificate is not valid DER X.509")]
    failures = [Failure("tpm2.ek_cert_untrusted", why) for why in _leaf_failures(cert, now)]
    if not failures and (why := _chain_failure(cert, trust, now)) is not None:
        failures.append(
            Failure(
                "tpm2.ek_cert_untrusted",
                f"EK certificate issued by {cert.issuer.rfc4514_string()!r} does not chain to a "
                f"trusted manufacturer CA: {why}",
            )
        )
    if _spki(cert.public_key()) != _spki(ek.key):
        failures.append(
            Failure("tpm2.ek_mismatch", "the EK certificate certifies another key than the EK")
        )
    return failures


def _spki(key: object) -> bytes:
    if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        return b""
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def check_ak_attributes(ak: TpmPublic) -> list[Failure]:
    required = ATTR_FIXED_TPM | ATTR_FIXED_PARENT | ATTR_SENSITIVE_DATA_ORIGIN
    required |= ATTR_RESTRICTED | ATTR_SIGN
    if ak.attributes & required != required or ak.has(ATTR_DECRYPT):
        return [
            Failure(
                "tpm2.ak_attributes",
                "AK must be a restricted, fixedTPM, fixedParent, TPM-generated signing-only key",
            )
        ]
    return []


@dataclass(frozen=True, slots=True)
class EnrolmentChallenge:
    """What the node passes to ActivateCredential (TPM2B contents, without size prefixes)."""

    credential_blob: bytes
    encrypted_secret: bytes


@dataclass(frozen=True, slots=True, repr=False)
class PendingEnrolment:
    """Verifier state between challenge and answer; never sent to the node."""

    ak_public: bytes
    ek_certificate: bytes
    _expected: bytes

    def __repr__(self) -> str:
        return "PendingEnrolment(<challenge hidden>)"


@dataclass(frozen=True, slots=True)
class EnrolledAk:
    """An AK bound to a certified EK; what the broker stores for the node."""

    ak_public: bytes  # TPMT_PUBLIC
    ak_public_pem: str
    ak_name: bytes
    ek_certificate_sha256: str

    def node_context(self) -> dict[str, object]:
        """The ``VerificationContext.node`` mapping the tpm2 verifier expects."""
        return {"ak_public": self.ak_public_pem, "ak_name": self.ak_name.hex()}


def begin_enrolment(
    ek_certificate: bytes,
    ek_public: bytes,
    ak_public: bytes,
    trust: EkTrustStore,
    *,
    now: datetime | None = None,
) -> tuple[EnrolmentChallenge, PendingEnrolment]:
    """Check EK certificate and AK, then challenge the node; EnrolmentRefused on failure."""
    try:
        ek = parse_public(ek_public)
        ak = parse_public(ak_public)
    except MalformedEvidence as exc:
        raise EnrolmentRefused([Failure("tpm2.enrolment_malformed", str(exc))]) from None
    failures = check_ek_certificate(ek_certificate, ek, trust, now=now)
    failures += check_ak_attributes(ak)
    if failures:
        raise EnrolmentRefused(failures)
    secret = os.urandom(32)
    try:
        made = make_credential(ek, ak.name, secret)
    except ValueError as exc:
        raise EnrolmentRefused([Failure("tpm2.ek_unsupported", str(exc))]) from None
    pending = PendingEnrolment(bytes(ak_public), bytes(ek_certificate), secret)
    return EnrolmentChallenge(made.credential_blob, made.encrypted_secret), pending


def complete_enrolment(pending: PendingEnrolment, answer: bytes) -> EnrolledAk:
    """Accept the node's ActivateCredential answer; EnrolmentRefused when it is wrong."""
    if not hmac.compare_digest(bytes(answer), pending._expected):
        raise EnrolmentRefused(
            [
                Failure(
                    "tpm2.credential_activation",
                    "the TPM could not activate the credential: the AK is not on the TPM "
                    "that owns this EK",
                )
            ]
        )
    ak = parse_public(pending.ak_public)
    pem = ak.key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    return EnrolledAk(
        pending.ak_public, pem, ak.name, hashlib.sha256(pending.ek_certificate).hexdigest()
    )
