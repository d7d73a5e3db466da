"""TDX and NVIDIA GPU evidence verification against the raw signature checks inside them.

Both verifiers run on real vectors (shared/vectors, PROVENANCE.md): the trustee v4 TDX quote
with the full 2023 PCS collateral (quote, QE report, PCK chain, both CRLs, TCB Info, QE
Identity, TCB Signing chain, TCB level matching), and the nvtrust H100 report with its
5-certificate chain and the NVIDIA RIMs (loaded and XMLDSig-verified once, as the broker
does; the per-report cost compares 33 golden measurements).

"raw" is the sum of the bare ``cryptography`` ECDSA verifications that one verification
contains, each over the same bytes: for TDX nine P-256 checks (quote, QE report, PCK <- CA,
CA <- root, PCK CRL, root CRL, TCB Info, QE Identity, TCB Signing <- root); for NVIDIA five
P-384 checks (SPDM response, four certificate links). The ratio is what parsing, path
validation, binding and policy-facing claims cost on top. Goals: each ratio <= 3x.
"""

from __future__ import annotations

import datetime as dt
import itertools
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding

from attest.interface import VerificationContext
from attest.nvidia import NvidiaGpuVerifier, NvidiaTrustStore, RimStore, encode_evidence
from attest.nvidia import parse_report as parse_spdm
from attest.tdx import TdxCollateral, TdxVerifier, parse_quote

VECTORS = Path(__file__).resolve().parents[2] / "shared" / "vectors"
if not VECTORS.is_dir():
    VECTORS = Path("/work/shared/vectors")


def _paired_us(full: Callable[[], object], raw: Callable[[], object], iterations: int,
               repeats: int = 7) -> tuple[float, float, float]:
    """(full us, raw us, median of per-round ratios): each round times both sides back to
    back, alternating which goes first, so load from elsewhere hits both alike."""
    full()
    raw()

    def per_call(fn: Callable[[], object]) -> float:
        start = time.perf_counter()
        for _ in range(iterations):
            fn()
        return (time.perf_counter() - start) / iterations * 1e6

    fulls, raws, ratios = [], [], []
    for i in range(repeats):
        if i % 2:
            r, f = per_call(raw), per_call(full)
        else:
            f, r = per_call(full), per_call(raw)
        fulls.append(f)
        raws.append(r)
        ratios.append(f / r)
    return statistics.median(fulls), statistics.median(raws), statistics.median(ratios)


def _goal(name: str, value: float, target: float) -> None:
    met = value <= target
    print(f"goal {name}: {value:.2f}x (target <= {target:g}x) {'met' if met else 'missed'}")


def _raw_ecdsa(key: ec.EllipticCurvePublicKey, rs: bytes, message: bytes,
               digest: hashes.HashAlgorithm) -> Callable[[], None]:
    half = len(rs) // 2
    der = encode_dss_signature(int.from_bytes(rs[:half], "big"),
                               int.from_bytes(rs[half:], "big"))
    return lambda: key.verify(der, message, ec.ECDSA(digest))


def _cert_link(cert: x509.Certificate, issuer: x509.Certificate) -> Callable[[], None]:
    key = issuer.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    digest = cert.signature_hash_algorithm
    assert digest is not None
    return lambda: key.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(digest))


def _crl_check(crl: x509.CertificateRevocationList,
               issuer: x509.Certificate) -> Callable[[], None]:
    key = issuer.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    return lambda: key.verify(crl.signature, crl.tbs_certlist_bytes, ec.ECDSA(hashes.SHA256()))


def tdx(quick: bool) -> float:
    gotdx = VECTORS / "tdx" / "go-tdx-guest"
    data = (VECTORS / "tdx" / "trustee" / "tdx_quote_4.dat").read_bytes()
    collateral = TdxCollateral.load(
        tcb_info=(gotdx / "sample_tcbInfo_response").read_bytes(),
        qe_identity=(gotdx / "sample_qeIdentity_response").read_bytes(),
        signing_chain_pem=(gotdx / "tcbInfoIssuerChain.pem").read_bytes(),
        pck_crl_der=(gotdx / "pckcrl").read_bytes(),
        root_crl_der=(gotdx / "rootcrl.der").read_bytes())
    quote = parse_quote(data)
    context = VerificationContext(
        expected_report_data=quote.body.report_data,
        reference={"now": dt.datetime(2023, 7, 1, tzinfo=dt.UTC), "tdx_collateral": collateral})
    verifier = TdxVerifier()
    result = verifier.verify(data, context)
    assert result.ok and result.claims["tdx.tcb.status"] == "UpToDate", result.failures

    pck, ca, root = x509.load_pem_x509_certificates(quote.pck_chain_pem)[:3]
    att_key = ec.EllipticCurvePublicKey.from_encoded_point(
        ec.SECP256R1(), b"\x04" + quote.attestation_key)
    pck_key = pck.public_key()
    signer = collateral.signing_chain[0]
    signer_key = signer.public_key()
    assert isinstance(pck_key, ec.EllipticCurvePublicKey)
    assert isinstance(signer_key, ec.EllipticCurvePublicKey)
    assert collateral.pck_crl is not None and collateral.root_crl is not None
    sha256 = hashes.SHA256()
    checks = [
        _raw_ecdsa(att_key, quote.signature, quote.signed_bytes, sha256),
        _raw_ecdsa(pck_key, quote.qe_report_signature, quote.qe_report.raw, sha256),
        _cert_link(pck, ca), _cert_link(ca, root),
        _crl_check(collateral.pck_crl, ca), _crl_check(collateral.root_crl, root),
        _raw_ecdsa(signer_key, collateral.tcb_info.signature,
                   collateral.tcb_info.signed_bytes, sha256),
        _raw_ecdsa(signer_key, collateral.qe_identity.signature,  # type: ignore[union-attr]
                   collateral.qe_identity.signed_bytes, sha256),  # type: ignore[union-attr]
        _cert_link(signer, root),
    ]

    def raw() -> None:
        for check in checks:
            check()

    n = 20 if quick else 100
    full, bare, ratio = _paired_us(lambda: verifier.verify(data, context), raw, n)
    print("TDX quote verification (trustee v4 quote, full PCS collateral, per quote):")
    print(f"  TdxVerifier.verify (everything)      {full:9.1f} us")
    print(f"  raw ECDSA P-256 x{len(checks)} it contains       {bare:9.1f} us  "
          f"(verify/raw {ratio:.2f}x, median of paired rounds)")
    print(f"  everything else                      {full - bare:9.1f} us")
    return ratio


def nvidia(quick: bool) -> float:
    base = VECTORS / "nvidia" / "nvtrust"
    report = bytes.fromhex((base / "hopperAttestationReport.txt").read_text().strip())
    chain = x509.load_pem_x509_certificates((base / "hopperCertChain.txt").read_bytes())
    evidence = encode_evidence(report, [c.public_bytes(Encoding.DER) for c in chain],
                               {"cc_mode": "on", "driver_version": "550.90.07"})
    at = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
    store = NvidiaTrustStore.bundled()
    start = time.perf_counter()
    rims = RimStore.load(driver=[(base / "Driver_RIM_test_no_gpu.swidtag").read_bytes()],
                         vbios=[(base / "1010_0200_882_96005E0001_PROD.swidtag").read_bytes()],
                         roots=store.rim_roots, at=at, pinned=True)
    load_ms = (time.perf_counter() - start) * 1e3
    parsed = parse_spdm(report)
    context = VerificationContext(expected_report_data=parsed.request_nonce,
                                  reference={"now": at, "nvidia_rims": rims})
    verifier = NvidiaGpuVerifier()
    result = verifier.verify(evidence, context)
    failing = {f.id for f in result.failures}
    # the published RIMs are for other firmware: everything else must verify
    assert failing <= {"nvidia.rim.version", "nvidia.measurements"}, result.failures
    assert result.claims["nvidia.measurements.compared"] == 33

    leaf_key = chain[0].public_key()
    assert isinstance(leaf_key, ec.EllipticCurvePublicKey)
    checks = [_raw_ecdsa(leaf_key, parsed.signature, parsed.signed_bytes, hashes.SHA384())]
    checks += [_cert_link(cert, issuer) for cert, issuer in itertools.pairwise(chain)]

    def raw() -> None:
        for check in checks:
            check()

    n = 20 if quick else 100
    full, bare, ratio = _paired_us(lambda: verifier.verify(evidence, context), raw, n)
    print("NVIDIA H100 SPDM evidence verification (nvtrust report, per GPU):")
    print(f"  NvidiaGpuVerifier.verify (everything) {full:9.1f} us")
    print(f"  raw ECDSA P-384 x{len(checks)} it contains        {bare:9.1f} us  "
          f"(verify/raw {ratio:.2f}x, median of paired rounds)")
    print(f"  everything else                       {full - bare:9.1f} us")
    print(f"  (RIM load + XMLDSig verify, once per RIM set: {load_ms:.1f} ms)")
    return ratio


def main(quick: bool) -> None:
    tdx_ratio = tdx(quick)
    print()
    nvidia_ratio = nvidia(quick)
    print()
    _goal("tdx_verify_vs_raw_ecdsa", tdx_ratio, 3)
    _goal("nvidia_verify_vs_raw_ecdsa", nvidia_ratio, 3)


if __name__ == "__main__":
    import sys

    main(quick="--quick" in sys.argv)
