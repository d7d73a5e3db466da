"""AMD SEV-SNP evidence: report parsing, the AMD key chain, and the ``sev-snp`` verifier.

Public API::

    SnpVerifier(trust_store=None).verify(evidence, context) -> VerificationResult
    encode_evidence(report, [vcek_der, *intermediates], report_format="raw"|"azure-hcl")
    decode_evidence(data) -> SnpEvidence
    parse_report(data) -> SnpReport
    parse_hcl_report(data) -> HclReport
    AmdTrustStore.bundled() / AmdTrustStore.from_certificates(arks, intermediates)
"""

from .certs import AmdTrustStore
from .evidence import SnpEvidence, decode_evidence, encode_evidence
from .hcl import HclReport, parse_hcl_report
from .report import REPORT_SIZE, SnpReport, TcbVersion, parse_report
from .verifier import SnpVerifier

__all__ = [
    "REPORT_SIZE",
    "AmdTrustStore",
    "HclReport",
    "SnpEvidence",
    "SnpReport",
    "SnpVerifier",
    "TcbVersion",
    "decode_evidence",
    "encode_evidence",
    "parse_hcl_report",
    "parse_report",
]
