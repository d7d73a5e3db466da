"""The node's measurement log and its replay into the application PCR.

Every hardening fact and the code digest become one **event** ``(type, data)``: ``type`` is
the claim name (``[a-z0-9_.:-]``, 1-64 bytes) and ``data`` the claim value as canonical JSON
(sorted keys, no spaces, ASCII). Events are extended, in order, into **PCR 23** of the SHA-256
bank. PCR 23 is the PC Client profile's "application support" PCR: resettable and extendable
at locality 0, so the node agent resets it and measures a complete log right before each quote
(PCR 16 is the debug PCR and is avoided). The boot PCRs 0-7 vouch for the platform that runs
the agent; PCR 23 binds this log to the quote.

Event digest and replay::

    d_i   = SHA-256(b"ct-event/v1\\x00" || u8 len(type) || type || BE32 len(data) || data)
    PCR_0 = 32 zero bytes;  PCR_i = SHA-256(PCR_{i-1} || d_i)

Wire format (big-endian)::

    8 bytes  magic b"CTEVLOG1"
    BE16     event count (<= 256)
    per event: u8 type length (1..64) | type (ASCII) | BE32 data length (<= 65536) | data

The whole log is at most 1 MiB; trailing bytes are an error.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from attest.interface import MalformedEvidence

__all__ = [
    "APP_PCR",
    "MAX_LOG_BYTES",
    "Event",
    "EventLog",
    "event_digest",
    "replay",
]

APP_PCR = 23
MAGIC = b"CTEVLOG1"
DOMAIN = b"ct-event/v1\x00"
MAX_EVENTS = 256
MAX_TYPE = 64
MAX_DATA = 65536
MAX_LOG_BYTES = 1 << 20
_TYPE_RE = re.compile(r"[a-z0-9_.:-]{1,64}")


def canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


@dataclass(frozen=True, slots=True)
class Event:
    type: str
    data: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.type, str) or not _TYPE_RE.fullmatch(self.type):
            raise ValueError("event type must be 1-64 characters of [a-z0-9_.:-]")
        if not isinstance(self.data, bytes) or len(self.data) > MAX_DATA:
            raise ValueError(f"event data must be bytes of at most {MAX_DATA}")

    @classmethod
    def claim(cls, name: str, value: Any) -> Event:
        return cls(name, canonical_json(value))

    @property
    def digest(self) -> bytes:
        return event_digest(self.type, self.data)


def event_digest(type_: str, data: bytes) -> bytes:
    t = type_.encode("ascii")
    return hashlib.sha256(
        DOMAIN + struct.pack(">B", len(t)) + t + struct.pack(">I", len(data)) + data
    ).digest()


def replay(events: Iterable[Event]) -> bytes:
    """Recompute the application PCR value from a log, starting from all zeros."""
    pcr = bytes(32)
    for e in events:
        pcr = hashlib.sha256(pcr + e.digest).digest()
    return pcr


@dataclass(frozen=True, slots=True)
class EventLog:
    events: tuple[Event, ...]

    def __post_init__(self) -> None:
        if len(self.events) > MAX_EVENTS:
            raise ValueError(f"an event log holds at most {MAX_EVENTS} events")

    @classmethod
    def from_claims(cls, claims: Mapping[str, Any]) -> EventLog:
        """One event per claim, in sorted name order (the order is part of the PCR)."""
        return cls(tuple(Event.claim(k, claims[k]) for k in sorted(claims)))

    def replay(self) -> bytes:
        return replay(self.events)

    def claims(self) -> dict[str, Any]:
        """Claim values from the events; a repeated name or non-JSON data is malformed."""
        out: dict[str, Any] = {}
        for e in self.events:
            if e.type in out:
                raise MalformedEvidence(f"event log: claim {e.type!r} measured twice")
            try:
                out[e.type] = json.loads(e.data)
            except (ValueError, RecursionError):
                raise MalformedEvidence(f"event log: data of {e.type!r} is not JSON") from None
        return out

    def to_bytes(self) -> bytes:
        parts = [MAGIC, struct.pack(">H", len(self.events))]
        for e in self.events:
            t = e.type.encode("ascii")
            parts += [struct.pack(">B", len(t)), t, struct.pack(">I", len(e.data)), e.data]
        out = b"".join(parts)
        if len(out) > MAX_LOG_BYTES:
            raise ValueError("event log exceeds 1 MiB")
        return out

    @classmethod
    def from_bytes(cls, data: bytes) -> EventLog:
        if len(data) > MAX_LOG_BYTES:
            raise MalformedEvidence(f"event log: {len(data)} bytes, maximum {MAX_LOG_BYTES}")
        if data[:8] != MAGIC:
            raise MalformedEvidence("event log: bad magic")
        pos = 8
        (count,) = _unpack(">H", data, pos, "count")
        pos += 2
        if count > MAX_EVENTS:
            raise MalformedEvidence(f"event log: {count} events, maximum {MAX_EVENTS}")
        events = []
        for i in range(count):
            (tlen,) = _unpack(">B", data, pos, f"event {i} type length")
            pos += 1
            if not 1 <= tlen <= MAX_TYPE or pos + tlen > len(data):
                raise MalformedEvidence(f"event log: event {i} type length {tlen} invalid")
            try:
                type_ = data[pos : pos + tlen].decode("ascii")
            except UnicodeDecodeError:
                raise MalformedEvidence(f"event log: event {i} type is not ASCII") from None
            pos += tlen
            (dlen,) = _unpack(">I", data, pos, f"event {i} data length")
            pos += 4
            if dlen > MAX_DATA or pos + dlen > len(data):
                raise MalformedEvidence(f"event log: event {i} data length {dlen} invalid")
            try:
                events.append(Event(type_, bytes(data[pos : pos + dlen])))
            except ValueError as exc:
                raise MalformedEvidence(f"event log: event {i}: {exc}") from None
            pos += dlen
        if pos != len(data):
            raise MalformedEvidence(f"event log: {len(data) - pos} trailing bytes")
        return cls(tuple(events))


def _unpack(fmt: str, data: bytes, pos: int, field: str) -> tuple[int, ...]:
    size = struct.calcsize(fmt)
    if pos + size > len(data):
        raise MalformedEvidence(f"event log: truncated at {field}")
    return struct.unpack_from(fmt, data, pos)
