"""Node evidence and its verification."""

from attest.interface import (
    EvidenceVerifier,
    Failure,
    MalformedEvidence,
    VerificationContext,
    VerificationResult,
    expected_report_data,
)

__all__ = [
    "EvidenceVerifier",
    "Failure",
    "MalformedEvidence",
    "VerificationContext",
    "VerificationResult",
    "expected_report_data",
]
