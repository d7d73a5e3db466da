"""A test-only evidence kind, ``test-json``, until the TPM verifier is wired in.

Payload: JSON ``{"report_data": hex, "claims": {...}}``. The verifier trusts the claims (this
is what makes it test-only) but enforces the binding: ``report_data`` must equal the
session's expected report data, so evidence made for another nonce, session or node key fails.
"""

from __future__ import annotations

import json

from attest.interface import Failure, MalformedEvidence, VerificationContext, VerificationResult

KIND = "test-json"


class JsonClaimsVerifier:
    kind = KIND

    def verify(self, evidence: bytes, context: VerificationContext) -> VerificationResult:
        try:
            doc = json.loads(evidence)
            report_data = bytes.fromhex(doc["report_data"])
            claims = dict(doc["claims"])
        except (ValueError, KeyError, TypeError) as exc:
            raise MalformedEvidence(f"test-json evidence: {exc}") from None
        failures = []
        if report_data != context.expected_report_data:
            failures.append(Failure("test.report_data",
                                    "report data is not bound to this session, nonce and key"))
        return VerificationResult(kind=KIND, claims=claims, failures=tuple(failures))


DEFAULT_CLAIMS = {"node.ksm.enabled": False, "node.swap.enabled": False}  # pass POLICY_YAML


def make_evidence(report_data: bytes, claims: dict | None = None) -> tuple[str, bytes]:
    claims = DEFAULT_CLAIMS if claims is None else claims
    return KIND, json.dumps({"report_data": report_data.hex(), "claims": claims}).encode()


POLICY_YAML = """\
name: test-hardening
version: 1
rules:
  - name: ksm-off
    expr: claims.node.ksm.enabled == false
    reason: KSM merges identical pages across processes
  - name: swap-off
    expr: claims.node.swap.enabled == false
    reason: swap may write key material to disk
"""
