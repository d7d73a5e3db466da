"""The ``tpm2`` evidence payload, byte by byte (big-endian).

Version 1 (a quote of the SHA-256 bank only; written whenever that is all it carries)::

    8 bytes   magic b"CTTPM2\\x00\\x01"
    BE16      length of TPMS_ATTEST (1..1024) | TPMS_ATTEST as the TPM signed it
    BE16      length of TPMT_SIGNATURE (1..1024) | TPMT_SIGNATURE
    u8        number of SHA-256 PCR values n (<= 24)
    n x       u8 PCR index (< 24, strictly ascending) | 32-byte value
    BE32      event log length (<= 1 MiB) | event log (attest.eventlog wire format)

Version 2 (every quoted bank: a multi-bank quote such as ``tpm2_quote -l
sha256:0,1+sha384:0,1``)::

    8 bytes   magic b"CTTPM2\\x00\\x02"
    BE16      length of TPMS_ATTEST (1..1024) | TPMS_ATTEST
    BE16      length of TPMT_SIGNATURE (1..1024) | TPMT_SIGNATURE
    u8        number of banks m (1..4)
    m x       BE16 hash algorithm (0x0004 SHA-1, 0x000B SHA-256, 0x000C SHA-384,
              0x000D SHA-512; strictly ascending) | u8 number of values n (<= 24) |
              n x (u8 PCR index (< 24, strictly ascending) | value of the bank's digest size)
    BE32      event log length (<= 1 MiB) | event log

Trailing bytes are an error. The PCR values are the ones the quote's ``pcrDigest`` covers, in
every bank it selects; the verifier recomputes the digest over them, so a value changed in
transit is caught. ``pcrs`` is the SHA-256 bank (the one policies and the event log use);
``other_banks`` holds the rest by hash algorithm.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass, field

from attest.eventlog import MAX_LOG_BYTES
from attest.interface import MalformedEvidence
from attest.tpm2.marshal import ALG_SHA1, ALG_SHA256, ALG_SHA384, ALG_SHA512, digest_size

__all__ = ["MAGIC", "MAGIC_V2", "Tpm2Evidence"]

MAGIC = b"CTTPM2\x00\x01"
MAGIC_V2 = b"CTTPM2\x00\x02"
MAX_STRUCT = 1024
NUM_PCRS = 24
BANKS = (ALG_SHA1, ALG_SHA256, ALG_SHA384, ALG_SHA512)
MAX_EVIDENCE = (8 + 2 + MAX_STRUCT + 2 + MAX_STRUCT + 1 + len(BANKS) * (3 + NUM_PCRS * 65)
                + 4 + MAX_LOG_BYTES)

Bank = Mapping[int, bytes]  # PCR index -> value


@dataclass(frozen=True, slots=True)
class Tpm2Evidence:
    attest: bytes
    signature: bytes
    pcrs: Bank = field(default_factory=dict)  # SHA-256 bank
    event_log: bytes = b""
    other_banks: Mapping[int, Bank] = field(default_factory=dict)  # hash alg -> bank

    def __post_init__(self) -> None:
        if not 0 < len(self.attest) <= MAX_STRUCT or not 0 < len(self.signature) <= MAX_STRUCT:
            raise ValueError("attest and signature must be 1-1024 bytes")
        if ALG_SHA256 in self.other_banks:
            raise ValueError("the SHA-256 bank goes in pcrs, not other_banks")
        for alg, bank in self.banks.items():
            if alg not in BANKS:
                raise ValueError(f"PCR bank 0x{alg:04x} is not SHA-1/256/384/512")
            for i, v in bank.items():
                if not 0 <= i < NUM_PCRS or len(v) != digest_size(alg):
                    raise ValueError(f"PCR values must be {digest_size(alg)} bytes at indices "
                                     "0-23 in that bank")
        if len(self.event_log) > MAX_LOG_BYTES:
            raise ValueError("event log exceeds 1 MiB")

    @property
    def banks(self) -> dict[int, Bank]:
        """Every bank carried, by hash algorithm (SHA-256 included when it has values)."""
        out = {alg: bank for alg, bank in self.other_banks.items() if bank}
        if self.pcrs or not out:
            out[ALG_SHA256] = self.pcrs
        return dict(sorted(out.items()))

    def to_bytes(self) -> bytes:
        head = [struct.pack(">H", len(self.attest)), self.attest,
                struct.pack(">H", len(self.signature)), self.signature]
        tail = [struct.pack(">I", len(self.event_log)), self.event_log]
        banks = self.banks
        if list(banks) == [ALG_SHA256]:
            return b"".join([MAGIC, *head, struct.pack(">B", len(self.pcrs)),
                             *_values(self.pcrs), *tail])
        parts = [MAGIC_V2, *head, struct.pack(">B", len(banks))]
        for alg, bank in banks.items():
            parts += [struct.pack(">HB", alg, len(bank)), *_values(bank)]
        return b"".join(parts + tail)

    @classmethod
    def from_bytes(cls, data: bytes) -> Tpm2Evidence:
        if len(data) > MAX_EVIDENCE:
            raise MalformedEvidence(f"tpm2 evidence: {len(data)} bytes, maximum {MAX_EVIDENCE}")
        r = _Cursor(bytes(data))
        magic = r.take(8, "magic")
        if magic not in (MAGIC, MAGIC_V2):
            raise MalformedEvidence("tpm2 evidence: bad magic or version")
        attest = r.take(r.length(">H", MAX_STRUCT, "attest length"), "attest")
        sig = r.take(r.length(">H", MAX_STRUCT, "signature length"), "signature")
        banks: dict[int, dict[int, bytes]] = {}
        if magic == MAGIC:
            banks[ALG_SHA256] = _read_bank(r, ALG_SHA256)
        else:
            m = r.length(">B", len(BANKS), "bank count")
            if m == 0:
                raise MalformedEvidence("tpm2 evidence: no PCR bank")
            last_alg = -1
            for _ in range(m):
                (alg,) = struct.unpack(">H", r.take(2, "bank algorithm"))
                if alg not in BANKS:
                    raise MalformedEvidence(f"tpm2 evidence: PCR bank 0x{alg:04x} unknown")
                if alg <= last_alg:
                    raise MalformedEvidence("tpm2 evidence: banks not strictly ascending")
                last_alg = alg
                banks[alg] = _read_bank(r, alg)
        log = r.take(r.length(">I", MAX_LOG_BYTES, "event log length"), "event log")
        if r.pos != len(data):
            raise MalformedEvidence(f"tpm2 evidence: {len(data) - r.pos} trailing bytes")
        if not attest or not sig:
            raise MalformedEvidence("tpm2 evidence: empty attest or signature")
        sha256 = banks.pop(ALG_SHA256, {})
        return cls(attest, sig, sha256, log, banks)


def _values(bank: Bank) -> list[bytes]:
    out = []
    for i in sorted(bank):
        out += [struct.pack(">B", i), bank[i]]
    return out


def _read_bank(r: _Cursor, alg: int) -> dict[int, bytes]:
    n = r.length(">B", NUM_PCRS, "PCR count")
    size = digest_size(alg)
    bank: dict[int, bytes] = {}
    last = -1
    for _ in range(n):
        idx = r.length(">B", NUM_PCRS - 1, "PCR index")
        if idx <= last:
            raise MalformedEvidence("tpm2 evidence: PCR indices not strictly ascending")
        last = idx
        bank[idx] = r.take(size, f"PCR {idx} value")
    return bank


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
