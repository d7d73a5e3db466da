"""Confidential-computing evidence: SEV-SNP, TDX, NVIDIA, and the composite container.

Every harness drives the parser that the broker's Attest reaches for that kind, most through
the verifier itself (``verify(payload, context)``), so certificate tables, chains and
signature checks run on mutated bytes too. Expected error for evidence: ``MalformedEvidence``
(anything that parses but is wrong must come back as a ``Failure``); for PCS collateral
``CollateralError``; for RIMs ``RimError``.

Seeds: the real reports, quotes, certificate chains, collateral and RIMs in
../shared/vectors (snp, azure-*-vtpm, tdx, nvidia), in the project's own containers.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from fuzz.base import Harness, vectors_dir
from fuzz.mutators import json_mutator

__all__ = ["HARNESSES"]

VALID_DAY = dt.datetime(2025, 6, 1, tzinfo=dt.UTC)  # every SNP vector certificate valid
TDX_DAY = dt.datetime(2026, 2, 3, tzinfo=dt.UTC)
RIM_DAY = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)


def _der_chain(pem: bytes) -> list[bytes]:
    return [c.public_bytes(Encoding.DER) for c in x509.load_pem_x509_certificates(pem)]


def _touch(obj: object) -> None:
    """Read every property of a parsed object: lazy decoding must fail the same way."""
    for name, value in vars(type(obj)).items():
        if isinstance(value, property):
            getattr(obj, name)


def _read(rel: str) -> bytes:
    return (vectors_dir() / rel).read_bytes()


# --- SEV-SNP ---------------------------------------------------------------------------------

def _snp_report(data: bytes) -> None:
    from attest.snp import parse_report

    if data:
        _touch(parse_report(data[1:], turin=bool(data[0] & 1)))


def _snp_raw_reports() -> Iterator[tuple[str, bytes]]:
    yield "trustee-vcek", _read("snp/trustee/test-report.bin")
    yield "trustee-vlek", _read("snp/trustee/test-vlek-report.bin")
    yield "virtee-milan", bytes.fromhex(_read("snp/virtee-sev/report_milan.hex").decode().strip())
    raw = _read("snp/go-sev-guest/attestation.bin")
    yield "go-sev-guest", raw[:1184]


def _snp_report_seeds() -> Iterator[tuple[str, bytes]]:
    for name, report in _snp_raw_reports():
        yield name, b"\x00" + report
    yield "turin-hint", b"\x01" + _read("snp/trustee/test-report.bin")


def _snp_hcl(data: bytes) -> None:
    from attest.snp import parse_hcl_report

    if data:
        _touch(parse_hcl_report(data[1:], report_type=4 if data[0] & 1 else 2))


def _snp_hcl_seeds() -> Iterator[tuple[str, bytes]]:
    yield "azure-snp", b"\x00" + _read("azure-snp-vtpm/hcl-report.bin")
    yield "azure-tdx", b"\x01" + _read("azure-tdx-vtpm/hcl-report.bin")


def _snp_evidence(data: bytes) -> None:
    from attest.interface import VerificationContext
    from attest.snp import SnpVerifier

    SnpVerifier().verify(data, VerificationContext(expected_report_data=bytes(64),
                                                   reference={"now": VALID_DAY}))


def _snp_evidence_seeds() -> Iterator[tuple[str, bytes]]:
    from attest.snp import encode_evidence

    yield "trustee-vcek", encode_evidence(_read("snp/trustee/test-report.bin"),
                                          [_read("snp/trustee/test-vcek.der")])
    yield "trustee-vlek", encode_evidence(
        _read("snp/trustee/test-vlek-report.bin"),
        [_read("snp/trustee/test-vlek.der"),
         *_der_chain(_read("snp/trustee/genoa_ask_ark_asvk.pem"))[:1]])
    yield "virtee-milan", encode_evidence(
        bytes.fromhex(_read("snp/virtee-sev/report_milan.hex").decode().strip()),
        [_read("snp/virtee-sev/vcek_milan.der"),
         *_der_chain(_read("snp/go-sev-guest/ask_ark_milan.pem"))[:1]])
    yield "azure-hcl", encode_evidence(_read("azure-snp-vtpm/hcl-report.bin"),
                                       _der_chain(_read("azure-snp-vtpm/vcek.pem")),
                                       report_format="azure-hcl")


# --- TDX -------------------------------------------------------------------------------------

_QUOTES = {
    "trustee-v4": "tdx/trustee/tdx_quote_4.dat",
    "trustee-v5": "tdx/trustee/tdx_quote_5.dat",
    "trustee-6": "tdx/trustee/tdx_quote_6.dat",
    "gotdx-spr-e4": "tdx/go-tdx-guest/tdx_prod_quote_SPR_E4.dat",
    "gotdx-v5": "tdx/go-tdx-guest/quote_v5_sample.dat",
    "azure": "azure-tdx-vtpm/td-quote.bin",
}


def _tdx_quote(data: bytes) -> None:
    from attest.tdx import parse_quote

    _touch(parse_quote(data))


def _tdx_quote_seeds() -> Iterator[tuple[str, bytes]]:
    for name, rel in _QUOTES.items():
        yield name, _read(rel)


def _tdx_evidence(data: bytes) -> None:
    from attest.interface import VerificationContext
    from attest.tdx import TdxVerifier

    TdxVerifier().verify(data, VerificationContext(expected_report_data=bytes(64),
                                                   reference={"now": TDX_DAY}))


def _tdx_evidence_seeds() -> Iterator[tuple[str, bytes]]:
    from attest.tdx.evidence import encode_azure_evidence

    for name in ("trustee-v4", "trustee-v5", "gotdx-spr-e4"):
        yield name, _read(_QUOTES[name])
    yield "azure-container", encode_azure_evidence(_read(_QUOTES["azure"]),
                                                   _read("azure-tdx-vtpm/hcl-report.bin"))


def _tdx_collateral(data: bytes) -> None:
    from attest.tdx.collateral import EnclaveIdentity, TcbInfo

    if data:
        (EnclaveIdentity if data[0] & 1 else TcbInfo).parse(data[1:])


def _tdx_collateral_seeds() -> Iterator[tuple[str, bytes]]:
    yield "gotdx-tcbinfo", b"\x00" + _read("tdx/go-tdx-guest/sample_tcbInfo_response")
    yield "gotdx-tcbinfo-v5", b"\x00" + _read("tdx/go-tdx-guest/sample_tcbinfo_response_v5")
    yield "trustee-tcbinfo", b"\x00" + _read("tdx/trustee/tcbInfo.json")
    yield "gotdx-qe", b"\x01" + _read("tdx/go-tdx-guest/sample_qeIdentity_response")
    yield "trustee-qe", b"\x01" + _read("tdx/trustee/enclaveIdentity.json")


# --- NVIDIA ----------------------------------------------------------------------------------

def _nv_report(name: str) -> bytes:
    rel = {"nvtrust": "nvidia/nvtrust/hopperAttestationReport.txt",
           "coco": "nvidia/trustee/hopper_coco_report1.txt"}[name]
    return bytes.fromhex(_read(rel).decode().strip())


def _nv_certs(name: str) -> list[bytes]:
    rel = {"nvtrust": "nvidia/nvtrust/hopperCertChain.txt",
           "coco": "nvidia/trustee/hopper_coco_certs1.txt"}[name]
    return _der_chain(_read(rel))


def _nvidia_spdm(data: bytes) -> None:
    from attest.nvidia import parse_report

    _touch(parse_report(data))


def _nvidia_spdm_seeds() -> Iterator[tuple[str, bytes]]:
    for name in ("nvtrust", "coco"):
        yield name, _nv_report(name)


_RIM_ROOTS: list = []


def _nvidia_rim(data: bytes) -> None:
    from attest.nvidia import NvidiaTrustStore, load_rim

    if not _RIM_ROOTS:
        _RIM_ROOTS.extend(NvidiaTrustStore.bundled().rim_roots)
    load_rim(data, _RIM_ROOTS, RIM_DAY)


def _nvidia_rim_seeds() -> Iterator[tuple[str, bytes]]:
    for rel in ("nvidia/nvtrust/Driver_RIM_test_no_gpu.swidtag",
                "nvidia/nvtrust/1010_0200_882_96005E0001_test_no_gpu.swidtag"):
        yield rel.rsplit("/", 1)[1].split(".")[0], _read(rel)


def _nvidia_evidence(data: bytes) -> None:
    from attest.interface import VerificationContext
    from attest.nvidia import NvidiaGpuVerifier

    NvidiaGpuVerifier().verify(data, VerificationContext(expected_report_data=bytes(32),
                                                         reference={"now": RIM_DAY}))


def _nvidia_evidence_seeds() -> Iterator[tuple[str, bytes]]:
    from attest.nvidia import encode_evidence

    yield "nvtrust", encode_evidence(_nv_report("nvtrust"), _nv_certs("nvtrust"))
    yield "coco-facts", encode_evidence(_nv_report("coco"), _nv_certs("coco"),
                                        {"cc_mode": "on", "driver": "550.54"})


# --- composite -------------------------------------------------------------------------------

def _composite(data: bytes) -> None:
    from attest.composite import CompositeVerifier
    from attest.interface import VerificationContext

    CompositeVerifier().verify(data, VerificationContext(expected_report_data=bytes(32),
                                                         reference={"now": TDX_DAY}))


def _composite_seeds() -> Iterator[tuple[str, bytes]]:
    from attest.composite import CompositeEvidence, encode_composite
    from attest.nvidia import encode_evidence as nv
    from attest.snp import encode_evidence as snp

    gpu = nv(_nv_report("nvtrust"), _nv_certs("nvtrust"))
    yield "tdx-gpu", encode_composite(CompositeEvidence("tdx", _read(_QUOTES["trustee-v4"]),
                                                        (gpu,)))
    yield "snp-2gpu", encode_composite(CompositeEvidence(
        "sev-snp", snp(_read("snp/trustee/test-report.bin"), [_read("snp/trustee/test-vcek.der")]),
        (gpu, gpu)))


def _harnesses() -> list[Harness]:
    from attest.interface import MalformedEvidence
    from attest.nvidia.rim import RimError
    from attest.tdx.collateral import CollateralError

    m = (MalformedEvidence,)
    return [
        Harness("snp_report", "attest.snp.parse_report (1184-byte report, TCB layouts)",
                _snp_report, m, _snp_report_seeds, max_len=2048),
        Harness("snp_hcl", "attest.snp.parse_hcl_report (Azure HCL report + var data JSON)",
                _snp_hcl, m, _snp_hcl_seeds, max_len=24576),
        Harness("snp_evidence", "attest.snp.SnpVerifier.verify (container, certificate "
                "table, chain, signature)", _snp_evidence, m, _snp_evidence_seeds,
                max_len=24576),
        Harness("tdx_quote", "attest.tdx.parse_quote (v4/v5 DCAP quote, QE cert data)",
                _tdx_quote, m, _tdx_quote_seeds, max_len=16384),
        Harness("tdx_evidence", "attest.tdx.TdxVerifier.verify (quote or Azure container)",
                _tdx_evidence, m, _tdx_evidence_seeds, max_len=24576),
        Harness("tdx_collateral", "attest.tdx.collateral TcbInfo.parse / EnclaveIdentity.parse",
                _tdx_collateral, (CollateralError,), _tdx_collateral_seeds, max_len=16384,
                mutator=json_mutator(prefix=1)),
        Harness("nvidia_spdm", "attest.nvidia.parse_report (SPDM GET_MEASUREMENTS)",
                _nvidia_spdm, m, _nvidia_spdm_seeds, max_len=16384),
        Harness("nvidia_rim", "attest.nvidia.load_rim (SWID XML + XMLDSig)", _nvidia_rim,
                (RimError,), _nvidia_rim_seeds, max_len=65536),
        Harness("nvidia_evidence", "attest.nvidia.NvidiaGpuVerifier.verify (container, "
                "chain, SPDM signature, facts)", _nvidia_evidence, m, _nvidia_evidence_seeds,
                max_len=32768),
        Harness("composite", "attest.composite.CompositeVerifier.verify", _composite, m,
                _composite_seeds, max_len=65536),
    ]


HARNESSES = _harnesses
