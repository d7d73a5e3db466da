"""NVIDIA certificate chains: the device identity chain and the RIM signing chain.

Device chain (ECDSA P-384/SHA-384 throughout), leaf first as the driver returns it:
"GH100 A01 GSP FMC LF" (signs the SPDM response) <- "GH100 A01 GSP BROM" (device-unique)
<- "NVIDIA GH100 Provisioner ICA 1" <- "NVIDIA GH100 Identity" <- "NVIDIA Device Identity CA"
(self-signed, pinned). It is checked by ``cryptography``'s RFC 5280 path validation.

RIM chain (in the RIM's ``ds:KeyInfo``): "HCC RIM L4 Signer" <- "NVIDIA Reference Value L3
GH100 001" <- "NVIDIA Reference Value GH100 CA" <- "NVIDIA CoRIM signing Root CA" (pinned).
``cryptography``'s path validator refuses these certificates (their validity dates before 2050
are GeneralizedTime, which RFC 5280 forbids), so each link is checked here instead: the
issuer's signature over the certificate (``verify_directly_issued_by``), the issuer being a
CA by basicConstraints, and every certificate valid at the validation time.

The leaf's TCG DICE FWID extension (2.23.133.5.4.1, DiceTcbInfo) ends with the 48-byte
SHA-384 FWID, which must equal the FWID in the SPDM opaque data.
"""

from __future__ import annotations

import datetime as dt
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.x509.verification import (
    ExtensionPolicy,
    PolicyBuilder,
    Store,
    VerificationError,
)

__all__ = [
    "NvidiaTrustStore",
    "common_name",
    "leaf_fwid",
    "verify_device_chain",
    "verify_links",
]

OID_DICE_TCB_INFO = "2.23.133.5.4.1"
FWID_SIZE = 48


def common_name(cert: x509.Certificate) -> str:
    attrs = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else cert.subject.rfc4514_string()


@dataclass(frozen=True)
class NvidiaTrustStore:
    """Pinned roots: the device identity CA(s) and the RIM signing root(s)."""

    device_roots: tuple[x509.Certificate, ...]
    rim_roots: tuple[x509.Certificate, ...]

    @classmethod
    def bundled(cls) -> NvidiaTrustStore:
        folder = resources.files("attest.nvidia") / "roots"
        device = (folder / "nvidia_device_identity_ca.pem").read_bytes()
        rim = (folder / "nvidia_corim_signing_root_ca.pem").read_bytes()
        return cls(device_roots=tuple(x509.load_pem_x509_certificates(device)),
                   rim_roots=tuple(x509.load_pem_x509_certificates(rim)))


def verify_device_chain(chain: Sequence[x509.Certificate], roots: Sequence[x509.Certificate],
                        now: dt.datetime) -> str | None:
    """None if ``chain[0]`` validates to a pinned root through ``chain[1:]``, else why not."""
    if len(chain) < 2:
        return ("the certificate chain must have at least the signing certificate and the "
                "root CA")
    verifier = (PolicyBuilder().store(Store(list(roots))).time(now)
                .extension_policies(ca_policy=ExtensionPolicy.webpki_defaults_ca(),
                                    ee_policy=ExtensionPolicy.permit_all())
                .build_client_verifier())
    try:
        verified = verifier.verify(chain[0], list(chain[1:]))
    except VerificationError as exc:
        return f"the report certificate chain failed to verify: {exc}"
    if list(chain) != list(verified.chain)[:len(chain)]:
        return ("the certificates sent are not exactly the path from the signing "
                "certificate to the pinned root")
    return None


def verify_links(chain: Sequence[x509.Certificate], roots: Sequence[x509.Certificate],
                 now: dt.datetime) -> str | None:
    """Check each link of ``chain`` (leaf first) up to a pinned root; see the module doc."""
    if not chain:
        return "no certificates"
    path = list(chain)
    if path[-1] not in roots:
        issuer = next((r for r in roots if r.subject == path[-1].issuer), None)
        if issuer is None:
            return f"{common_name(path[-1])!r} is not issued by a pinned root"
        path.append(issuer)
    for cert, issuer in itertools.pairwise(path):
        try:
            constraints = issuer.extensions.get_extension_for_class(x509.BasicConstraints)
            is_ca = constraints.value.ca
        except x509.ExtensionNotFound:
            is_ca = False
        if not is_ca:
            return f"{common_name(issuer)!r} is not a CA"
        try:
            cert.verify_directly_issued_by(issuer)
        except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
            return f"{common_name(cert)!r} is not signed by {common_name(issuer)!r}"
    for cert in path:
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            return (f"{common_name(cert)!r} is valid {cert.not_valid_before_utc:%Y-%m-%d} to "
                    f"{cert.not_valid_after_utc:%Y-%m-%d}, not at {now:%Y-%m-%d}")
    return None


def leaf_fwid(cert: x509.Certificate) -> bytes | None:
    """The last 48 bytes of the DICE TcbInfo extension (the FWID digest), or None."""
    for ext in cert.extensions:
        if ext.oid.dotted_string == OID_DICE_TCB_INFO:
            value = ext.value
            if isinstance(value, x509.UnrecognizedExtension) and len(value.value) > FWID_SIZE:
                return value.value[-FWID_SIZE:]
            return None
    return None
