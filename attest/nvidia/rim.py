"""NVIDIA Reference Integrity Manifests (RIMs): signed golden measurements for a GPU's
driver and VBIOS, as ISO/IEC 19770-2 SWID tags (``.swidtag``) signed with XMLDSig.

A RIM is an enveloped XML signature (``ds:Signature`` inside ``SoftwareIdentity``),
canonicalised with C14N 1.1, ECDSA P-384 over SHA-384 digests; ``ds:KeyInfo`` carries the
signing chain (see :mod:`attest.nvidia.certs`). The golden values are the
``Payload/Resource`` elements: ``index`` (0-based; SPDM block index = RIM index + 1),
``active`` ("True"/"False"), ``alternatives`` (n) and ``Hash0`` .. ``Hash<n-1>`` (hex SHA-384),
plus ``Meta/@colloquialVersion`` (the driver or VBIOS version).

Only what the signature covers is read: the golden values are taken from the element that
``signxml`` returns as verified, never from a second parse, so a wrapped or unsigned copy of
the manifest cannot supply them. A RIM is verified once, when the broker loads it, at a
validation time the broker chooses (the published RIMs' signer certificates expired in 2025).
Size is capped at :data:`MAX_RIM_SIZE` before parsing; DTDs, entities and network access
are refused by the parser.
"""

from __future__ import annotations

import base64
import datetime as dt
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from cryptography import x509
from lxml import etree
from signxml import DigestAlgorithm, SignatureConfiguration, SignatureMethod, XMLVerifier
from signxml.exceptions import InvalidInput, SignXMLException

from .certs import verify_links

__all__ = ["MAX_RIM_SIZE", "GoldenMeasurement", "Rim", "RimError", "RimStore", "load_rim"]

MAX_RIM_SIZE = 512 * 1024
MAX_ALTERNATIVES = 16
_DS = "http://www.w3.org/2000/09/xmldsig#"
_SWID = "http://standards.iso.org/iso/19770/-2/2015/schema.xsd"
_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False,
                          huge_tree=False, remove_comments=False)
_CONFIG_BASE = {
    "signature_methods": frozenset({SignatureMethod.ECDSA_SHA384}),
    "digest_algorithms": frozenset({DigestAlgorithm.SHA384}),
    "expect_references": 1,
}


class RimError(ValueError):
    """A RIM that cannot be parsed at all (a configuration problem, raised at load)."""


@dataclass(frozen=True, slots=True)
class GoldenMeasurement:
    index: int  # RIM index, 0-based
    name: str
    alternatives: tuple[bytes, ...]


@dataclass(frozen=True)
class Rim:
    """One RIM: its identity, its signed golden values, and why it is not trusted (if so)."""

    tag_id: str
    version: str  # colloquialVersion, e.g. "545.00" or "96.00.5E.00.01"
    signer: str
    golden: Mapping[int, GoldenMeasurement] = field(default_factory=dict)
    problems: tuple[tuple[str, str], ...] = ()  # (failure id suffix, message)

    @property
    def trusted(self) -> bool:
        return not self.problems


def _key_info_chain(root: etree._Element) -> list[x509.Certificate]:
    out = []
    for element in root.iter(f"{{{_DS}}}X509Certificate"):
        try:
            cert = x509.load_der_x509_certificate(base64.b64decode(element.text or ""))
            # decode the lazily parsed parts now: the chain check and signxml read them and
            # would raise from the middle of verification
            _ = (cert.subject, cert.issuer, cert.extensions, cert.public_key(),
                 cert.not_valid_before_utc, cert.not_valid_after_utc)
        except Exception as exc:  # cryptography raises many types for bad DER (ValueError,
            # UnsupportedAlgorithm, DuplicateExtension, ...), as in attest.nvidia.verifier
            raise RimError("a RIM KeyInfo certificate is not valid DER") from exc
        out.append(cert)
    return out


def _golden(signed: etree._Element) -> dict[int, GoldenMeasurement]:
    out: dict[int, GoldenMeasurement] = {}
    for res in signed.iter(f"{{{_SWID}}}Resource"):
        if res.get("type") != "Measurement" or res.get("active") != "True":
            continue
        try:
            index = int(res.get("index", ""))
            count = int(res.get("alternatives", "1"))
        except ValueError as exc:
            raise RimError("a RIM measurement has a non-numeric index") from exc
        if not 0 <= index < 256 or not 1 <= count <= MAX_ALTERNATIVES or index in out:
            raise RimError(f"RIM measurement index {index} is out of range or repeated")
        values = []
        for i in range(count):
            value = next((v for k, v in res.attrib.items()
                          if k.endswith(f"}}Hash{i}") or k == f"Hash{i}"), None)
            if value is None:
                raise RimError(f"RIM measurement {index} lacks Hash{i}")
            try:
                values.append(bytes.fromhex(value))
            except ValueError as exc:
                raise RimError(f"RIM measurement {index} Hash{i} is not hex") from exc
        out[index] = GoldenMeasurement(index=index, name=res.get("name", ""),
                                       alternatives=tuple(values))
    return out


def load_rim(data: bytes, roots: Sequence[x509.Certificate], at: dt.datetime) -> Rim:
    """Verify a RIM's XMLDSig and chain at ``at`` and read its golden values.

    A signature or chain problem does not raise: the RIM comes back untrusted, with the
    problem, and no golden values (the verifier reports it as a failure).
    """
    if len(data) > MAX_RIM_SIZE:
        raise RimError(f"RIM is more than {MAX_RIM_SIZE} bytes")
    try:
        root = etree.fromstring(data, parser=_PARSER)
    except etree.XMLSyntaxError as exc:
        raise RimError(f"RIM is not well-formed XML: {exc}") from exc
    meta = root.find(f"{{{_SWID}}}Meta")
    version = meta.get("colloquialVersion", "") if meta is not None else ""
    tag_id = root.get("tagId", "")
    chain = _key_info_chain(root)
    if not chain:
        return Rim(tag_id, version, "", problems=(("chain", "RIM carries no certificates"),))
    signer = chain[0].subject.rfc4514_string()
    problems: list[tuple[str, str]] = []
    chain_problem = verify_links(chain, roots, at)
    if chain_problem:
        problems.append(("chain", f"RIM {tag_id[:16]}...: {chain_problem}"))
    config = SignatureConfiguration(verification_time=at, **_CONFIG_BASE)
    try:
        verified = XMLVerifier().verify(data, x509_cert=chain[0], expect_config=config)
    except (InvalidInput, etree.LxmlError, ValueError) as exc:  # signxml lets lxml's errors
        # through (the XMLDSig schema check's DocumentInvalid, canonicalisation's C14NError),
        # and base64's ValueError on a SignatureValue that is not ASCII
        raise RimError(f"RIM signature structure is invalid: {exc}") from exc
    except SignXMLException as exc:
        problems.append(("signature", f"RIM {tag_id[:16]}... signature does not verify: "
                                      f"{type(exc).__name__}"))
        return Rim(tag_id, version, signer, problems=tuple(problems))
    signed = verified.signed_xml
    if signed is None or etree.QName(signed).localname != "SoftwareIdentity":
        problems.append(("signature", "the RIM signature does not cover the SoftwareIdentity"))
        return Rim(tag_id, version, signer, problems=tuple(problems))
    golden = _golden(signed)
    return Rim(tag_id, version, signer, golden=golden if not problems else {},
               problems=tuple(problems))


@dataclass(frozen=True)
class RimStore:
    """The broker's RIMs, by version, each verified once at load.

    ``select`` returns the driver RIM whose version equals the report's driver version and
    the VBIOS RIM whose version equals its VBIOS version (case-insensitive). ``pinned``
    always returns the one driver and one VBIOS RIM given (the verifier still reports a
    version mismatch): for checking a recorded report against recorded RIMs.
    """

    driver: Mapping[str, Rim]
    vbios: Mapping[str, Rim]
    pinned: bool = False

    @classmethod
    def load(cls, *, driver: Iterable[bytes], vbios: Iterable[bytes],
             roots: Sequence[x509.Certificate], at: dt.datetime,
             pinned: bool = False) -> RimStore:
        drivers = [load_rim(d, roots, at) for d in driver]
        vbioses = [load_rim(v, roots, at) for v in vbios]
        if pinned and (len(drivers) != 1 or len(vbioses) != 1):
            raise ValueError("a pinned RIM store holds exactly one driver and one VBIOS RIM")
        return cls(driver={r.version.lower(): r for r in drivers},
                   vbios={r.version.lower(): r for r in vbioses}, pinned=pinned)

    def select(self, driver_version: str, vbios_version: str) -> tuple[Rim | None, Rim | None]:
        if self.pinned:
            return next(iter(self.driver.values())), next(iter(self.vbios.values()))
        return (self.driver.get(driver_version.lower()),
                self.vbios.get(vbios_version.lower()))
