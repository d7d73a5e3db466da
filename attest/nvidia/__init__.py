"""NVIDIA GPU confidential-computing evidence: SPDM measurements, the device identity chain,
RIMs (signed golden measurements) and the ``nvidia-gpu`` verifier.

Public API::

    NvidiaGpuVerifier(trust_store=None, rims=None).verify(evidence, context)
    encode_evidence(report, [leaf_der, ..., root_der], facts) / decode_evidence(data)
    parse_report(data) -> SpdmReport
    RimStore.load(driver=[...], vbios=[...], roots=..., at=...) / load_rim(...)
    NvidiaTrustStore.bundled()
"""

from .certs import NvidiaTrustStore
from .evidence import GpuEvidence, decode_evidence, encode_evidence
from .rim import GoldenMeasurement, Rim, RimError, RimStore, load_rim
from .spdm import SpdmReport, parse_report
from .verifier import NvidiaGpuVerifier

__all__ = [
    "GoldenMeasurement",
    "GpuEvidence",
    "NvidiaGpuVerifier",
    "NvidiaTrustStore",
    "Rim",
    "RimError",
    "RimStore",
    "SpdmReport",
    "decode_evidence",
    "encode_evidence",
    "load_rim",
    "parse_report",
]
