"""The ``sev-snp`` evidence container: one report plus the certificates that sign it.

Byte layout (integers big-endian):

======  ======  ==============================================================
offset  size    field
======  ======  ==============================================================
0       4       magic ``b"SNPE"``
4       1       container version, 1
5       1       report format: 1 = raw SEV-SNP report (exactly 1184 bytes),
                2 = Azure HCL report (:mod:`attest.snp.hcl`, at most 16384 bytes)
6       2       certificate count n, 1..4
8       4       report length L
12      L       report bytes
...     n x     u32 length (1..8192) then that many bytes of DER certificate
======  ======  ==============================================================

The first certificate is the VCEK or VLEK that signed the report. Any further ones are
offered intermediates (ASK/ASVK); they add no trust, since the chain must end at an ARK
pinned by the verifier, and an ARK sent in the evidence is never used as an anchor.
Nothing may follow the last certificate. Total size is capped at :data:`MAX_EVIDENCE_SIZE`
before anything is parsed.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from attest.interface import MalformedEvidence

from .certs import MAX_CERT_SIZE
from .hcl import MAX_HCL_SIZE
from .report import REPORT_SIZE

__all__ = ["MAX_EVIDENCE_SIZE", "SnpEvidence", "decode_evidence", "encode_evidence"]

MAGIC = b"SNPE"
CONTAINER_VERSION = 1
MAX_CERTS = 4
MAX_EVIDENCE_SIZE = 12 + MAX_HCL_SIZE + MAX_CERTS * (4 + MAX_CERT_SIZE)
ReportFormat = Literal["raw", "azure-hcl"]
_FORMAT_CODES: dict[ReportFormat, int] = {"raw": 1, "azure-hcl": 2}
_FORMAT_NAMES = {v: k for k, v in _FORMAT_CODES.items()}


@dataclass(frozen=True, slots=True)
class SnpEvidence:
    report_format: ReportFormat
    report: bytes
    certificates: tuple[bytes, ...]  # DER; [0] is the VCEK/VLEK


def _check_report_length(fmt: ReportFormat, length: int) -> None:
    if fmt == "raw" and length != REPORT_SIZE:
        raise MalformedEvidence(f"raw SEV-SNP report must be {REPORT_SIZE} bytes, got {length}")
    if fmt == "azure-hcl" and not 0 < length <= MAX_HCL_SIZE:
        raise MalformedEvidence(f"HCL report length {length} is outside 1..{MAX_HCL_SIZE}")


def encode_evidence(report: bytes, certificates: Sequence[bytes], *,
                    report_format: ReportFormat = "raw") -> bytes:
    """Build the container; ``certificates[0]`` is the signing VCEK/VLEK in DER."""
    if report_format not in _FORMAT_CODES:
        raise ValueError(f"unknown report format {report_format!r}")
    _check_report_length(report_format, len(report))
    if not 1 <= len(certificates) <= MAX_CERTS:
        raise ValueError(f"need 1..{MAX_CERTS} certificates, got {len(certificates)}")
    out = bytearray(MAGIC)
    out += struct.pack(">BBHI", CONTAINER_VERSION, _FORMAT_CODES[report_format],
                       len(certificates), len(report))
    out += report
    for cert in certificates:
        if not 0 < len(cert) <= MAX_CERT_SIZE:
            raise ValueError(f"certificate length {len(cert)} is outside 1..{MAX_CERT_SIZE}")
        out += struct.pack(">I", len(cert)) + cert
    return bytes(out)


def decode_evidence(data: bytes) -> SnpEvidence:
    if len(data) > MAX_EVIDENCE_SIZE:
        raise MalformedEvidence(
            f"sev-snp evidence is {len(data)} bytes, more than {MAX_EVIDENCE_SIZE}")
    if len(data) < 12 or data[:4] != MAGIC:
        raise MalformedEvidence("sev-snp evidence does not start with the 'SNPE' header")
    version, fmt_code, count, report_len = struct.unpack_from(">BBHI", data, 4)
    if version != CONTAINER_VERSION:
        raise MalformedEvidence(f"sev-snp evidence container version {version} is unknown")
    fmt = _FORMAT_NAMES.get(fmt_code)
    if fmt is None:
        raise MalformedEvidence(f"sev-snp report format {fmt_code} is unknown")
    if not 1 <= count <= MAX_CERTS:
        raise MalformedEvidence(f"sev-snp evidence has {count} certificates, expected 1..4")
    _check_report_length(fmt, report_len)
    pos = 12
    if report_len > len(data) - pos:
        raise MalformedEvidence("sev-snp evidence is truncated inside the report")
    report = bytes(data[pos:pos + report_len])
    pos += report_len
    certs: list[bytes] = []
    for i in range(count):
        if len(data) - pos < 4:
            raise MalformedEvidence(f"sev-snp evidence is truncated before certificate {i}")
        (clen,) = struct.unpack_from(">I", data, pos)
        pos += 4
        if not 0 < clen <= MAX_CERT_SIZE:
            raise MalformedEvidence(
                f"certificate {i} length {clen} is outside 1..{MAX_CERT_SIZE}")
        if clen > len(data) - pos:
            raise MalformedEvidence(f"sev-snp evidence is truncated inside certificate {i}")
        certs.append(bytes(data[pos:pos + clen]))
        pos += clen
    if pos != len(data):
        raise MalformedEvidence(f"sev-snp evidence has {len(data) - pos} trailing bytes")
    return SnpEvidence(report_format=fmt, report=report, certificates=tuple(certs))
