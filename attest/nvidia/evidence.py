"""The ``nvidia-gpu`` evidence container: one GPU's SPDM report, its certificate chain, and
the GPU facts the node read through NVML.

Byte layout (integers big-endian):

======  ======  ================================================================
offset  size    field
======  ======  ================================================================
0       4       magic ``b"NVGE"``
4       1       container version, 1
5       1       certificate count n, 1..6
6       2       reserved, zero
8       4       report length R (1..:data:`~attest.nvidia.spdm.MAX_REPORT_SIZE`)
12      R       SPDM GET_MEASUREMENTS request || MEASUREMENTS response
...     n x     u32 length (1..8192) then that many bytes of DER certificate,
                leaf ("GSP FMC LF") first, the device identity root last
...     4       facts length F (0..4096)
...     F       UTF-8 JSON object of NVML facts (see below); nothing may follow
======  ======  ================================================================

NVML facts (all optional): ``cc_mode`` ("on" | "off" | "devtools"), ``cc_ready`` (bool),
``architecture`` ("Hopper", "Blackwell"), ``driver_version``, ``compute_mode``
("exclusive_process", "default", "prohibited"), ``mig_mode`` (bool), ``other_processes``
(int), ``ecc`` (bool), ``uuid``. The GPU does not sign them: they are what the measured node
code read from the driver, trusted as far as the CPU TEE report that covers this evidence's
digest (composite evidence) is trusted. The signed SPDM report is the only source of the
measurements, versions and FWID.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from attest.interface import MalformedEvidence

from .spdm import MAX_REPORT_SIZE

__all__ = ["MAX_EVIDENCE_SIZE", "GpuEvidence", "decode_evidence", "encode_evidence"]

MAGIC = b"NVGE"
VERSION = 1
MIN_CERTS, MAX_CERTS = 1, 6
MAX_CERT_SIZE = 8192
MAX_FACTS = 4096
MAX_EVIDENCE_SIZE = 12 + MAX_REPORT_SIZE + MAX_CERTS * (4 + MAX_CERT_SIZE) + 4 + MAX_FACTS


@dataclass(frozen=True, slots=True)
class GpuEvidence:
    report: bytes
    certificates: tuple[bytes, ...]
    facts: Mapping[str, Any] = field(default_factory=dict)


def encode_evidence(report: bytes, certificates: Sequence[bytes],
                    facts: Mapping[str, Any] | None = None) -> bytes:
    if not 0 < len(report) <= MAX_REPORT_SIZE:
        raise ValueError(f"report length {len(report)} is outside 1..{MAX_REPORT_SIZE}")
    if not MIN_CERTS <= len(certificates) <= MAX_CERTS:
        raise ValueError(f"need {MIN_CERTS}..{MAX_CERTS} certificates")
    facts_bytes = json.dumps(dict(facts or {}), sort_keys=True,
                             separators=(",", ":")).encode() if facts else b""
    if len(facts_bytes) > MAX_FACTS:
        raise ValueError(f"facts are more than {MAX_FACTS} bytes")
    out = bytearray(MAGIC)
    out += struct.pack(">BBHI", VERSION, len(certificates), 0, len(report)) + report
    for cert in certificates:
        if not 0 < len(cert) <= MAX_CERT_SIZE:
            raise ValueError(f"certificate length {len(cert)} is outside 1..{MAX_CERT_SIZE}")
        out += struct.pack(">I", len(cert)) + cert
    out += struct.pack(">I", len(facts_bytes)) + facts_bytes
    return bytes(out)


def decode_evidence(data: bytes) -> GpuEvidence:
    if len(data) > MAX_EVIDENCE_SIZE:
        raise MalformedEvidence(f"nvidia-gpu evidence is {len(data)} bytes, more than "
                                f"{MAX_EVIDENCE_SIZE}")
    if len(data) < 12 or data[:4] != MAGIC:
        raise MalformedEvidence("nvidia-gpu evidence does not start with the 'NVGE' header")
    version, count, reserved, report_len = struct.unpack_from(">BBHI", data, 4)
    if version != VERSION or reserved:
        raise MalformedEvidence(f"nvidia-gpu evidence container version {version} is unknown")
    if not MIN_CERTS <= count <= MAX_CERTS:
        raise MalformedEvidence(f"nvidia-gpu evidence has {count} certificates, expected "
                                f"{MIN_CERTS}..{MAX_CERTS}")
    if not 0 < report_len <= MAX_REPORT_SIZE or report_len > len(data) - 12:
        raise MalformedEvidence(f"report length {report_len} is out of range or truncated")
    pos = 12 + report_len
    report = bytes(data[12:pos])
    certs = []
    for i in range(count):
        if len(data) - pos < 4:
            raise MalformedEvidence(f"nvidia-gpu evidence is truncated before certificate {i}")
        (length,) = struct.unpack_from(">I", data, pos)
        pos += 4
        if not 0 < length <= MAX_CERT_SIZE or length > len(data) - pos:
            raise MalformedEvidence(f"certificate {i} length {length} is out of range or "
                                    "truncated")
        certs.append(bytes(data[pos:pos + length]))
        pos += length
    if len(data) - pos < 4:
        raise MalformedEvidence("nvidia-gpu evidence is truncated before the facts")
    (facts_len,) = struct.unpack_from(">I", data, pos)
    pos += 4
    if facts_len > MAX_FACTS or facts_len != len(data) - pos:
        raise MalformedEvidence(f"facts length {facts_len} is more than {MAX_FACTS} or does "
                                "not end the evidence")
    facts: dict[str, Any] = {}
    if facts_len:
        try:
            facts = json.loads(bytes(data[pos:]).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise MalformedEvidence("NVML facts are not UTF-8 JSON") from exc
        except RecursionError:
            raise MalformedEvidence("NVML facts are nested too deeply") from None
        if not isinstance(facts, dict):
            raise MalformedEvidence("NVML facts are not a JSON object")
    return GpuEvidence(report=report, certificates=tuple(certs), facts=facts)
