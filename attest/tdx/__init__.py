"""Intel TDX evidence: DCAP quote v4/v5 parsing, PCS collateral and the ``tdx`` verifier.

Public API::

    TdxVerifier(trust_store=None, collateral=None).verify(quote, context) -> VerificationResult
    parse_quote(data) -> TdxQuote
    TdxCollateral.load(tcb_info=..., qe_identity=..., signing_chain_pem=..., pck_crl_der=...,
                       root_crl_der=...)
    IntelTrustStore.bundled()
"""

from .collateral import CollateralError, EnclaveIdentity, TcbInfo, TdxCollateral
from .evidence import TdxEvidence, decode_evidence, encode_azure_evidence
from .pck import PckExtensions, pck_extensions
from .quote import TdReportBody, TdxQuote, parse_quote
from .verifier import IntelTrustStore, TdxVerifier

__all__ = [
    "CollateralError",
    "EnclaveIdentity",
    "IntelTrustStore",
    "PckExtensions",
    "TcbInfo",
    "TdReportBody",
    "TdxCollateral",
    "TdxEvidence",
    "TdxQuote",
    "TdxVerifier",
    "decode_evidence",
    "encode_azure_evidence",
    "parse_quote",
    "pck_extensions",
]
