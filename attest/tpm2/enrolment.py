"""Verifier-side enrolment: bind an AK to a genuine TPM's EK (pure Python, no TSS).

1. The node sends its EK certificate (DER), EK public (TPMT_PUBLIC) and AK public (TPMT_PUBLIC).
2. :func:`begin_enrolment` checks the EK certificate chains to a manufacturer CA configured for
   the broker (``tpm2.ek_cert_untrusted``), that the certified key is the EK the TPM presented
   (``tpm2.ek_mismatch``) and that the AK is a restricted, fixed-TPM signing key created inside
   the TPM (``tpm2.ak_attributes``). It then makes a credential for the AK's Name, encrypted to
   the certified EK (:func:`attest.tpm2.credential.make_credential`).
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


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _valid_at(cert: x509.Certificate, now: datetime) -> bool:
    return cert.not_valid_before_utc <= now <= cert.not_valid_after_utc


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    if cert.issuer != issuer.subject:
        return False
    try:
        cert.verify_directly_issued_by(issuer)
    except Exception:  # any failure (bad signature, unsupported algorithm) means no
        return False
    return True


def _chains(
    cert: x509.Certificate, trust: EkTrustStore, now: datetime, depth: int = 0
) -> bool:
    if depth > MAX_CHAIN_DEPTH:
        return False
    for root in trust.roots:
        if _is_ca(root) and _valid_at(root, now) and _issued_by(cert, root):
            return True
    for inter in trust.intermediates:
        if (
            inter is not cert
            and _is_ca(inter)
            and _valid_at(inter, now)
            and _issued_by(cert, inter)
            and _chains(inter, trust, now, depth + 1)
        ):
            return True
    return False


def check_ek_certificate(
    cert_der: bytes, ek: TpmPublic, trust: EkTrustStore, *, now: datetime | None = None
) -> list[Failure]:
    """Failures of the EK certificate: untrusted chain, expired, or not certifying ``ek``."""
    now = now or datetime.now(UTC)
    if len(cert_der) > MAX_CERT:
        return [Failure("tpm2.ek_cert_untrusted", f"EK certificate over {MAX_CERT} bytes")]
    try:
        cert = x509.load_der_x509_certificate(cert_der)
    except ValueError:
        return [Failure("tpm2.ek_cert_untrusted", "EK certificate is not valid DER X.509")]
    failures = []
    if not _valid_at(cert, now):
        failures.append(Failure("tpm2.ek_cert_untrusted", "EK certificate is not valid now"))
    if not _chains(cert, trust, now):
        failures.append(
            Failure(
                "tpm2.ek_cert_untrusted",
                f"EK certificate issued by {cert.issuer.rfc4514_string()!r} does not chain to a "
                "trusted manufacturer CA",
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
