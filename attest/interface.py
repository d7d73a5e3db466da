"""The one interface every evidence kind implements (DESIGN.md section 6).

A verifier turns evidence bytes into **claims** (a flat mapping of names to JSON-like values
that policies read) plus every failure it found, instead of stopping at the first.
Malformed evidence (cannot be parsed at all) raises :class:`MalformedEvidence`.

Binding: the evidence's report data / qualifying data must equal
:func:`expected_report_data` over the broker's nonce, the session id and the node's one-time
public key, so evidence cannot be replayed into another session or for another key.

One quote for several sessions: a node that attests to several brokers at once (each with its
own nonce and session), or several local ranks sharing the node's TPM, may produce one piece of
evidence whose report data is :func:`combined_report_data` over the list of every session's
expected report data, and send that list with it. Each broker checks that its own session's
expected report data is in the list and verifies the evidence against the combined value, so
the evidence is still bound to its fresh nonce and the node's one-time key; the other items
are opaque SHA-256 values that tell it nothing. Byte layout::

    SHA-256("kmsbroker/v1/attest-set\0" || BE16 n || item_1 || ... || item_n)
    n in 1..MAX_REPORT_DATA_SET, each item 32 bytes (an expected_report_data), in list order
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

__all__ = [
    "EvidenceVerifier",
    "Failure",
    "MalformedEvidence",
    "VerificationContext",
    "VerificationResult",
    "combined_report_data",
    "expected_report_data",
]

REPORT_DATA_DOMAIN = b"kmsbroker/v1/attest\x00"
REPORT_DATA_SET_DOMAIN = b"kmsbroker/v1/attest-set\x00"
MAX_REPORT_DATA_SET = 64


def expected_report_data(nonce: bytes, session_id: str, node_public_key: bytes) -> bytes:
    """SHA-256(domain || nonce || BE16 len(session_id) || session_id || node_public_key)."""
    if len(nonce) != 32:
        raise ValueError("nonce must be 32 bytes")
    sid = session_id.encode()
    if not 0 < len(sid) <= 128:
        raise ValueError("session id must be 1-128 bytes")
    h = hashlib.sha256(REPORT_DATA_DOMAIN)
    h.update(nonce)
    h.update(struct.pack(">H", len(sid)))
    h.update(sid)
    h.update(node_public_key)
    return h.digest()


def combined_report_data(items: Sequence[bytes]) -> bytes:
    """One report data over several sessions' report data (see the module doc)."""
    if not 1 <= len(items) <= MAX_REPORT_DATA_SET:
        raise ValueError(f"a report data set has 1 to {MAX_REPORT_DATA_SET} items")
    h = hashlib.sha256(REPORT_DATA_SET_DOMAIN)
    h.update(struct.pack(">H", len(items)))
    for item in items:
        if len(item) != 32:
            raise ValueError("each item of a report data set is 32 bytes")
        h.update(item)
    return h.digest()


class MalformedEvidence(ValueError):
    """Evidence that cannot be parsed; the message says which field and why."""


@dataclass(frozen=True, slots=True)
class Failure:
    id: str  # stable, machine-readable, e.g. "tpm2.quote.signature"
    message: str  # readable, never secret
    severity: Literal["error", "warning"] = "error"


@dataclass(frozen=True, slots=True)
class VerificationContext:
    """What the verifier trusts, supplied by the broker (never taken from the evidence).

    ``node`` carries the enrolled identity of the node (for tpm2: the AK public key, PEM);
    ``reference`` carries reference values (for tpm2: expected boot PCRs) and trust anchors.
    """

    expected_report_data: bytes
    node: Mapping[str, Any] = field(default_factory=dict)
    reference: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class VerificationResult:
    kind: str
    claims: Mapping[str, Any]
    failures: tuple[Failure, ...] = ()

    @property
    def ok(self) -> bool:
        return not any(f.severity == "error" for f in self.failures)


class EvidenceVerifier(Protocol):
    kind: str  # "tpm2", "sev-snp", ...

    def verify(self, evidence: bytes, context: VerificationContext) -> VerificationResult: ...
