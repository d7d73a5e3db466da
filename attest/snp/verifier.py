"""The ``sev-snp`` evidence verifier (attest.interface.EvidenceVerifier).

Checks, each reported as a :class:`~attest.interface.Failure` with a stable id, all run even
after one fails:

=================  ===========================================================================
id                 check
=================  ===========================================================================
snp.signature      ECDSA P-384/SHA-384 over report bytes 0x000..0x29F by the VCEK/VLEK key;
                   signature_algo must be 1 and the unused signature bytes zero
snp.signing_key    key_info bits 4:2 name the certificate kind sent (VCEK vs VLEK)
snp.chain          VCEK <- ASK <- ARK, or VLEK <- ASVK <- ARK, RSA-PSS SHA-384 salt 48; the ARK
                   is self-signed and pinned (``AmdTrustStore``); never taken from the evidence
snp.cert_validity  every certificate in the chain is valid at ``now``
snp.tcb_binding    the leaf's blSPL/teeSPL/snpSPL/ucodeSPL (+fmcSPL on Turin) equal reported_tcb
snp.chip_id        VCEK hwID equals chip_id (Turin: the first 8 bytes, the rest zero)
snp.product        the CPUID family in a v3+ report matches the product of the certificate;
                   with ``reference["snp_expected_stepping"]``, the VCEK productName stepping
                   (``Milan-B0`` -> 0) equals it
snp.hcl.var_data   Azure: hash(HCL variable data) equals report_data[0:hash length]
snp.report_data    the session binding: report_data (Azure: the HCL ``user-data``) equals
                   ``context.expected_report_data`` (64 bytes), or it followed by zeros (32)
=================  ===========================================================================

Unparsable evidence raises :class:`~attest.interface.MalformedEvidence`.

Context: ``context.reference["snp_trust_store"]`` (an :class:`AmdTrustStore`; default: the
bundled AMD roots) and ``context.reference["now"]`` (an aware ``datetime``; default: now).

Claims (flat names, values JSON-like; hex strings are lower case):
``evidence.kind`` = "sev-snp", ``evidence.verified`` (no error failure), ``snp.version``,
``snp.guest_svn``, ``snp.policy`` (int), ``snp.policy_abi_major``/``_minor``, ``snp.debug``
(policy bit 19), ``snp.migrate_ma`` (policy bit 18), ``snp.smt_allowed`` (bit 16),
``snp.single_socket`` (bit 20), ``snp.migration_agent`` (report_id_ma is not all FF),
``snp.smt_enabled``/``snp.tsme_enabled`` (platform_info), ``snp.platform_info``, ``snp.vmpl``,
``snp.measurement``, ``snp.report_data``, ``snp.host_data``, ``snp.id_key_digest``,
``snp.author_key_digest``, ``snp.author_key_en``, ``snp.family_id``, ``snp.image_id``,
``snp.report_id``, ``snp.report_id_ma``, ``snp.chip_id``, ``snp.mask_chip_key``,
``snp.signing_key`` ("vcek"|"vlek"|...), ``snp.product`` ("Milan"|"Genoa"|"Turin"|""),
``snp.product_name`` (the certificate's productName, e.g. "Milan-B0"), ``snp.stepping`` (-1
when the certificate names none),
``snp.firmware.current``/``.committed`` ("major.minor.build"),
``snp.tcb.{current,reported,committed,launch}.{raw,bl,tee,snp,ucode[,fmc]}``,
``snp.cpuid.{family,model,stepping}`` (v3+), and for Azure ``snp.hcl.user_data``,
``snp.hcl.vm.{secure_boot,tpm_enabled,console_enabled}``, ``snp.hcl.ak_pub_n`` (the vTPM AK
modulus, base64url from the JWK, for the vTPM quote check).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
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

from .certs import (
    AmdTrustStore,
    cert_hwid,
    cert_product_name,
    cert_tcb,
    common_name,
    load_certificate,
    pss_signed_by,
)
from .evidence import decode_evidence
from .hcl import HclReport, parse_hcl_report
from .report import SIG_ALGO_ECDSA_P384_SHA384, SnpReport, parse_report

__all__ = ["SnpVerifier"]

_P384_ORDER = int(
    "ffffffffffffffffffffffffffffffffffffffffffffffffc7634d81f4372ddf"
    "581a0db248b0a77aecec196accc52973", 16)
_BUNDLED: AmdTrustStore | None = None


def _bundled_store() -> AmdTrustStore:
    global _BUNDLED
    if _BUNDLED is None:
        _BUNDLED = AmdTrustStore.bundled()
    return _BUNDLED


def _product_of(leaf: x509.Certificate) -> str:
    # VCEK issuer "SEV-<Gen>", VLEK issuer "SEV-VLEK-<Gen>"
    cn = common_name(leaf.issuer)
    return cn.rsplit("-", 1)[-1] if cn.startswith("SEV-") else ""


def verify_report_signature(report: SnpReport, leaf: x509.Certificate) -> str | None:
    """None if the leaf's P-384 key signed the report, else a readable reason."""
    if report.signature_algo != SIG_ALGO_ECDSA_P384_SHA384:
        return f"signature_algo is {report.signature_algo}, expected 1 (ECDSA P-384 SHA-384)"
    if not report.signature_tail_zero:
        return "signature field has non-zero bytes outside r and s"
    if not (0 < report.signature_r < _P384_ORDER and 0 < report.signature_s < _P384_ORDER):
        return "signature r or s is out of range"
    key = leaf.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp384r1":
        return f"{common_name(leaf.subject)!r} does not hold a P-384 key"
    der = encode_dss_signature(report.signature_r, report.signature_s)
    try:
        key.verify(der, report.signed_bytes, ec.ECDSA(hashes.SHA384()))
    except InvalidSignature:
        return f"report signature does not verify under {common_name(leaf.subject)!r}"
    return None


class SnpVerifier:
    """Verifies ``sev-snp`` evidence (see :mod:`attest.snp.evidence` for the container)."""

    kind = "sev-snp"

    def __init__(self, trust_store: AmdTrustStore | None = None) -> None:
        self._trust_store = trust_store

    def verify(self, evidence: bytes, context: VerificationContext) -> VerificationResult:
        container = decode_evidence(evidence)
        leaf = load_certificate(container.certificates[0], "VCEK/VLEK certificate")
        offered = [load_certificate(c, f"certificate {i + 1}")
                   for i, c in enumerate(container.certificates[1:])]
        product = _product_of(leaf)
        hcl: HclReport | None = None
        raw_report = container.report
        if container.report_format == "azure-hcl":
            hcl = parse_hcl_report(raw_report)
            raw_report = hcl.snp_report
        report = parse_report(raw_report, turin=product == "Turin")

        store = context.reference.get("snp_trust_store") or self._trust_store
        if store is None:
            store = _bundled_store()
        if not isinstance(store, AmdTrustStore):
            raise TypeError("context.reference['snp_trust_store'] must be an AmdTrustStore")
        now = context.reference.get("now") or dt.datetime.now(dt.UTC)
        if not isinstance(now, dt.datetime) or now.tzinfo is None:
            raise TypeError("context.reference['now'] must be a timezone-aware datetime")

        failures: list[Failure] = []
        problem = verify_report_signature(report, leaf)
        if problem:
            failures.append(Failure("snp.signature", problem))
        failures += self._check_signing_key(report, leaf)
        failures += self._check_chain(leaf, offered, store, now)
        failures += self._check_tcb(report, leaf, product)
        failures += self._check_chip_id(report, leaf)
        failures += self._check_product(report, product)
        product_name, stepping, stepping_failures = self._check_stepping(
            leaf, context.reference.get("snp_expected_stepping"))
        failures += stepping_failures
        if hcl is not None:
            digest = hcl.var_data_digest()
            if report.report_data[:len(digest)] != digest:
                failures.append(Failure(
                    "snp.hcl.var_data",
                    "HCL variable data digest does not match the SNP report_data"))
            bound = hcl.user_data
            what = "HCL user-data"
        else:
            bound = report.report_data
            what = "report_data"
        failures += self._check_binding(bound, context.expected_report_data, what)

        claims = self._claims(report, product, hcl)
        claims["snp.product_name"] = product_name
        claims["snp.stepping"] = -1 if stepping is None else stepping
        claims["evidence.verified"] = not any(f.severity == "error" for f in failures)
        return VerificationResult(kind=self.kind, claims=claims, failures=tuple(failures))

    @staticmethod
    def _check_signing_key(report: SnpReport, leaf: x509.Certificate) -> list[Failure]:
        cn = common_name(leaf.subject)
        expected = {"vcek": "SEV-VCEK", "vlek": "SEV-VLEK"}.get(report.signing_key)
        if expected is None:
            return [Failure("snp.signing_key",
                            f"report signing key field is {report.signing_key!r}, "
                            "not VCEK or VLEK")]
        if cn != expected:
            return [Failure("snp.signing_key",
                            f"report says it is signed by a {expected[4:]}, "
                            f"but the certificate is {cn!r}")]
        return []

    @staticmethod
    def _check_chain(leaf: x509.Certificate, offered: Iterable[x509.Certificate],
                     store: AmdTrustStore, now: dt.datetime) -> list[Failure]:
        issuer_cn = common_name(leaf.issuer)
        candidates = [c for c in offered if c.subject == leaf.issuer]
        known = store.intermediates.get(issuer_cn)
        if known is not None:
            candidates.append(known)
        if not candidates:
            return [Failure("snp.chain", f"no certificate for issuer {issuer_cn!r} "
                                         "(ASK/ASVK) was supplied or is known")]
        reasons: list[str] = []
        for inter in candidates:
            chain_problem = pss_signed_by(leaf, inter)
            ark = store.arks.get(common_name(inter.issuer))
            if chain_problem is None and ark is None:
                chain_problem = (f"{common_name(inter.issuer)!r} is not a pinned AMD root "
                                 "(ARK)")
            if chain_problem is None and ark is not None:
                chain_problem = pss_signed_by(inter, ark)
            if chain_problem is None and ark is not None:
                out: list[Failure] = []
                for cert in (leaf, inter, ark):
                    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
                        out.append(Failure(
                            "snp.cert_validity",
                            f"{common_name(cert.subject)!r} is valid "
                            f"{cert.not_valid_before_utc:%Y-%m-%d} to "
                            f"{cert.not_valid_after_utc:%Y-%m-%d}, not at {now:%Y-%m-%d}"))
                return out
            reasons.append(chain_problem or "unknown")
        return [Failure("snp.chain", "; ".join(dict.fromkeys(reasons)))]

    @staticmethod
    def _check_tcb(report: SnpReport, leaf: x509.Certificate, product: str) -> list[Failure]:
        try:
            spl = cert_tcb(leaf)
        except MalformedEvidence as exc:
            return [Failure("snp.tcb_binding", str(exc))]
        tcb = report.reported_tcb
        reported = {"bl": tcb.boot_loader, "tee": tcb.tee, "snp": tcb.snp,
                    "ucode": tcb.microcode}
        if product == "Turin":
            reported["fmc"] = tcb.fmc if tcb.fmc is not None else -1
        mismatches = []
        for name, value in reported.items():
            if name not in spl:
                mismatches.append(f"{name}SPL missing from the certificate")
            elif spl[name] != value:
                mismatches.append(f"{name}: certificate {spl[name]}, report {value}")
        if mismatches:
            return [Failure("snp.tcb_binding",
                            "reported_tcb does not match the certificate: "
                            + "; ".join(mismatches))]
        return []

    @staticmethod
    def _check_chip_id(report: SnpReport, leaf: x509.Certificate) -> list[Failure]:
        if report.signing_key != "vcek":
            return []  # a VLEK is not chip-specific and has no hwID
        try:
            hwid = cert_hwid(leaf)
        except MalformedEvidence as exc:
            return [Failure("snp.chip_id", str(exc))]
        if hwid is None:
            return [Failure("snp.chip_id", "VCEK has no hwID extension")]
        if len(hwid) == 8:
            matches = report.chip_id[:8] == hwid and not any(report.chip_id[8:])
        else:
            matches = report.chip_id == hwid
        if not matches:
            return [Failure("snp.chip_id", "report chip_id does not match the VCEK hwID")]
        return []

    @staticmethod
    def _check_product(report: SnpReport, product: str) -> list[Failure]:
        if report.cpuid_fam_id is None or not product:
            return []
        expected = 0x1A if product == "Turin" else 0x19
        if report.cpuid_fam_id != expected:
            return [Failure("snp.product",
                            f"report CPUID family {report.cpuid_fam_id:#x} does not match a "
                            f"{product} certificate (family {expected:#x})")]
        return []

    @staticmethod
    def _check_stepping(leaf: x509.Certificate, want: int | None
                        ) -> tuple[str, int | None, list[Failure]]:
        try:
            name, stepping = cert_product_name(leaf)
        except MalformedEvidence as exc:
            return "", None, [Failure("snp.product", str(exc))]
        if want is not None and want != stepping:
            got = "none" if stepping is None else stepping
            return name, stepping, [Failure(
                "snp.product", f"expected product stepping {want}, got {got}")]
        return name, stepping, []

    @staticmethod
    def _check_binding(bound: bytes | None, expected: bytes, what: str) -> list[Failure]:
        if len(expected) not in (32, 64):
            raise ValueError("expected_report_data must be 32 or 64 bytes")
        want = expected.ljust(64, b"\x00")
        if bound is None or len(bound) != 64:
            return [Failure("snp.report_data", f"{what} is missing or not 64 bytes")]
        if bound != want:
            return [Failure("snp.report_data",
                            f"{what} is not bound to this session (nonce, session id, "
                            "node key)")]
        return []

    @staticmethod
    def _claims(report: SnpReport, product: str, hcl: HclReport | None) -> dict[str, Any]:
        c: dict[str, Any] = {
            "evidence.kind": "sev-snp",
            "snp.version": report.version,
            "snp.guest_svn": report.guest_svn,
            "snp.policy": report.policy,
            "snp.policy_abi_major": (report.policy >> 8) & 0xFF,
            "snp.policy_abi_minor": report.policy & 0xFF,
            "snp.debug": report.debug,
            "snp.migrate_ma": report.migrate_ma,
            "snp.smt_allowed": report.smt_allowed,
            "snp.single_socket": report.single_socket,
            "snp.migration_agent": report.has_migration_agent,
            "snp.platform_info": report.platform_info,
            "snp.smt_enabled": report.smt_enabled,
            "snp.tsme_enabled": report.tsme_enabled,
            "snp.vmpl": report.vmpl,
            "snp.measurement": report.measurement.hex(),
            "snp.report_data": report.report_data.hex(),
            "snp.host_data": report.host_data.hex(),
            "snp.id_key_digest": report.id_key_digest.hex(),
            "snp.author_key_digest": report.author_key_digest.hex(),
            "snp.author_key_en": report.author_key_en,
            "snp.family_id": report.family_id.hex(),
            "snp.image_id": report.image_id.hex(),
            "snp.report_id": report.report_id.hex(),
            "snp.report_id_ma": report.report_id_ma.hex(),
            "snp.chip_id": report.chip_id.hex(),
            "snp.mask_chip_key": report.mask_chip_key,
            "snp.signing_key": report.signing_key,
            "snp.product": product,
            "snp.firmware.current": ".".join(map(str, report.current_version)),
            "snp.firmware.committed": ".".join(map(str, report.committed_version)),
        }
        for name, tcb in (("current", report.current_tcb), ("reported", report.reported_tcb),
                          ("committed", report.committed_tcb), ("launch", report.launch_tcb)):
            for key, value in tcb.as_claims().items():
                c[f"snp.tcb.{name}.{key}"] = value
        if report.cpuid_fam_id is not None:
            c["snp.cpuid.family"] = report.cpuid_fam_id
            c["snp.cpuid.model"] = report.cpuid_mod_id
            c["snp.cpuid.stepping"] = report.cpuid_step
        if hcl is not None:
            user_data = hcl.user_data
            c["snp.hcl.user_data"] = user_data.hex() if user_data is not None else ""
            vm = hcl.vm_configuration
            for key in ("secure-boot", "tpm-enabled", "console-enabled"):
                c[f"snp.hcl.vm.{key.replace('-', '_')}"] = bool(vm.get(key, False))
            ak = hcl.jwk("HCLAkPub")
            c["snp.hcl.ak_pub_n"] = str(ak.get("n", "")) if ak else ""
        return c
