"""AMD key certificates: loading, RSA-PSS chain links, and the VCEK/VLEK extensions.

Chain (AMD KDS): ARK (``CN=ARK-<Gen>``, self-signed, pinned) -> ASK (``CN=SEV-<Gen>``) ->
VCEK, or ARK -> ASVK (``CN=SEV-VLEK-<Gen>``) -> VLEK. Every link is RSASSA-PSS with SHA-384,
MGF1-SHA-384 and a 48-byte salt; anything else is refused.

VCEK/VLEK extensions read here (each extnValue holds a DER value):

- 1.3.6.1.4.1.3704.1.3.1 blSPL, .2 teeSPL, .3 snpSPL, .8 ucodeSPL, .9 fmcSPL (Turin):
  DER INTEGER (``02 01 73``; ``02 02 00 d9`` when the high bit would be set).
- 1.3.6.1.4.1.3704.1.4 hwID: the chip id, either the raw bytes (legacy KDS, 64 bytes; Turin 8)
  or a DER OCTET STRING wrapping them (``04 40 ...``). VCEK only.

Real VCEKs have serial number 0, which cryptography warns about; the warning is silenced here
because AMD's KDS issues them that way and the signature chain is what we rely on.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import resources

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID, SignatureAlgorithmOID

from attest.interface import MalformedEvidence

__all__ = [
    "MAX_CERT_SIZE",
    "AmdTrustStore",
    "cert_hwid",
    "cert_product_name",
    "cert_tcb",
    "common_name",
    "load_certificate",
    "load_certificates_pem",
    "pss_signed_by",
]

MAX_CERT_SIZE = 8192
_OID_SPL = {
    "bl": "1.3.6.1.4.1.3704.1.3.1",
    "tee": "1.3.6.1.4.1.3704.1.3.2",
    "snp": "1.3.6.1.4.1.3704.1.3.3",
    "ucode": "1.3.6.1.4.1.3704.1.3.8",
    "fmc": "1.3.6.1.4.1.3704.1.3.9",
}
_OID_HWID = "1.3.6.1.4.1.3704.1.4"
_OID_PRODUCT_NAME = "1.3.6.1.4.1.3704.1.2"
_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)
PRODUCTS = ("Milan", "Genoa", "Turin")
# What cryptography raises for a certificate it cannot decode. Parts decode lazily and raise
# many types (ValueError, TypeError, InvalidVersion, DuplicateExtension,
# UnsupportedGeneralNameType, ...), so every error from decoding untrusted bytes is caught.
_PARSE_ERRORS = (Exception,)


def load_certificate(data: bytes, what: str) -> x509.Certificate:
    """One certificate, DER or PEM; :class:`MalformedEvidence` naming ``what`` otherwise."""
    if len(data) > MAX_CERT_SIZE:
        raise MalformedEvidence(f"{what} is {len(data)} bytes, more than {MAX_CERT_SIZE}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # serial number 0 on every real VCEK
        try:
            if data.lstrip().startswith(b"-----BEGIN"):
                cert = x509.load_pem_x509_certificate(data)
            else:
                cert = x509.load_der_x509_certificate(data)
            # parse lazily-decoded parts now, so a broken one is malformed evidence here
            # rather than an unexpected error in the middle of verification
            _ = (cert.issuer, cert.subject, cert.extensions, cert.public_key(),
                 cert.signature_algorithm_oid, cert.not_valid_before_utc,
                 cert.not_valid_after_utc, cert.tbs_certificate_bytes, cert.signature)
        except _PARSE_ERRORS as exc:
            raise MalformedEvidence(f"{what} is not a valid X.509 certificate") from exc
    return cert


def load_certificates_pem(data: bytes) -> list[x509.Certificate]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return x509.load_pem_x509_certificates(data)
        except _PARSE_ERRORS as exc:
            raise MalformedEvidence("PEM bundle holds no valid certificate") from exc


def common_name(name: x509.Name) -> str:
    attrs = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else ""


def pss_signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> str | None:
    """None if ``issuer`` signed ``cert`` with AMD's RSA-PSS profile, else why not."""
    if cert.issuer != issuer.subject:
        return (f"{common_name(cert.subject)!r} is issued by {common_name(cert.issuer)!r}, "
                f"not {common_name(issuer.subject)!r}")
    if cert.signature_algorithm_oid != SignatureAlgorithmOID.RSASSA_PSS:
        return f"{common_name(cert.subject)!r} is not signed with RSASSA-PSS"
    try:
        params = cert.signature_algorithm_parameters
        digest = cert.signature_hash_algorithm
    except (ValueError, UnsupportedAlgorithm):
        return f"{common_name(cert.subject)!r} has unreadable RSASSA-PSS parameters"
    if not isinstance(params, padding.PSS) or not isinstance(digest, hashes.SHA384):
        return f"{common_name(cert.subject)!r} is not signed with RSASSA-PSS SHA-384"
    key = issuer.public_key()
    if not isinstance(key, rsa.RSAPublicKey):
        return f"{common_name(issuer.subject)!r} does not hold an RSA key"
    try:
        key.verify(cert.signature, cert.tbs_certificate_bytes, _PSS, hashes.SHA384())
    except InvalidSignature:
        return (f"signature of {common_name(cert.subject)!r} does not verify under "
                f"{common_name(issuer.subject)!r}")
    return None


def _ext_raw(cert: x509.Certificate, oid: str) -> bytes | None:
    for ext in cert.extensions:
        if ext.oid.dotted_string == oid:
            value = ext.value
            if isinstance(value, x509.UnrecognizedExtension):
                return value.value
            return None
    return None


def _der_small_uint(raw: bytes, what: str) -> int:
    # INTEGER, short length form, 1..2 content bytes (an SPL is 0..255; a leading 00 keeps
    # values >= 0x80 positive).
    if len(raw) < 3 or raw[0] != 0x02 or raw[1] != len(raw) - 2 or raw[1] > 2:
        raise MalformedEvidence(f"certificate extension {what} is not a small DER INTEGER")
    value = int.from_bytes(raw[2:], "big", signed=True)
    if not 0 <= value <= 255:
        raise MalformedEvidence(f"certificate extension {what} = {value} is out of range")
    return value


def cert_tcb(cert: x509.Certificate) -> dict[str, int]:
    """The SPL extensions present in a VCEK/VLEK, keyed bl/tee/snp/ucode/fmc."""
    out: dict[str, int] = {}
    for name, oid in _OID_SPL.items():
        raw = _ext_raw(cert, oid)
        if raw is not None:
            out[name] = _der_small_uint(raw, f"{name}SPL ({oid})")
    return out


def cert_hwid(cert: x509.Certificate) -> bytes | None:
    """The hwID extension's chip id, raw or unwrapped from a DER OCTET STRING."""
    raw = _ext_raw(cert, _OID_HWID)
    if raw is None:
        return None
    if len(raw) in (8, 64):
        return raw
    if len(raw) >= 2 and raw[0] == 0x04 and raw[1] == len(raw) - 2 and raw[1] in (8, 64):
        return raw[2:]
    raise MalformedEvidence(f"hwID extension has an unexpected length ({len(raw)} bytes)")


def cert_product_name(cert: x509.Certificate) -> tuple[str, int | None]:
    """productName (1.3.6.1.4.1.3704.1.2, DER IA5String) as (name, stepping).

    ``"Milan-B0"`` gives ``("Milan-B0", 0)``: the stepping is the hex digit(s) after the model
    letter, as go-sev-guest reads it. A VLEK names only the product (``"Milan"``): stepping None.
    """
    raw = _ext_raw(cert, _OID_PRODUCT_NAME)
    if raw is None:
        return "", None
    if len(raw) < 2 or raw[0] != 0x16 or raw[1] != len(raw) - 2 or not raw[2:].isascii():
        raise MalformedEvidence("productName extension is not a short DER IA5String")
    name = raw[2:].decode("ascii")
    _, _, variant = name.partition("-")
    stepping = None
    if len(variant) >= 2 and variant[0].isalpha():
        try:
            stepping = int(variant[1:], 16)
        except ValueError:
            stepping = None
    return name, stepping


def _bundled(name: str) -> bytes:
    return (resources.files("attest.snp") / "roots" / name).read_bytes()


@dataclass(frozen=True)
class AmdTrustStore:
    """Pinned ARKs (the only trust anchors) and known ASK/ASVK intermediates, by subject CN.

    Intermediates are a convenience: they are accepted only if they chain to a pinned ARK,
    so shipping or receiving them adds no trust.
    """

    arks: dict[str, x509.Certificate] = field(default_factory=dict)
    intermediates: dict[str, x509.Certificate] = field(default_factory=dict)

    @classmethod
    def from_certificates(cls, arks: Iterable[x509.Certificate],
                          intermediates: Iterable[x509.Certificate] = ()) -> AmdTrustStore:
        ark_map: dict[str, x509.Certificate] = {}
        for ark in arks:
            cn = common_name(ark.subject)
            if not cn.startswith("ARK-") or ark.issuer != ark.subject:
                raise ValueError(f"{cn!r} is not a self-issued AMD root key certificate")
            problem = pss_signed_by(ark, ark)
            if problem is not None:
                raise ValueError(f"pinned ARK {cn!r} is not validly self-signed: {problem}")
            ark_map[cn] = ark
        return cls(arks=ark_map,
                   intermediates={common_name(c.subject): c for c in intermediates})

    @classmethod
    def bundled(cls) -> AmdTrustStore:
        """The AMD ARKs and ASK/ASVKs for Milan, Genoa and Turin shipped with this package."""
        arks: list[x509.Certificate] = []
        inter: list[x509.Certificate] = []
        for product in PRODUCTS:
            arks += load_certificates_pem(_bundled(f"ark_{product.lower()}.pem"))
            inter += load_certificates_pem(_bundled(f"intermediates_{product.lower()}.pem"))
        return cls.from_certificates(arks, inter)
