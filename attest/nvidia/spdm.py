"""SPDM 1.1 GET_MEASUREMENTS request and MEASUREMENTS response, as NVIDIA Hopper GPUs return
them for attestation (the "attestation report" is the request followed by the response).

All multi-byte integers are little-endian. Request (exactly 37 bytes):

======  ====  ===========================================================
offset  size  field
======  ====  ===========================================================
0       1     SPDMVersion 0x11
1       1     RequestResponseCode 0xE0 (GET_MEASUREMENTS)
2       1     param1: bit 0 = signature requested (must be set)
3       1     param2: measurement operation, 0xFF = all measurements
4       32    nonce chosen by the requester (here: the session binding)
36      1     SlotIDParam
======  ====  ===========================================================

Response:

======  ====  ===========================================================
0       1     SPDMVersion 0x11
1       1     RequestResponseCode 0x60 (MEASUREMENTS)
2       1     param1
3       1     param2 (slot id)
4       1     NumberOfBlocks N (at most 255)
5       3     MeasurementRecordLength L (at most :data:`MAX_RECORD`)
8       L     N measurement blocks (below)
8+L     32    responder nonce (the GPU's own random value)
40+L    2     OpaqueDataLength O (at most :data:`MAX_OPAQUE`)
42+L    O     opaque data: NVIDIA TLVs (u16 type, u16 length, value)
42+L+O  96    signature r||s (big-endian), ECDSA P-384/SHA-384 over the request
              and the response up to (not including) the signature
======  ====  ===========================================================

Anything after the signature is ignored (a real report ends with one zero byte).
Measurement block: Index (1), MeasurementSpecification (1, bit 0 = DMTF), MeasurementSize
(2), then the DMTF measurement: DMTFSpecMeasurementValueType (1), ValueSize (2), value.
The opaque TLV types read here: 3 driver version (NUL-terminated ASCII), 6 VBIOS version
(8 bytes), 14 board id, 15 chip SKU, 17 project, 18 project SKU (ASCII, NUL padded),
20 FWID (48 bytes), 4 GPU info, 11 NVDEC0 status, 21 protected PCIe status.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from attest.interface import MalformedEvidence

__all__ = [
    "MAX_REPORT_SIZE",
    "REQUEST_SIZE",
    "SIGNATURE_SIZE",
    "SpdmReport",
    "parse_report",
]

REQUEST_SIZE = 37
SIGNATURE_SIZE = 96
MAX_RECORD = 16384
MAX_OPAQUE = 4096
MAX_REPORT_SIZE = REQUEST_SIZE + 8 + MAX_RECORD + 34 + MAX_OPAQUE + SIGNATURE_SIZE + 16
MAX_MEASUREMENT = 128
SPDM_VERSION = 0x11
GET_MEASUREMENTS = 0xE0
MEASUREMENTS = 0x60

OPAQUE_DRIVER_VERSION = 3
OPAQUE_GPU_INFO = 4
OPAQUE_VBIOS_VERSION = 6
OPAQUE_NVDEC0_STATUS = 11
OPAQUE_BOARD_ID = 14
OPAQUE_CHIP_SKU = 15
OPAQUE_PROJECT = 17
OPAQUE_PROJECT_SKU = 18
OPAQUE_FWID = 20
OPAQUE_PROTECTED_PCIE_STATUS = 21


@dataclass(frozen=True, slots=True)
class SpdmReport:
    request: bytes
    request_nonce: bytes
    response_nonce: bytes
    measurements: dict[int, bytes]  # block index (1-based) -> measurement value
    opaque: dict[int, bytes]  # TLV type -> value (the first of each type)
    signed_bytes: bytes  # request || response without the signature
    signature: bytes  # r||s, 96 bytes

    def _ascii(self, tlv: int) -> str:
        raw = self.opaque.get(tlv, b"").split(b"\x00", 1)[0]
        return raw.decode("ascii", "replace")

    @property
    def driver_version(self) -> str:
        return self._ascii(OPAQUE_DRIVER_VERSION)

    @property
    def vbios_version(self) -> str:
        """"96.00.9f.00.01" from the 8 bytes ``00 9f 00 96 01 00 00 00``."""
        raw = self.opaque.get(OPAQUE_VBIOS_VERSION, b"")
        if len(raw) < 5:
            return ""
        main = f"{int.from_bytes(raw[:4], 'little'):08x}"
        return ".".join([main[0:2], main[2:4], main[4:6], main[6:8], f"{raw[4]:02x}"])

    @property
    def fwid(self) -> bytes:
        return self.opaque.get(OPAQUE_FWID, b"")

    @property
    def board_id(self) -> str:
        return self.opaque.get(OPAQUE_BOARD_ID, b"").hex()

    @property
    def chip_sku(self) -> str:
        return self._ascii(OPAQUE_CHIP_SKU)

    @property
    def project(self) -> str:
        return self._ascii(OPAQUE_PROJECT)

    @property
    def project_sku(self) -> str:
        return self._ascii(OPAQUE_PROJECT_SKU)


def parse_report(data: bytes) -> SpdmReport:
    """Parse request || response; :class:`MalformedEvidence` names the bad field."""
    if len(data) > MAX_REPORT_SIZE:
        raise MalformedEvidence(f"SPDM report is {len(data)} bytes, more than "
                                f"{MAX_REPORT_SIZE}")
    if len(data) < REQUEST_SIZE + 8:
        raise MalformedEvidence("SPDM report is shorter than a request and response header")
    request = bytes(data[:REQUEST_SIZE])
    if request[0] != SPDM_VERSION or request[1] != GET_MEASUREMENTS:
        raise MalformedEvidence("SPDM request is not an SPDM 1.1 GET_MEASUREMENTS")
    if not request[2] & 1:
        raise MalformedEvidence("SPDM request did not ask for a signature")
    if request[3] != 0xFF:
        raise MalformedEvidence("SPDM request did not ask for all measurements")
    pos = REQUEST_SIZE
    if data[pos] != SPDM_VERSION or data[pos + 1] != MEASUREMENTS:
        raise MalformedEvidence("SPDM response is not an SPDM 1.1 MEASUREMENTS")
    blocks = data[pos + 4]
    record_len = int.from_bytes(data[pos + 5:pos + 8], "little")
    if record_len > MAX_RECORD:
        raise MalformedEvidence(f"measurement record length {record_len} is more than "
                                f"{MAX_RECORD}")
    pos += 8
    if record_len > len(data) - pos:
        raise MalformedEvidence("SPDM response is truncated in the measurement record")
    measurements = _parse_record(bytes(data[pos:pos + record_len]), blocks)
    pos += record_len
    if len(data) - pos < 34:
        raise MalformedEvidence("SPDM response is truncated before the opaque data")
    response_nonce = bytes(data[pos:pos + 32])
    (opaque_len,) = struct.unpack_from("<H", data, pos + 32)
    pos += 34
    if opaque_len > MAX_OPAQUE:
        raise MalformedEvidence(f"opaque data length {opaque_len} is more than {MAX_OPAQUE}")
    if opaque_len > len(data) - pos:
        raise MalformedEvidence("SPDM response is truncated in the opaque data")
    opaque = _parse_opaque(bytes(data[pos:pos + opaque_len]))
    pos += opaque_len
    if len(data) - pos < SIGNATURE_SIZE:
        raise MalformedEvidence("SPDM response is truncated in the signature")
    return SpdmReport(request=request, request_nonce=request[4:36],
                      response_nonce=response_nonce, measurements=measurements, opaque=opaque,
                      signed_bytes=bytes(data[:pos]),
                      signature=bytes(data[pos:pos + SIGNATURE_SIZE]))


def _parse_record(record: bytes, blocks: int) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    pos = 0
    for i in range(blocks):
        if len(record) - pos < 7:
            raise MalformedEvidence(f"measurement block {i} is truncated")
        index, spec, size = struct.unpack_from("<BBH", record, pos)
        value_type, value_size = struct.unpack_from("<BH", record, pos + 4)
        if size > len(record) - pos - 4 or value_size + 3 != size:
            raise MalformedEvidence(f"measurement block {index} has inconsistent sizes")
        if not spec & 1 or value_size > MAX_MEASUREMENT:
            raise MalformedEvidence(f"measurement block {index} is not a DMTF measurement")
        if index in out:
            raise MalformedEvidence(f"measurement block {index} appears twice")
        out[index] = bytes(record[pos + 7:pos + 7 + value_size])
        pos += 4 + size
        del value_type  # raw digest or raw bitstream: compared as bytes either way
    if pos != len(record):
        raise MalformedEvidence("measurement record has bytes after the last block")
    return out


def _parse_opaque(opaque: bytes) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    pos = 0
    while pos < len(opaque):
        if len(opaque) - pos < 4:
            raise MalformedEvidence("opaque data ends inside a TLV header")
        tlv_type, length = struct.unpack_from("<HH", opaque, pos)
        if length > len(opaque) - pos - 4:
            raise MalformedEvidence(f"opaque TLV {tlv_type} runs past the opaque data")
        out.setdefault(tlv_type, bytes(opaque[pos + 4:pos + 4 + length]))
        pos += 4 + length
    return out
