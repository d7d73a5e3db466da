"""The Intel SGX extension of a PCK certificate (OID 1.2.840.113741.1.13.1).

Its extnValue is a DER SEQUENCE of ``SEQUENCE { OID, value }`` entries; the ones read here:

===================================  ===============  ======================================
OID (1.2.840.113741.1.13.1.x)        value            meaning
===================================  ===============  ======================================
.1                                   OCTET STRING 16  PPID (encrypted platform id)
.2                                   SEQUENCE         TCB: .2.1 .. .2.16 INTEGER (SGX TCB
                                                      components), .2.17 INTEGER (PCE SVN),
                                                      .2.18 OCTET STRING 16 (CPU SVN)
.3                                   OCTET STRING 2   PCE-ID
.4                                   OCTET STRING 6   FMSPC (family-model-stepping-platform)
.5                                   ENUMERATED       SGX type (0 standard, 1 scalable)
.6                                   OCTET STRING 16  platform instance id (Platform CA only)
===================================  ===============  ======================================

Only definite short and long DER lengths are accepted, every length is checked against the
bytes that remain, and nesting is bounded; anything else is :class:`MalformedEvidence`.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509

from attest.interface import MalformedEvidence

__all__ = ["PckExtensions", "pck_extensions"]

SGX_EXTENSION_OID = "1.2.840.113741.1.13.1"
_ARC = bytes.fromhex("2a864886f84d010d01")  # DER body of 1.2.840.113741.1.13.1
_MAX_DER = 4096


def _tlv(data: bytes, pos: int) -> tuple[int, bytes, int]:
    """(tag, value, next position) of the TLV at ``pos``."""
    if len(data) - pos < 2:
        raise MalformedEvidence("SGX extension: truncated DER")
    tag = data[pos]
    first = data[pos + 1]
    pos += 2
    if first < 0x80:
        length = first
    else:
        n = first & 0x7F
        if not 1 <= n <= 2 or len(data) - pos < n:
            raise MalformedEvidence("SGX extension: unsupported DER length")
        length = int.from_bytes(data[pos:pos + n], "big")
        pos += n
    if length > len(data) - pos:
        raise MalformedEvidence("SGX extension: DER length runs past the data")
    return tag, bytes(data[pos:pos + length]), pos + length


def _sequence_items(data: bytes) -> list[tuple[bytes, int, bytes]]:
    """``SEQUENCE OF SEQUENCE {OID, value}`` -> [(oid body, value tag, value)]."""
    items: list[tuple[bytes, int, bytes]] = []
    pos = 0
    while pos < len(data):
        tag, inner, pos = _tlv(data, pos)
        if tag != 0x30:
            raise MalformedEvidence("SGX extension: entry is not a SEQUENCE")
        otag, oid, ipos = _tlv(inner, 0)
        if otag != 0x06:
            raise MalformedEvidence("SGX extension: entry does not start with an OID")
        vtag, value, ipos = _tlv(inner, ipos)
        if ipos != len(inner):
            raise MalformedEvidence("SGX extension: entry has trailing bytes")
        items.append((oid, vtag, value))
    return items


def _uint(tag: int, value: bytes, what: str) -> int:
    if tag not in (0x02, 0x0A) or not 1 <= len(value) <= 3:
        raise MalformedEvidence(f"SGX extension: {what} is not a small INTEGER")
    number = int.from_bytes(value, "big", signed=True)
    if number < 0:
        raise MalformedEvidence(f"SGX extension: {what} is negative")
    return number


def _octets(tag: int, value: bytes, size: int, what: str) -> bytes:
    if tag != 0x04 or len(value) != size:
        raise MalformedEvidence(f"SGX extension: {what} is not a {size}-byte OCTET STRING")
    return value


@dataclass(frozen=True, slots=True)
class PckExtensions:
    fmspc: bytes
    pce_id: bytes
    sgx_tcb_components: tuple[int, ...]  # 16 SVNs
    pce_svn: int
    cpu_svn: bytes
    sgx_type: int
    platform_instance_id: bytes | None


def pck_extensions(cert: x509.Certificate) -> PckExtensions:
    """Read the SGX extension of a PCK certificate."""
    raw = None
    for ext in cert.extensions:
        if ext.oid.dotted_string == SGX_EXTENSION_OID:
            if isinstance(ext.value, x509.UnrecognizedExtension):
                raw = ext.value.value
            break
    if raw is None:
        raise MalformedEvidence("the PCK certificate has no SGX extension")
    if len(raw) > _MAX_DER:
        raise MalformedEvidence("SGX extension is too large")
    tag, body, end = _tlv(raw, 0)
    if tag != 0x30 or end != len(raw):
        raise MalformedEvidence("SGX extension is not one DER SEQUENCE")
    fields: dict[int, tuple[int, bytes]] = {}
    for oid, vtag, value in _sequence_items(body):
        if len(oid) == len(_ARC) + 1 and oid.startswith(_ARC):
            fields[oid[-1]] = (vtag, value)
    for needed, name in ((2, "TCB"), (3, "PCE-ID"), (4, "FMSPC")):
        if needed not in fields:
            raise MalformedEvidence(f"SGX extension has no {name}")
    tcb_tag, tcb_body = fields[2]
    if tcb_tag != 0x30:
        raise MalformedEvidence("SGX extension: TCB is not a SEQUENCE")
    comps: dict[int, tuple[int, bytes]] = {}
    tcb_arc = _ARC + b"\x02"
    for oid, vtag, value in _sequence_items(tcb_body):
        if len(oid) == len(tcb_arc) + 1 and oid.startswith(tcb_arc):
            comps[oid[-1]] = (vtag, value)
    if any(i not in comps for i in range(1, 19)):
        raise MalformedEvidence("SGX extension: TCB lacks a component, PCESVN or CPUSVN")
    svns = tuple(_uint(*comps[i], f"TCB component {i}") for i in range(1, 17))
    sgx_type = _uint(*fields[5], "SGX type") if 5 in fields else 0
    instance = (_octets(*fields[6], 16, "platform instance id") if 6 in fields else None)
    return PckExtensions(
        fmspc=_octets(*fields[4], 6, "FMSPC"),
        pce_id=_octets(*fields[3], 2, "PCE-ID"),
        sgx_tcb_components=svns,
        pce_svn=_uint(*comps[17], "PCESVN"),
        cpu_svn=_octets(*comps[18], 16, "CPUSVN"),
        sgx_type=sgx_type,
        platform_instance_id=instance,
    )
