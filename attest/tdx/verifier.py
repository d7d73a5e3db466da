"""The ``tdx`` evidence verifier (attest.interface.EvidenceVerifier): DCAP quotes v4 and v5.

The evidence is the quote exactly as the TD's quote generation service returns it (configfs-tsm
``outblob``; see :mod:`attest.tdx.quote` for its bytes), or for Azure TDX VMs the quote with
the HCL report (:mod:`attest.tdx.evidence`). Checks, each reported as a
:class:`~attest.interface.Failure` with a stable id, all run even after one fails:

=======================  ====================================================================
id                       check
=======================  ====================================================================
tdx.qe_vendor            the quote was produced by Intel's QE (qe_vendor_id)
tdx.pck.chain            PCK leaf <- Platform/Processor CA <- a pinned Intel SGX Root CA
                         (X.509 path validation by ``cryptography``, validity at ``now``)
tdx.pck.revoked          neither the PCK nor its CA is on the PCK / Root CA CRL
tdx.crl                  each CRL is signed by its CA and current at ``now``
tdx.quote.signature      ECDSA P-256/SHA-256 over header+body by the attestation key
tdx.qe_report.signature  ECDSA P-256/SHA-256 over the QE report by the PCK leaf key
tdx.qe_report.binding    QE report_data = SHA-256(attestation key || QE auth data) || 32 zeros
tdx.collateral.missing   no TCB Info was supplied, so the TCB status is unknown
tdx.collateral.chain     the TCB Signing certificate chains to a pinned root at ``now``
tdx.collateral.tcb_info  TCB Info signature, id "TDX", version 3, issueDate..nextUpdate covers
                         ``now``, FMSPC and PCE-ID equal the PCK certificate's
tdx.collateral.qe_identity  QE Identity signature, id "TD_QE", validity at ``now``
tdx.qe_identity          the QE report matches the QE Identity (MRSIGNER, ISVPRODID,
                         MISCSELECT and ATTRIBUTES under their masks) at a known ISVSVN
tdx.tcb                  a TCB level matches (PCK SGX components and PCESVN, the TD's
                         TEE_TCB_SVN), the TDX module identity matches; Revoked is an error
tdx.tcb.status           warning: the matched status is not UpToDate (policies decide)
tdx.hcl.var_data         Azure: SHA-256(HCL variable data) = quote report_data[0:32]
tdx.hcl.tdreport         Azure: the HCL TDREPORT carries the quote's report data, attributes,
                         MRTD and RTMRs
tdx.report_data          the session binding: report_data (Azure: the HCL ``user-data``)
                         equals the expected 64 bytes, or the expected 32 followed by zeros
=======================  ====================================================================

TCB level matching follows Intel's QVL: the first level (levels are listed best first) whose
16 SGX component SVNs and PCESVN are each <= the PCK certificate's, and whose 16 TDX component
SVNs are each <= TEE_TCB_SVN (skipping bytes 0-1 when the TDX module major version, byte 1,
is non-zero and the TCB Info lists module identities). The module identity ``TDX_<byte 1>``
gives the module status by ISVSVN (byte 0). OutOfDate or Revoked module or QE status lowers
the platform status as Intel's ``convergeTcbStatus`` does.

Context: ``reference["tdx_trust_store"]`` (:class:`IntelTrustStore`, default: the bundled
Intel SGX Root CA), ``reference["tdx_collateral"]`` (:class:`TdxCollateral`),
``reference["now"]`` (aware datetime, default: now); or, from a broker's YAML, ``roots`` and
``collateral`` file paths (:mod:`attest.tee_reference`).

Claims: ``evidence.kind`` "tdx", ``evidence.verified``, ``tdx.version``, ``tdx.body_type``,
``tdx.mr_td``, ``tdx.rtmr0``..``tdx.rtmr3``, ``tdx.mr_config_id``, ``tdx.mr_owner``,
``tdx.mr_owner_config``, ``tdx.mr_seam``, ``tdx.mr_signer_seam``, ``tdx.mr_servicetd``
("" for TDX 1.0 bodies), ``tdx.seam_attributes``, ``tdx.td_attributes`` (hex, as in the quote),
``tdx.debug``, ``tdx.sept_ve_disable``, ``tdx.xfam``, ``tdx.tee_tcb_svn``, ``tdx.report_data``,
``tdx.fmspc``, ``tdx.pce_id``, ``tdx.platform_instance_id``, ``tdx.qe.isv_svn``,
``tdx.tcb.status`` ("Unknown" without collateral), ``tdx.tcb.platform_status``,
``tdx.tcb.module_status``, ``tdx.tcb.qe_status``, ``tdx.tcb.advisory_ids`` (list),
``tdx.tcb.date``, ``tdx.tcb.evaluation_data_number``; Azure: ``tdx.hcl.user_data``,
``tdx.hcl.vm.{secure_boot,tpm_enabled,console_enabled}``, ``tdx.hcl.ak_pub_n``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.verification import (
    ExtensionPolicy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from attest.interface import (
    Failure,
    MalformedEvidence,
    VerificationContext,
    VerificationResult,
)
from attest.snp.hcl import HclReport, parse_hcl_report
from attest.tee_reference import tdx_trust

from .collateral import (
    EnclaveIdentity,
    ModuleTcbLevel,
    TcbInfo,
    TcbLevel,
    TdxCollateral,
)
from .evidence import decode_evidence
from .pck import PckExtensions, pck_extensions
from .quote import INTEL_QE_VENDOR_ID, TdxQuote, parse_quote

__all__ = ["IntelTrustStore", "TdxVerifier", "verify_p256", "verify_x509_chain"]

MAX_CHAIN_CERTS = 4
HCL_REPORT_TYPE_TDX = 4


@dataclass(frozen=True)
class IntelTrustStore:
    """Pinned Intel SGX Root CA certificate(s): the only anchors for PCK and collateral."""

    roots: tuple[x509.Certificate, ...]

    @classmethod
    def bundled(cls) -> IntelTrustStore:
        pem = (resources.files("attest.tdx") / "roots" / "intel_sgx_root_ca.pem").read_bytes()
        return cls(roots=tuple(x509.load_pem_x509_certificates(pem)))


_BUNDLED: IntelTrustStore | None = None


def _bundled() -> IntelTrustStore:
    global _BUNDLED
    if _BUNDLED is None:
        _BUNDLED = IntelTrustStore.bundled()
    return _BUNDLED


def verify_p256(key_xy_or_cert: bytes | x509.Certificate, signature: bytes,
                message: bytes) -> bool:
    """ECDSA P-256/SHA-256 with a raw r||s signature, by a raw X||Y key or a certificate."""
    if isinstance(key_xy_or_cert, x509.Certificate):
        key = key_xy_or_cert.public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
            return False
    else:
        try:
            key = ec.EllipticCurvePublicKey.from_encoded_point(
                ec.SECP256R1(), b"\x04" + key_xy_or_cert)
        except ValueError:
            return False
    if len(signature) != 64:
        return False
    r = int.from_bytes(signature[:32], "big")
    s = int.from_bytes(signature[32:], "big")
    try:
        key.verify(encode_dss_signature(r, s), message, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError):
        return False
    return True


def verify_x509_chain(leaf: x509.Certificate, intermediates: Sequence[x509.Certificate],
                      roots: Iterable[x509.Certificate], now: dt.datetime
                      ) -> tuple[list[x509.Certificate], str | None]:
    """RFC 5280 path validation (CA certificates under the web PKI CA profile, any leaf)."""
    verifier = (PolicyBuilder().store(Store(list(roots))).time(now)
                .extension_policies(ca_policy=ExtensionPolicy.webpki_defaults_ca(),
                                    ee_policy=ExtensionPolicy.permit_all())
                .build_client_verifier())
    try:
        verified = verifier.verify(leaf, list(intermediates))
    except VerificationError as exc:
        return [], str(exc)
    return list(verified.chain), None


def _cn(cert: x509.Certificate) -> str:
    attrs = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else cert.subject.rfc4514_string()


def _current(now: dt.datetime, start: dt.datetime, end: dt.datetime | None) -> bool:
    return start <= now and (end is None or now <= end)


def _converge(platform: str, other: str) -> str:
    if other == "Revoked":
        return "Revoked"
    if other == "OutOfDate":
        if platform in ("UpToDate", "SWHardeningNeeded"):
            return "OutOfDate"
        if platform in ("ConfigurationNeeded", "ConfigurationAndSWHardeningNeeded"):
            return "OutOfDateConfigurationNeeded"
    return platform


def _first_level(levels: Iterable[ModuleTcbLevel], isv_svn: int) -> ModuleTcbLevel | None:
    return next((lv for lv in levels if lv.isv_svn <= isv_svn), None)


class TdxVerifier:
    """Verifies ``tdx`` evidence (a raw DCAP v4/v5 quote)."""

    kind = "tdx"

    def __init__(self, trust_store: IntelTrustStore | None = None,
                 collateral: TdxCollateral | None = None) -> None:
        self._trust_store = trust_store
        self._collateral = collateral

    def verify(self, evidence: bytes, context: VerificationContext) -> VerificationResult:
        container = decode_evidence(evidence)
        quote = parse_quote(container.quote)
        hcl = (parse_hcl_report(container.hcl_report, report_type=HCL_REPORT_TYPE_TDX)
               if container.hcl_report is not None else None)
        chain = self._load_chain(quote.pck_chain_pem)
        pck = pck_extensions(chain[0])
        configured_store, configured_collateral = tdx_trust(context.reference)
        store = configured_store or self._trust_store or _bundled()
        if not isinstance(store, IntelTrustStore):
            raise TypeError("reference['tdx_trust_store'] must be an IntelTrustStore")
        collateral = configured_collateral or self._collateral
        if collateral is not None and not isinstance(collateral, TdxCollateral):
            raise TypeError("reference['tdx_collateral'] must be a TdxCollateral")
        now = context.reference.get("now") or dt.datetime.now(dt.UTC)
        if not isinstance(now, dt.datetime) or now.tzinfo is None:
            raise TypeError("reference['now'] must be a timezone-aware datetime")

        failures: list[Failure] = []
        if quote.qe_vendor_id != INTEL_QE_VENDOR_ID:
            failures.append(Failure("tdx.qe_vendor",
                                    f"QE vendor id {quote.qe_vendor_id.hex()} is not Intel's"))
        verified, problem = verify_x509_chain(chain[0], chain[1:], store.roots, now)
        if problem:
            failures.append(Failure("tdx.pck.chain",
                                    f"PCK certificate does not chain to a pinned Intel SGX "
                                    f"Root CA at {now:%Y-%m-%d}: {problem}"))
        elif chain != verified[:len(chain)]:
            failures.append(Failure("tdx.pck.chain",
                                    "the quote's certificates are not exactly the path from "
                                    "the PCK certificate to the pinned Intel SGX Root CA"))
        if not verify_p256(quote.attestation_key, quote.signature, quote.signed_bytes):
            failures.append(Failure("tdx.quote.signature",
                                    "quote signature does not verify under the attestation key"))
        if not verify_p256(chain[0], quote.qe_report_signature, quote.qe_report.raw):
            failures.append(Failure("tdx.qe_report.signature",
                                    "QE report signature does not verify under the PCK key"))
        binding = hashlib.sha256(quote.attestation_key + quote.qe_auth_data).digest()
        if quote.qe_report.report_data != binding + bytes(32):
            failures.append(Failure("tdx.qe_report.binding",
                                    "QE report data is not SHA-256(attestation key || QE auth "
                                    "data): the attestation key is not the QE's"))
        tcb: dict[str, Any] = {"status": "Unknown", "platform_status": "Unknown",
                               "module_status": "Unknown", "qe_status": "Unknown",
                               "advisory_ids": [], "date": "", "evaluation_data_number": -1}
        if collateral is None:
            failures.append(Failure("tdx.collateral.missing",
                                    "no TCB Info / QE Identity collateral was supplied; the "
                                    "TCB status is unknown"))
        else:
            failures += self._check_crls(collateral, verified, now)
            failures += self._check_collateral(collateral, pck, store, now)
            qe_failures, qe_status = self._check_qe_identity(quote, collateral.qe_identity)
            failures += qe_failures
            failures += self._match_tcb(quote, pck, collateral.tcb_info, qe_status, tcb)
        if hcl is None:
            failures += self._check_binding(quote.body.report_data,
                                            context.expected_report_data, "report_data")
        else:
            failures += self._check_hcl(quote, hcl)
            failures += self._check_binding(hcl.user_data, context.expected_report_data,
                                            "HCL user-data")
        claims = self._claims(quote, pck, tcb)
        if hcl is not None:
            user_data = hcl.user_data
            claims["tdx.hcl.user_data"] = user_data.hex() if user_data is not None else ""
            vm = hcl.vm_configuration
            for key in ("secure-boot", "tpm-enabled", "console-enabled"):
                claims[f"tdx.hcl.vm.{key.replace('-', '_')}"] = bool(vm.get(key, False))
            ak = hcl.jwk("HCLAkPub")
            claims["tdx.hcl.ak_pub_n"] = str(ak.get("n", "")) if ak else ""
        claims["evidence.verified"] = not any(f.severity == "error" for f in failures)
        return VerificationResult(kind=self.kind, claims=claims, failures=tuple(failures))

    @staticmethod
    def _load_chain(pem: bytes) -> list[x509.Certificate]:
        body = pem[:-1] if pem.endswith(b"\x00") else pem  # the QE adds one NUL
        if body.count(b"-----BEGIN CERTIFICATE-----") > MAX_CHAIN_CERTS:
            raise MalformedEvidence(f"PCK chain has more than {MAX_CHAIN_CERTS} certificates")
        try:
            chain = x509.load_pem_x509_certificates(body)
            # the leaf's lazily decoded parts are read below: decode them now, so a broken
            # one is malformed evidence (the CAs are only used inside path validation)
            _ = (chain[0].extensions, chain[0].public_key())
        except Exception as exc:  # cryptography raises many types for bad DER
            raise MalformedEvidence("PCK chain is not a valid PEM certificate list") from exc
        # every byte of the quote is meaningful: the chain must be exactly the canonical PEM
        # of its certificates, so whitespace or text around them cannot vary unnoticed
        if body != b"".join(c.public_bytes(Encoding.PEM) for c in chain):
            raise MalformedEvidence("PCK chain is not canonical PEM (certificates only, "
                                    "64-column base64, LF line ends)")
        return chain

    @staticmethod
    def _check_crls(collateral: TdxCollateral, verified: list[x509.Certificate],
                    now: dt.datetime) -> list[Failure]:
        out: list[Failure] = []
        if len(verified) < 3:
            return out  # the chain failure is already reported; nothing to check CRLs with
        leaf, ca, root = verified[0], verified[1], verified[-1]
        for crl, issuer, subject, name in ((collateral.pck_crl, ca, leaf, "PCK CRL"),
                                           (collateral.root_crl, root, ca, "Root CA CRL")):
            if crl is None:
                out.append(Failure("tdx.crl", f"no {name} was supplied"))
                continue
            if (collateral.crl_issuer(crl) != issuer.subject
                    or not crl.is_signature_valid(issuer.public_key())):
                out.append(Failure("tdx.crl", f"{name} is not signed by {_cn(issuer)!r}"))
                continue
            if not _current(now, crl.last_update_utc, crl.next_update_utc):
                out.append(Failure("tdx.crl",
                                   f"{name} is valid {crl.last_update_utc:%Y-%m-%d} to "
                                   f"{crl.next_update_utc:%Y-%m-%d}, not at {now:%Y-%m-%d}"))
            if crl.get_revoked_certificate_by_serial_number(subject.serial_number) is not None:
                out.append(Failure("tdx.pck.revoked", f"{_cn(subject)!r} is revoked ({name})"))
        return out

    @staticmethod
    def _check_collateral(collateral: TdxCollateral, pck: PckExtensions,
                          store: IntelTrustStore, now: dt.datetime) -> list[Failure]:
        out: list[Failure] = []
        signer = collateral.signing_chain[0] if collateral.signing_chain else None
        if signer is None:
            return [Failure("tdx.collateral.chain", "no TCB Signing certificate was supplied")]
        _, problem = verify_x509_chain(signer, collateral.signing_chain[1:], store.roots, now)
        if problem:
            out.append(Failure("tdx.collateral.chain",
                               f"{_cn(signer)!r} does not chain to a pinned Intel SGX Root CA "
                               f"at {now:%Y-%m-%d}: {problem}"))
        info = collateral.tcb_info
        if not verify_p256(signer, info.signature, info.signed_bytes):
            out.append(Failure("tdx.collateral.tcb_info",
                               f"TCB Info signature does not verify under {_cn(signer)!r}"))
        if info.id != "TDX" or info.version != 3:
            out.append(Failure("tdx.collateral.tcb_info",
                               f"TCB Info is {info.id!r} v{info.version}, not TDX v3"))
        if not _current(now, info.issue_date, info.next_update):
            out.append(Failure("tdx.collateral.tcb_info",
                               f"TCB Info is valid {info.issue_date:%Y-%m-%d} to "
                               f"{info.next_update:%Y-%m-%d}: tcbInfo has expired or is not "
                               f"yet valid at {now:%Y-%m-%d}"))
        if info.fmspc != pck.fmspc or info.pce_id != pck.pce_id:
            out.append(Failure("tdx.collateral.tcb_info",
                               f"TCB Info is for FMSPC {info.fmspc.hex()} / PCE {info.pce_id.hex()}"
                               f", the PCK certificate is {pck.fmspc.hex()} / "
                               f"{pck.pce_id.hex()}"))
        ident = collateral.qe_identity
        if ident is None:
            out.append(Failure("tdx.collateral.qe_identity", "no QE Identity was supplied"))
            return out
        if not verify_p256(signer, ident.signature, ident.signed_bytes):
            out.append(Failure("tdx.collateral.qe_identity",
                               f"QE Identity signature does not verify under {_cn(signer)!r}"))
        if ident.id != "TD_QE":
            out.append(Failure("tdx.collateral.qe_identity",
                               f"QE Identity is for {ident.id!r}, not TD_QE"))
        if not _current(now, ident.issue_date, ident.next_update):
            out.append(Failure("tdx.collateral.qe_identity",
                               f"QE Identity is valid {ident.issue_date:%Y-%m-%d} to "
                               f"{ident.next_update:%Y-%m-%d}, not at {now:%Y-%m-%d}"))
        return out

    @staticmethod
    def _check_qe_identity(quote: TdxQuote, ident: EnclaveIdentity | None
                           ) -> tuple[list[Failure], str]:
        if ident is None:
            return [], "Unknown"
        qe = quote.qe_report
        problems = []
        if qe.mr_signer != ident.mr_signer:
            problems.append("MRSIGNER differs")
        if qe.isv_prod_id != ident.isv_prod_id:
            problems.append(f"ISVPRODID {qe.isv_prod_id} is not {ident.isv_prod_id}")
        if qe.misc_select & ident.misc_select_mask != ident.misc_select:
            problems.append("MISCSELECT differs under the mask")
        masked = bytes(a & m for a, m in zip(qe.attributes, ident.attributes_mask, strict=True))
        if masked != bytes(a & m for a, m in zip(ident.attributes, ident.attributes_mask,
                                                 strict=True)):
            problems.append("ATTRIBUTES differ under the mask")
        level = _first_level(ident.levels, qe.isv_svn)
        if level is None:
            problems.append(f"no QE TCB level covers ISVSVN {qe.isv_svn}")
        out = [Failure("tdx.qe_identity", "the quoting enclave is not Intel's TD QE: "
                                          + "; ".join(problems))] if problems else []
        return out, level.status if level else "Unknown"

    @staticmethod
    def _match_tcb(quote: TdxQuote, pck: PckExtensions, info: TcbInfo, qe_status: str,
                   tcb: dict[str, Any]) -> list[Failure]:
        svn = quote.body.tee_tcb_svn
        module_version = svn[1]
        skip = 2 if module_version > 0 and info.module_identities else 0

        def matches(level: TcbLevel) -> bool:
            return (all(p >= lv for p, lv in zip(pck.sgx_tcb_components, level.sgx_components,
                                                 strict=True))
                    and pck.pce_svn >= level.pce_svn
                    and all(svn[i] >= level.tdx_components[i] for i in range(skip, 16)))

        tcb["evaluation_data_number"] = info.evaluation_data_number
        out: list[Failure] = []
        level = next((lv for lv in info.levels if matches(lv)), None)
        if level is None:
            return [Failure("tdx.tcb", "no TCB level in the TCB Info matches the platform "
                                       "(TCB not supported)")]
        status = level.status
        advisories = list(level.advisory_ids)
        tcb["platform_status"] = status
        tcb["date"] = level.date.strftime("%Y-%m-%dT%H:%M:%SZ")
        module_status = "UpToDate"
        if skip:
            want = f"TDX_{module_version:02X}"
            ident = next((m for m in info.module_identities if m.id == want), None)
            if ident is None:
                out.append(Failure("tdx.tcb", f"TCB Info lists no module identity {want}"))
                module_status = "Unknown"
            else:
                out += _module_match(quote, ident)
                module_level = _first_level(ident.levels, svn[0])
                if module_level is None:
                    out.append(Failure("tdx.tcb",
                                       f"{want} has no TCB level for module SVN {svn[0]}"))
                    module_status = "Unknown"
                else:
                    module_status = module_level.status
                    advisories += module_level.advisory_ids
        elif info.tdx_module is not None:
            out += _module_match(quote, info.tdx_module)
        tcb["module_status"] = module_status
        tcb["qe_status"] = qe_status
        for other in (module_status, qe_status):
            status = _converge(status, other)
        if "Unknown" in (module_status, qe_status) and status == "UpToDate":
            status = "Unknown"
        tcb["status"] = status
        tcb["advisory_ids"] = sorted(set(advisories))
        if status == "Revoked":
            out.append(Failure("tdx.tcb", "the platform TCB is Revoked"))
        elif status != "UpToDate":
            out.append(Failure("tdx.tcb.status", f"TCB status is {status}"
                               + (f" ({', '.join(tcb['advisory_ids'])})"
                                  if tcb["advisory_ids"] else ""), severity="warning"))
        return out

    @staticmethod
    def _check_hcl(quote: TdxQuote, hcl: HclReport) -> list[Failure]:
        out = []
        if hcl.var_data_digest()[:32] != quote.body.report_data[:32]:
            out.append(Failure("tdx.hcl.var_data", "HCL variable data digest does not match "
                                                   "the TDX quote report data"))
        td = hcl.snp_report  # the report region: here a TDREPORT
        body = quote.body
        if (td[128:192] != body.report_data or td[528:576] != body.mr_td
                or td[512:520] != body.td_attributes
                or any(td[720 + 48 * i:768 + 48 * i] != rtmr
                       for i, rtmr in enumerate(body.rtmrs))):
            out.append(Failure("tdx.hcl.tdreport", "the HCL TDREPORT does not carry the "
                                                   "quote's report data, attributes, MRTD and "
                                                   "RTMRs"))
        return out

    @staticmethod
    def _check_binding(report_data: bytes | None, expected: bytes, what: str) -> list[Failure]:
        if len(expected) not in (32, 64):
            raise ValueError("expected_report_data must be 32 or 64 bytes")
        if report_data != expected.ljust(64, b"\x00"):
            return [Failure("tdx.report_data", f"{what} is not bound to this session "
                                               "(nonce, session id, node key)")]
        return []

    @staticmethod
    def _claims(quote: TdxQuote, pck: PckExtensions, tcb: dict[str, Any]) -> dict[str, Any]:
        body = quote.body
        c: dict[str, Any] = {
            "evidence.kind": "tdx",
            "tdx.version": quote.version,
            "tdx.body_type": quote.body_type,
            "tdx.mr_td": body.mr_td.hex(),
            "tdx.mr_config_id": body.mr_config_id.hex(),
            "tdx.mr_owner": body.mr_owner.hex(),
            "tdx.mr_owner_config": body.mr_owner_config.hex(),
            "tdx.mr_seam": body.mr_seam.hex(),
            "tdx.mr_signer_seam": body.mr_signer_seam.hex(),
            "tdx.mr_servicetd": body.mr_servicetd.hex() if body.mr_servicetd else "",
            "tdx.seam_attributes": body.seam_attributes.hex(),
            "tdx.td_attributes": body.td_attributes.hex(),
            "tdx.debug": body.debug,
            "tdx.sept_ve_disable": body.sept_ve_disable,
            "tdx.xfam": body.xfam.hex(),
            "tdx.tee_tcb_svn": body.tee_tcb_svn.hex(),
            "tdx.report_data": body.report_data.hex(),
            "tdx.fmspc": pck.fmspc.hex(),
            "tdx.pce_id": pck.pce_id.hex(),
            "tdx.platform_instance_id": (pck.platform_instance_id or b"").hex(),
            "tdx.qe.isv_svn": quote.qe_report.isv_svn,
        }
        for i, rtmr in enumerate(body.rtmrs):
            c[f"tdx.rtmr{i}"] = rtmr.hex()
        for key, value in tcb.items():
            c[f"tdx.tcb.{key}"] = value
        return c


def _module_match(quote: TdxQuote, ident: Any) -> list[Failure]:
    body = quote.body
    masked = bytes(a & m for a, m in zip(body.seam_attributes, ident.attributes_mask,
                                         strict=True))
    problems = []
    if body.mr_signer_seam != ident.mr_signer:
        problems.append("MRSIGNER_SEAM differs")
    if masked != ident.attributes:
        problems.append("SEAM attributes differ under the mask")
    if problems:
        return [Failure("tdx.tcb", f"the TDX module is not {ident.id or 'the expected one'}: "
                                   + "; ".join(problems))]
    return []
