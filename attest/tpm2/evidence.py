"""The ``tpm2`` evidence payload, byte by byte (big-endian)::

    8 bytes   magic b"CTTPM2\\x00\\x01"
    BE16      length of TPMS_ATTEST (1..1024) | TPMS_ATTEST as the TPM signed it
    BE16      length of TPMT_SIGNATURE (1..1024) | TPMT_SIGNATURE
    u8        number of SHA-256 PCR values n (<= 24)
    n x       u8 PCR index (< 24, strictly ascending) | 32-byte value
    BE32      event log length (<= 1 MiB) | event log (attest.eventlog wire format)

Trailing bytes are an error. The PCR values are the ones the quote's ``pcrDigest`` covers; the
verifier recomputes the digest, so a value changed in transit is caught.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass, field

from attest.eventlog import MAX_LOG_BYTES
from attest.interface import MalformedEvidence

__all__ = ["MAGIC", "Tpm2Evidence"]

MAGIC = b"CTTPM2\x00\x01"
MAX_STRUCT = 1024
NUM_PCRS = 24
MAX_EVIDENCE = 8 + 2 + MAX_STRUCT + 2 + MAX_STRUCT + 1 + NUM_PCRS * 33 + 4 + MAX_LOG_BYTES


@dataclass(frozen=True, slots=True)
class Tpm2Evidence:
    attest: bytes
    signature: bytes
    pcrs: Mapping[int, bytes] = field(default_factory=dict)  # SHA-256 bank
    event_log: bytes = b""

    def __post_init__(self) -> None:
        if not 0 < len(self.attest) <= MAX_STRUCT or not 0 < len(self.signature) <= MAX_STRUCT:
            raise ValueError("attest and signature must be 1-1024 bytes")
        for i, v in self.pcrs.items():
            if not 0 <= i < NUM_PCRS or len(v) != 32:
                raise ValueError("PCR values must be 32 bytes at indices 0-23")
        if len(self.event_log) > MAX_LOG_BYTES:
            raise ValueError("event log exceeds 1 MiB")

    def to_bytes(self) -> bytes:
        parts = [MAGIC, struct.pack(">H", len(self.attest)), self.attest]
        parts += [struct.pack(">H", len(self.signature)), self.signature]
        parts.append(struct.pack(">B", len(self.pcrs)))
        for i in sorted(self.pcrs):
            parts += [struct.pack(">B", i), self.pcrs[i]]
        parts += [struct.pack(">I", len(self.event_log)), self.event_log]
        return b"".join(parts)

    @classmethod
    def from_bytes(cls, data: bytes) -> Tpm2Evidence:
        if len(data) > MAX_EVIDENCE:
            raise MalformedEvidence(f"tpm2 evidence: {len(data)} bytes, maximum {MAX_EVIDENCE}")
        r = _Cursor(bytes(data))
        if r.take(8, "magic") != MAGIC:
            raise MalformedEvidence("tpm2 evidence: bad magic or version")
        attest = r.take(r.length(">H", MAX_STRUCT, "attest length"), "attest")
        sig = r.take(r.length(">H", MAX_STRUCT, "signature length"), "signature")
        n = r.length(">B", NUM_PCRS, "PCR count")
        pcrs: dict[int, bytes] = {}
        last = -1
        for _ in range(n):
            idx = r.length(">B", NUM_PCRS - 1, "PCR index")
            if idx <= last:
                raise MalformedEvidence("tpm2 evidence: PCR indices not strictly ascending")
            last = idx
            pcrs[idx] = r.take(32, f"PCR {idx} value")
        log = r.take(r.length(">I", MAX_LOG_BYTES, "event log length"), "event log")
        if r.pos != len(data):
            raise MalformedEvidence(f"tpm2 evidence: {len(data) - r.pos} trailing bytes")
        if not attest or not sig:
            raise MalformedEvidence("tpm2 evidence: empty attest or signature")
        return cls(attest, sig, pcrs, log)


class _Cursor:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int, what: str) -> bytes:
        if self.pos + n > len(self.data):
            raise MalformedEvidence(f"tpm2 evidence: truncated at {what}")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def length(self, fmt: str, maximum: int, what: str) -> int:
        (value,) = struct.unpack(fmt, self.take(struct.calcsize(fmt), what))
        if value > maximum:
            raise MalformedEvidence(f"tpm2 evidence: {what} {value} exceeds {maximum}")
        return int(value)
