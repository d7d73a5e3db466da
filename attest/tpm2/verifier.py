"""The ``tpm2`` evidence verifier (pure Python with ``cryptography``; no TSS on the broker).

Context it reads (supplied by the broker, never taken from the evidence):

* ``context.node["ak_public"]``: the enrolled AK, PEM (str or bytes) or TPMT_PUBLIC bytes
  (:meth:`attest.tpm2.enrolment.EnrolledAk.node_context` gives it). Absent:
  ``tpm2.ak_not_enrolled`` and nothing else is checked.
* ``context.reference["boot_pcrs"]``: ``{index: hex or bytes}`` expected SHA-256 values of the
  boot PCRs (any of 0-7). Absent or empty: ``tpm2.boot_pcr`` (fail closed).

Checks, each failure collected (ids are stable):

``tpm2.signature`` signature by the enrolled AK; ``tpm2.nonce`` extraData equals
``context.expected_report_data``; ``tpm2.pcr_digest`` quoted digest equals the hash of the PCR
values carried, over every bank the quote selects (a multi-bank quote carries each bank's
values, SHA-384 included: :mod:`attest.tpm2.evidence` version 2); ``tpm2.pcr_selection`` the
quote covers SHA-256 PCRs 0-7 and 23;
``tpm2.boot_pcr`` each reference boot PCR equals its quoted value; ``tpm2.eventlog_replay`` the
event log replays to the quoted PCR 23.

Claims come **only** from the replayed event log, and only when it replays to the quoted
application PCR of a quote whose signature, nonce, PCR digest and selection all hold; a
stale, forged or unbound quote yields no claims at all. (A boot PCR mismatch keeps the claims:
they are authentic, and the failure alone makes the result not ok.)

The event log's parse, replay digest and claims are a pure function of its bytes, which a
node sends unchanged at every attestation (its claims are static): they are memoised by the
log's bytes (:func:`_read_log`, logs up to 64 KiB, 256 of them). The quote (signature,
nonce, PCR values) is checked afresh every time; the memo only spares re-parsing the same
bytes, and a log that does not parse is never memoised.
"""

from __future__ import annotations

import functools
import hmac
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from attest.eventlog import APP_PCR, EventLog
from attest.interface import Failure, MalformedEvidence, VerificationContext, VerificationResult
from attest.tpm2.evidence import Tpm2Evidence
from attest.tpm2.marshal import ALG_SHA256, parse_public
from attest.tpm2.quote import PublicKey, check_quote

__all__ = ["REQUIRED_PCRS", "Tpm2Verifier", "load_ak"]

REQUIRED_PCRS = (*range(8), APP_PCR)


def load_ak(value: Any) -> PublicKey:
    """An AK public key from PEM (str/bytes) or TPMT_PUBLIC bytes; ValueError otherwise."""
    if isinstance(value, str):
        value = value.encode()
    if not isinstance(value, bytes | bytearray):
        raise ValueError("ak_public must be PEM or TPMT_PUBLIC bytes")
    return _parse_ak(bytes(value))


@functools.lru_cache(maxsize=1024)
def _parse_ak(value: bytes) -> PublicKey:
    """A pure function of the enrolled bytes (a node's AK is parsed at every attestation);
    errors are not cached."""
    if value.lstrip().startswith(b"-----BEGIN"):
        key = serialization.load_pem_public_key(value)
    else:
        key = parse_public(value).key
    if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        raise ValueError("ak_public must be an RSA or EC key")
    return key


MEMO_LOG_BYTES = 64 * 1024  # bigger logs are parsed every time: the memo stays small


@dataclass(frozen=True, slots=True)
class _ReadLog:
    """An event log read once: its replayed PCR value and its claims as JSON text (a fresh
    dict per use), or why its claims are malformed (raised only where claims are taken)."""

    replay: bytes
    claims_json: str
    claims_error: str


def _read_log(data: bytes) -> _ReadLog:
    """Parse ``data`` (MalformedEvidence when it does not parse), memoised by its bytes (the
    memo compares whole logs, never a digest alone)."""
    if len(data) > MEMO_LOG_BYTES:
        return _read_log_now(data)
    return _read_log_memo(bytes(data))


@functools.lru_cache(maxsize=256)
def _read_log_memo(data: bytes) -> _ReadLog:
    return _read_log_now(data)


def _read_log_now(data: bytes) -> _ReadLog:
    log = EventLog.from_bytes(data)
    try:
        claims, error = json.dumps(log.claims()), ""
    except MalformedEvidence as exc:
        claims, error = "", str(exc)
    return _ReadLog(log.replay(), claims, error)


def _reference_pcrs(reference: Mapping[str, Any]) -> dict[int, bytes]:
    raw = reference.get("boot_pcrs") or {}
    out: dict[int, bytes] = {}
    for k, v in raw.items():
        idx = int(k)
        value = bytes.fromhex(v) if isinstance(v, str) else bytes(v)
        if not 0 <= idx < 8 or len(value) != 32:
            raise ValueError(f"reference boot PCR {k!r} must be index 0-7 with a SHA-256 value")
        out[idx] = value
    return out


class Tpm2Verifier:
    """EvidenceVerifier for kind ``tpm2``."""

    kind = "tpm2"

    def verify(self, evidence: bytes, context: VerificationContext) -> VerificationResult:
        ev = Tpm2Evidence.from_bytes(evidence)
        log = _read_log(ev.event_log)
        ak_value = context.node.get("ak_public")
        if ak_value is None:
            return VerificationResult(
                self.kind,
                {},
                (Failure("tpm2.ak_not_enrolled", "no enrolled AK for this node"),),
            )
        try:
            ak = load_ak(ak_value)
        except ValueError:
            return VerificationResult(
                self.kind,
                {},
                (Failure("tpm2.ak_not_enrolled", "the enrolled AK record is not a public key"),),
            )
        check = check_quote(
            ev.attest,
            ev.signature,
            ak,
            expected_extra_data=context.expected_report_data,
            pcr_values=ev.banks,  # every bank the quote selects (SHA-384 too)
        )
        failures = list(check.failures)
        quoted = set(check.attest.pcr_select.indices(ALG_SHA256))
        missing = [i for i in REQUIRED_PCRS if i not in quoted or i not in ev.pcrs]
        if missing:
            failures.append(
                Failure("tpm2.pcr_selection", f"quote does not cover SHA-256 PCRs {missing}")
            )
        quote_authentic = not failures  # signature, nonce, PCR digest and selection all hold
        failures += self._boot_failures(ev, quoted, context.reference)
        claims: dict[str, Any] = {}
        app = ev.pcrs.get(APP_PCR)
        if app is not None and APP_PCR in quoted and hmac.compare_digest(log.replay, app):
            if quote_authentic:
                if log.claims_error:
                    raise MalformedEvidence(log.claims_error)
                claims = json.loads(log.claims_json)
        else:
            failures.append(
                Failure(
                    "tpm2.eventlog_replay",
                    f"event log does not replay to the quoted PCR {APP_PCR}",
                )
            )
        return VerificationResult(self.kind, claims, tuple(failures))

    @staticmethod
    def _boot_failures(
        ev: Tpm2Evidence, quoted: set[int], reference: Mapping[str, Any]
    ) -> list[Failure]:
        try:
            expected = _reference_pcrs(reference)
        except (ValueError, TypeError, AttributeError) as exc:
            return [Failure("tpm2.boot_pcr", f"reference values unusable: {exc}")]
        if not expected:
            return [Failure("tpm2.boot_pcr", "no boot PCR reference values configured")]
        failures = []
        for idx, value in sorted(expected.items()):
            got = ev.pcrs.get(idx)
            if idx not in quoted or got is None:
                failures.append(Failure("tpm2.boot_pcr", f"boot PCR {idx} is not quoted"))
            elif not hmac.compare_digest(got, value):
                failures.append(
                    Failure("tpm2.boot_pcr", f"boot PCR {idx} does not match its reference value")
                )
        return failures

