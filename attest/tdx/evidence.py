"""The ``tdx`` evidence: a raw DCAP quote, or a container that adds an Azure HCL report.

A raw quote (what configfs-tsm's ``outblob`` or ``/dev/tdx_guest`` returns) is the evidence
as is; it starts with the quote version (``04 00`` / ``05 00``). Azure TDX confidential VMs
(paravisor, vTPM) bind the session through the HCL report instead, so their evidence is the
container (integers big-endian):

======  ======  ================================================================
offset  size    field
======  ======  ================================================================
0       4       magic ``b"TDXE"``
4       1       container version, 1
5       1       format: 2 = Azure HCL (the only container format)
6       2       reserved, zero
8       4       quote length Q (1..:data:`~attest.tdx.quote.MAX_QUOTE_SIZE`)
12      Q       DCAP quote
12+Q    4       HCL report length H (1..:data:`~attest.snp.hcl.MAX_HCL_SIZE`)
16+Q    H       HCL report (``HCLA`` header, 1024-byte TDREPORT, runtime data; see
                :mod:`attest.snp.hcl`); nothing may follow
======  ======  ================================================================

The HCL report binds its variable data (vTPM AK, VM configuration, ``user-data``) to the
quote: SHA-256(variable data) = quote report_data[0:32], and its TDREPORT must carry the
quote's report data, MRTD and RTMRs. TDREPORT offsets used: report_data 64 @ 128, TDINFO
@ 512: attributes 8 @ 512, xfam 8 @ 520, mr_td 48 @ 528, rtmr0..3 4 x 48 @ 720.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from attest.interface import MalformedEvidence
from attest.snp.hcl import MAX_HCL_SIZE

from .quote import MAX_QUOTE_SIZE

__all__ = ["TdxEvidence", "decode_evidence", "encode_azure_evidence"]

MAGIC = b"TDXE"
FORMAT_AZURE_HCL = 2
TDREPORT_SIZE = 1024


@dataclass(frozen=True, slots=True)
class TdxEvidence:
    quote: bytes
    hcl_report: bytes | None = None


def encode_azure_evidence(quote: bytes, hcl_report: bytes) -> bytes:
    if not 0 < len(quote) <= MAX_QUOTE_SIZE or not 0 < len(hcl_report) <= MAX_HCL_SIZE:
        raise ValueError("quote or HCL report length out of range")
    return (MAGIC + struct.pack(">BBHI", 1, FORMAT_AZURE_HCL, 0, len(quote)) + quote
            + struct.pack(">I", len(hcl_report)) + hcl_report)


def decode_evidence(data: bytes) -> TdxEvidence:
    if data[:4] != MAGIC:
        return TdxEvidence(quote=bytes(data))
    if len(data) > 16 + MAX_QUOTE_SIZE + MAX_HCL_SIZE or len(data) < 12:
        raise MalformedEvidence("tdx evidence container length is out of range")
    version, fmt, reserved, quote_len = struct.unpack_from(">BBHI", data, 4)
    if version != 1 or fmt != FORMAT_AZURE_HCL or reserved:
        raise MalformedEvidence(f"tdx evidence container version {version} / format {fmt} "
                                "is unknown")
    if not 0 < quote_len <= MAX_QUOTE_SIZE or quote_len > len(data) - 16:
        raise MalformedEvidence(f"quote length {quote_len} is out of range or truncated")
    quote = bytes(data[12:12 + quote_len])
    (hcl_len,) = struct.unpack_from(">I", data, 12 + quote_len)
    if not 0 < hcl_len <= MAX_HCL_SIZE or hcl_len != len(data) - 16 - quote_len:
        raise MalformedEvidence(f"HCL report length {hcl_len} does not end the evidence")
    return TdxEvidence(quote=quote, hcl_report=bytes(data[16 + quote_len:]))
