"""The ``nvidia-gpu`` evidence verifier (attest.interface.EvidenceVerifier).

Evidence: :mod:`attest.nvidia.evidence` (SPDM report, device chain, NVML facts). Checks, each
a :class:`~attest.interface.Failure` with a stable id, all run even after one fails:

=====================  ======================================================================
id                     check
=====================  ======================================================================
nvidia.chain           the leaf ("GSP FMC LF") chains to a pinned NVIDIA Device Identity CA
                       at ``now`` through the certificates sent (RFC 5280 path validation)
nvidia.spdm.signature  ECDSA P-384/SHA-384 by the leaf over request || response (less the
                       signature)
nvidia.fwid            the leaf's DICE TcbInfo FWID equals the FWID in the opaque data
nvidia.nonce           the request nonce equals the session binding (the response nonce is
                       the GPU's own random value and is not compared)
nvidia.rim.missing     the broker holds no driver / VBIOS RIM for the report's versions
nvidia.rim.signature   a selected RIM's XMLDSig signature did not verify (checked at load)
nvidia.rim.chain       a selected RIM's signing chain does not reach a pinned RIM root
nvidia.rim.version     the pinned RIM's version differs from the report's
nvidia.measurements    one failure per active golden measurement that the report does not
                       match (named by index, RIM and kind), or an index active in both RIMs
nvidia.facts           the NVML driver version differs from the signed one
nvidia.architecture    the NVML architecture differs from the one the leaf certificate names
=====================  ======================================================================

Context: ``reference["nvidia_trust_store"]`` (:class:`NvidiaTrustStore`, default: the bundled
NVIDIA roots), ``reference["nvidia_rims"]`` (:class:`RimStore`), ``reference["now"]``; or,
from a broker's YAML, root and RIM file paths (:mod:`attest.tee_reference`).

Claims: ``evidence.kind`` "nvidia-gpu", ``evidence.verified``; signed: ``nvidia.architecture``
(from the leaf certificate: GH100 -> "Hopper", GB100/GB200 -> "Blackwell"),
``nvidia.driver_version``, ``nvidia.vbios_version``, ``nvidia.fwid``, ``nvidia.board_id``,
``nvidia.chip_sku``, ``nvidia.project``, ``nvidia.project_sku``, ``nvidia.nonce``,
``nvidia.measurements.count``, ``nvidia.measurements.matched`` (both RIMs trusted and every
active golden value matched), ``nvidia.measurements.compared``,
``nvidia.measurements.mismatched`` (list of RIM indices), ``nvidia.rim.driver``,
``nvidia.rim.vbios`` (RIM versions used, "" when none); from NVML (unsigned, see the
container): ``nvidia.cc_mode`` ("unknown" when absent), ``nvidia.cc_ready``,
``nvidia.compute_mode``, ``nvidia.mig_mode``, ``nvidia.other_processes``, ``nvidia.ecc``,
``nvidia.uuid``.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from attest.interface import (
    Failure,
    MalformedEvidence,
    VerificationContext,
    VerificationResult,
)
from attest.tee_reference import nvidia_trust

from .certs import NvidiaTrustStore, common_name, leaf_fwid, verify_device_chain
from .evidence import decode_evidence
from .rim import Rim, RimStore
from .spdm import SpdmReport, parse_report

__all__ = ["NvidiaGpuVerifier", "verify_spdm_signature"]

_ARCHITECTURES = {"GH100": "Hopper", "GB100": "Blackwell", "GB200": "Blackwell",
                  "GB202": "Blackwell"}
_BUNDLED: NvidiaTrustStore | None = None


def _bundled() -> NvidiaTrustStore:
    global _BUNDLED
    if _BUNDLED is None:
        _BUNDLED = NvidiaTrustStore.bundled()
    return _BUNDLED


def verify_spdm_signature(report: SpdmReport, leaf: x509.Certificate) -> bool:
    key = leaf.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp384r1":
        return False
    r = int.from_bytes(report.signature[:48], "big")
    s = int.from_bytes(report.signature[48:], "big")
    try:
        key.verify(encode_dss_signature(r, s), report.signed_bytes, ec.ECDSA(hashes.SHA384()))
    except (InvalidSignature, ValueError):
        return False
    return True


def _load_certificates(certs: tuple[bytes, ...]) -> list[x509.Certificate]:
    out = []
    for i, der in enumerate(certs):
        try:
            cert = x509.load_der_x509_certificate(der)
            _ = (cert.subject, cert.issuer, cert.extensions, cert.public_key())
        except Exception as exc:  # cryptography raises many types for bad DER
            raise MalformedEvidence(f"certificate {i} is not a valid X.509 certificate") \
                from exc
        out.append(cert)
    return out


def _architecture(leaf: x509.Certificate) -> str:
    chip = common_name(leaf).split(" ", 1)[0]
    return _ARCHITECTURES.get(chip, "unknown")


class NvidiaGpuVerifier:
    """Verifies ``nvidia-gpu`` evidence for one GPU."""

    kind = "nvidia-gpu"

    def __init__(self, trust_store: NvidiaTrustStore | None = None,
                 rims: RimStore | None = None) -> None:
        self._trust_store = trust_store
        self._rims = rims

    def verify(self, evidence: bytes, context: VerificationContext) -> VerificationResult:
        container = decode_evidence(evidence)
        report = parse_report(container.report)
        chain = _load_certificates(container.certificates)
        leaf = chain[0]
        configured_store, configured_rims = nvidia_trust(context.reference)
        store = configured_store or self._trust_store or _bundled()
        if not isinstance(store, NvidiaTrustStore):
            raise TypeError("reference['nvidia_trust_store'] must be an NvidiaTrustStore")
        rims = configured_rims or self._rims
        if rims is not None and not isinstance(rims, RimStore):
            raise TypeError("reference['nvidia_rims'] must be a RimStore")
        now = context.reference.get("now") or dt.datetime.now(dt.UTC)
        if not isinstance(now, dt.datetime) or now.tzinfo is None:
            raise TypeError("reference['now'] must be a timezone-aware datetime")

        failures: list[Failure] = []
        problem = verify_device_chain(chain, store.device_roots, now)
        if problem:
            failures.append(Failure("nvidia.chain", problem))
        if not verify_spdm_signature(report, leaf):
            failures.append(Failure("nvidia.spdm.signature",
                                    f"SPDM measurements signature does not verify under "
                                    f"{common_name(leaf)!r}"))
        fwid = leaf_fwid(leaf)
        if fwid is None:
            failures.append(Failure("nvidia.fwid",
                                    "FwId oid not found in the NVIDIA signing certificate"))
        elif fwid != report.fwid:
            failures.append(Failure("nvidia.fwid", "the signing certificate's FWID does not "
                                                   "match the FWID in the report"))
        expected = context.expected_report_data
        if len(expected) != 32:
            raise ValueError("expected_report_data for nvidia-gpu must be 32 bytes")
        if report.request_nonce != expected:
            failures.append(Failure("nvidia.nonce", "the SPDM request nonce is not bound to "
                                                    "this session"))
        claims = self._signed_claims(report, leaf)
        failures += self._compare(report, rims, claims)
        failures += self._check_facts(container.facts, report, claims)
        claims["evidence.verified"] = not any(f.severity == "error" for f in failures)
        return VerificationResult(kind=self.kind, claims=claims, failures=tuple(failures))

    @staticmethod
    def _signed_claims(report: SpdmReport, leaf: x509.Certificate) -> dict[str, Any]:
        return {
            "evidence.kind": "nvidia-gpu",
            "nvidia.architecture": _architecture(leaf),
            "nvidia.driver_version": report.driver_version,
            "nvidia.vbios_version": report.vbios_version,
            "nvidia.fwid": report.fwid.hex(),
            "nvidia.board_id": report.board_id,
            "nvidia.chip_sku": report.chip_sku,
            "nvidia.project": report.project,
            "nvidia.project_sku": report.project_sku,
            "nvidia.nonce": report.request_nonce.hex(),
            "nvidia.measurements.count": len(report.measurements),
        }

    @staticmethod
    def _compare(report: SpdmReport, rims: RimStore | None,
                 claims: dict[str, Any]) -> list[Failure]:
        failures: list[Failure] = []
        selected: dict[str, Rim] = {}
        if rims is None:
            failures.append(Failure("nvidia.rim.missing", "no RIMs are configured"))
        else:
            driver, vbios = rims.select(report.driver_version, report.vbios_version)
            for kind, rim, version in (("driver", driver, report.driver_version),
                                       ("vbios", vbios, report.vbios_version)):
                if rim is None:
                    failures.append(Failure("nvidia.rim.missing",
                                            f"no {kind} RIM for version {version}"))
                    continue
                for suffix, message in rim.problems:
                    failures.append(Failure(f"nvidia.rim.{suffix}", f"{kind} RIM: {message}"))
                if rim.version.lower() != version.lower():
                    failures.append(Failure("nvidia.rim.version",
                                            f"{kind} RIM is for {rim.version}, the report "
                                            f"says {version}"))
                if rim.trusted:
                    selected[kind] = rim
        claims["nvidia.rim.driver"] = selected["driver"].version if "driver" in selected else ""
        claims["nvidia.rim.vbios"] = selected["vbios"].version if "vbios" in selected else ""
        mismatched: list[int] = []
        compared = 0
        driver_golden = selected["driver"].golden if "driver" in selected else {}
        vbios_golden = selected["vbios"].golden if "vbios" in selected else {}
        for index in sorted(set(driver_golden) & set(vbios_golden)):
            failures.append(Failure("nvidia.measurements",
                                    f"measurement {index} is active in both the driver and "
                                    "the VBIOS RIM"))
            mismatched.append(index)
        for kind, golden in (("driver", driver_golden), ("vbios", vbios_golden)):
            for index, gold in sorted(golden.items()):
                if index in mismatched:
                    continue
                compared += 1
                runtime = report.measurements.get(index + 1)
                if runtime is None:
                    reason = "is missing from the report"
                elif runtime in gold.alternatives:
                    continue
                else:
                    reason = (f"is {runtime.hex()[:16]}..., not one of the "
                              f"{len(gold.alternatives)} golden value(s)")
                mismatched.append(index)
                failures.append(Failure("nvidia.measurements",
                                        f"measurement {index} ({gold.name}, {kind} RIM "
                                        f"{selected[kind].version}) {reason}"))
        claims["nvidia.measurements.compared"] = compared
        claims["nvidia.measurements.mismatched"] = sorted(mismatched)
        claims["nvidia.measurements.matched"] = (len(selected) == 2 and not mismatched
                                                 and compared > 0)
        return failures

    @staticmethod
    def _check_facts(facts: dict[str, Any] | Any, report: SpdmReport,
                     claims: dict[str, Any]) -> list[Failure]:
        def get(name: str, kind: type, default: Any) -> Any:
            value = facts.get(name, default)
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise MalformedEvidence(f"NVML fact {name!r} is not a {kind.__name__}")
            return value

        claims["nvidia.cc_mode"] = get("cc_mode", str, "unknown")
        claims["nvidia.cc_ready"] = get("cc_ready", bool, False)
        claims["nvidia.compute_mode"] = get("compute_mode", str, "unknown")
        claims["nvidia.mig_mode"] = get("mig_mode", bool, False)
        claims["nvidia.other_processes"] = get("other_processes", int, -1)
        claims["nvidia.ecc"] = get("ecc", bool, False)
        claims["nvidia.uuid"] = get("uuid", str, "")
        out = []
        driver = get("driver_version", str, "")
        if driver and driver != report.driver_version:
            out.append(Failure("nvidia.facts", f"NVML driver version {driver} differs from "
                                               f"the signed {report.driver_version}"))
        arch = get("architecture", str, "")
        if arch and arch != claims["nvidia.architecture"]:
            out.append(Failure("nvidia.architecture",
                               f"NVML says {arch}, the device certificate is for "
                               f"{claims['nvidia.architecture']}"))
        return out
