"""TPM 2.0 evidence: the pure-Python verifier side and the node side over tpm2-pytss.

Verifier side (no TSS needed): :class:`Tpm2Verifier` (the ``tpm2`` EvidenceVerifier),
:func:`check_quote` (raw TPMS_ATTEST + TPMT_SIGNATURE + AK core, for any producer), enrolment
(:func:`begin_enrolment` / :func:`complete_enrolment` with an :class:`EkTrustStore`).
Node side: :mod:`attest.tpm2.node` (``TpmNode``) and :mod:`attest.tpm2.agent`
(``collect_evidence``), imported explicitly so the broker never loads the TSS.
"""

from attest.tpm2.enrolment import (
    EkTrustStore,
    EnrolledAk,
    EnrolmentChallenge,
    EnrolmentRefused,
    PendingEnrolment,
    begin_enrolment,
    complete_enrolment,
)
from attest.tpm2.evidence import Tpm2Evidence
from attest.tpm2.quote import QuoteCheck, check_quote
from attest.tpm2.verifier import Tpm2Verifier

__all__ = [
    "EkTrustStore",
    "EnrolledAk",
    "EnrolmentChallenge",
    "EnrolmentRefused",
    "PendingEnrolment",
    "QuoteCheck",
    "Tpm2Evidence",
    "Tpm2Verifier",
    "begin_enrolment",
    "check_quote",
    "complete_enrolment",
]
