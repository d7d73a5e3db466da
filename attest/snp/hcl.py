"""Azure confidential VM HCL report: an SEV-SNP report wrapped with runtime data.

Layout (all integers u32 little-endian), as produced by the Azure paravisor (HCL) and read
by trustee's az-snp-vtpm verifier:

======  ======  =================================================================
offset  size    field
======  ======  =================================================================
0x000   4       signature ``b"HCLA"``
0x004   4       version (1 or 2)
0x008   4       report_size: bytes used from 0x000 (header + report + runtime data)
0x00C   4       request_type (must be 2 = attestation report request)
0x010   4       status (must be 0)
0x014   12      reserved (must be zero)
0x020   1184    SEV-SNP attestation report (:mod:`attest.snp.report`)
0x4C0   4       runtime data_size (20 + variable_data_size)
0x4C4   4       runtime version (must be 1)
0x4C8   4       report_type (2 = SEV-SNP, 4 = TDX)
0x4CC   4       report_data hash type (1 = SHA-256, 2 = SHA-384, 3 = SHA-512)
0x4D0   4       variable_data_size
0x4D4   n       variable data: UTF-8 JSON with ``keys`` (HCLAkPub, HCLEkPub as JWK),
                ``vm-configuration`` and ``user-data`` (hex of 64 bytes)
======  ======  =================================================================

The SNP report's report_data starts with hash(variable data), which binds the vTPM
attestation key (HCLAkPub) and the guest's user data to the hardware-signed report. The
file may be padded with zero bytes after ``report_size`` (Azure serves 2600 bytes).
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from typing import Any

from attest.interface import MalformedEvidence

from .report import REPORT_SIZE

__all__ = ["MAX_HCL_SIZE", "HclReport", "parse_hcl_report"]

MAX_HCL_SIZE = 16384
HCL_MAGIC = b"HCLA"
_REPORT_OFFSET = 0x20
_RUNTIME_OFFSET = _REPORT_OFFSET + REPORT_SIZE
_VAR_OFFSET = _RUNTIME_OFFSET + 20
_REPORT_TYPE_SNP = 2
_HCL_VERSIONS = (1, 2)
_HASHES = {1: hashlib.sha256, 2: hashlib.sha384, 3: hashlib.sha512}


@dataclass(frozen=True, slots=True)
class HclReport:
    snp_report: bytes
    hash_type: int
    var_data: bytes
    var_json: dict[str, Any]

    def var_data_digest(self) -> bytes:
        return _HASHES[self.hash_type](self.var_data).digest()

    @property
    def user_data(self) -> bytes | None:
        value = self.var_json.get("user-data")
        if not isinstance(value, str):
            return None
        try:
            return bytes.fromhex(value)
        except ValueError:
            return None

    @property
    def vm_configuration(self) -> dict[str, Any]:
        value = self.var_json.get("vm-configuration")
        return value if isinstance(value, dict) else {}

    def jwk(self, kid: str) -> dict[str, Any] | None:
        keys = self.var_json.get("keys")
        if isinstance(keys, list):
            for key in keys:
                if isinstance(key, dict) and key.get("kid") == kid:
                    return key
        return None


def parse_hcl_report(data: bytes, *, report_type: int = _REPORT_TYPE_SNP) -> HclReport:
    """Parse an HCL report whose runtime data names ``report_type`` (2 SEV-SNP, 4 TDX: the
    0x20..0x4C0 region then holds a 1024-byte TDREPORT and zero padding)."""
    if len(data) > MAX_HCL_SIZE:
        raise MalformedEvidence(f"HCL report is {len(data)} bytes, more than {MAX_HCL_SIZE}")
    if len(data) < _VAR_OFFSET:
        raise MalformedEvidence(f"HCL report is {len(data)} bytes, shorter than its header")
    if data[:4] != HCL_MAGIC:
        raise MalformedEvidence("HCL report does not start with 'HCLA'")
    version, report_size, request_type, status = struct.unpack_from("<4I", data, 0x004)
    # The header is not signed; only values seen from Azure are accepted, so an edited one is
    # refused rather than silently ignored.
    if version not in _HCL_VERSIONS or request_type != 2 or status != 0 or any(data[0x14:0x20]):
        raise MalformedEvidence(
            f"HCL header is not a successful attestation report (version {version}, "
            f"request type {request_type}, status {status})")
    data_size, runtime_version, found_type, hash_type, var_size = struct.unpack_from(
        "<5I", data, _RUNTIME_OFFSET)
    if runtime_version != 1:
        raise MalformedEvidence(f"HCL runtime data version {runtime_version} is unknown")
    if found_type != report_type:
        name = {2: "SEV-SNP", 4: "TDX"}.get(report_type, "?")
        raise MalformedEvidence(f"HCL report type {found_type} is not {name} ({report_type})")
    if hash_type not in _HASHES:
        raise MalformedEvidence(f"HCL report data hash type {hash_type} is unknown")
    if var_size > len(data) - _VAR_OFFSET or data_size != var_size + 20:
        raise MalformedEvidence(
            f"HCL variable data size {var_size} does not fit the report")
    if report_size != _VAR_OFFSET + var_size:
        raise MalformedEvidence(f"HCL report_size {report_size} disagrees with its contents")
    if any(data[_VAR_OFFSET + var_size:]):
        raise MalformedEvidence("HCL report has non-zero bytes after its variable data")
    var_data = bytes(data[_VAR_OFFSET:_VAR_OFFSET + var_size])
    try:
        var_json = json.loads(var_data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise MalformedEvidence("HCL variable data is not UTF-8 JSON") from exc
    except RecursionError:
        raise MalformedEvidence("HCL variable data is nested too deeply") from None
    if not isinstance(var_json, dict):
        raise MalformedEvidence("HCL variable data is not a JSON object")
    return HclReport(
        snp_report=bytes(data[_REPORT_OFFSET:_RUNTIME_OFFSET]),
        hash_type=hash_type,
        var_data=var_data,
        var_json=var_json,
    )
