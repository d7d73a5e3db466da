"""Intel PCS collateral for TDX: TCB Info, QE Identity, their issuer chain and the CRLs.

The broker supplies the collateral (fetched from Intel PCS or a caching service, or recorded
with the vectors); it is never taken from the evidence. Formats, as PCS serves them:

- **TCB Info** (``/tdx/certification/v4/tcb``): ``{"tcbInfo": {...}, "signature": "<hex>"}``.
  ``signature`` is r||s (64 bytes) ECDSA P-256/SHA-256 over the **exact bytes** of the
  ``tcbInfo`` value as served (no re-serialisation), by the "Intel SGX TCB Signing" key.
  Fields used: ``id`` ("TDX"), ``version`` (3), ``issueDate``/``nextUpdate``, ``fmspc``,
  ``pceId``, ``tcbEvaluationDataNumber``, ``tdxModule`` / ``tdxModuleIdentities`` and
  ``tcbLevels`` (``tcb.sgxtcbcomponents[16].svn``, ``tcb.pcesvn``,
  ``tcb.tdxtcbcomponents[16].svn``, ``tcbDate``, ``tcbStatus``, ``advisoryIDs``).
- **QE Identity** (``/tdx/certification/v4/qe/identity``): ``{"enclaveIdentity": {...},
  "signature": "<hex>"}``, signed the same way; ``id`` "TD_QE", ``miscselect``(+``Mask``),
  ``attributes``(+``Mask``), ``mrsigner``, ``isvprodid``, ``tcbLevels[].tcb.isvsvn``.
- **Issuer chain** (PEM, the ``TCB-Info-Issuer-Chain`` header): TCB Signing, Root CA.
- **CRLs** (DER): the PCK CRL (signed by the Platform or Processor CA) and the Root CA CRL.

Each JSON document is capped at :data:`MAX_COLLATERAL_SIZE` bytes before it is parsed.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
from dataclasses import dataclass
from typing import Any

from cryptography import x509

__all__ = [
    "MAX_COLLATERAL_SIZE",
    "STATUS_ORDER",
    "CollateralError",
    "EnclaveIdentity",
    "TcbInfo",
    "TcbLevel",
    "TdxCollateral",
    "TdxModuleIdentity",
    "signed_members",
]

MAX_COLLATERAL_SIZE = 256 * 1024
# Known statuses, best first (Intel PCS API, "tcbStatus").
STATUS_ORDER = (
    "UpToDate",
    "SWHardeningNeeded",
    "ConfigurationNeeded",
    "ConfigurationAndSWHardeningNeeded",
    "OutOfDate",
    "OutOfDateConfigurationNeeded",
    "Revoked",
)


class CollateralError(ValueError):
    """Collateral that cannot be parsed (a configuration problem, raised at load time)."""


def signed_members(data: bytes, what: str) -> dict[str, tuple[Any, bytes]]:
    """Top-level members of a JSON object as ``{key: (value, exact value bytes)}``."""
    if len(data) > MAX_COLLATERAL_SIZE:
        raise CollateralError(f"{what} is more than {MAX_COLLATERAL_SIZE} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CollateralError(f"{what} is not UTF-8") from exc
    decoder = json.JSONDecoder()
    out: dict[str, tuple[Any, bytes]] = {}

    def skip(i: int) -> int:
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        return i

    try:
        i = skip(0)
        if text[i] != "{":
            raise CollateralError(f"{what} is not a JSON object")
        i = skip(i + 1)
        while text[i] != "}":
            key, i = decoder.raw_decode(text, i)
            i = skip(i)
            if not isinstance(key, str) or text[i] != ":":
                raise CollateralError(f"{what}: bad member")
            start = skip(i + 1)
            value, i = decoder.raw_decode(text, start)
            out[key] = (value, text[start:i].encode("utf-8"))
            i = skip(i)
            if text[i] == ",":
                i = skip(i + 1)
        if skip(i + 1) != len(text):
            raise CollateralError(f"{what} has trailing data")
    except CollateralError:
        raise
    except (IndexError, ValueError, RecursionError) as exc:  # ValueError: JSONDecodeError,
        # and an integer of more than 4300 digits (int's string conversion limit)
        raise CollateralError(f"{what} is not valid JSON") from exc
    return out


def _date(value: Any, what: str) -> dt.datetime:
    if not isinstance(value, str):
        raise CollateralError(f"{what} is not an ISO 8601 date")
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as exc:
        raise CollateralError(f"{what} is not an ISO 8601 date") from exc
    if parsed.tzinfo is None:
        raise CollateralError(f"{what} has no time zone")
    return parsed


def _hex(value: Any, size: int, what: str) -> bytes:
    if not isinstance(value, str):
        raise CollateralError(f"{what} is not hex")
    try:
        raw = bytes.fromhex(value)
    except ValueError as exc:
        raise CollateralError(f"{what} is not hex") from exc
    if len(raw) != size:
        raise CollateralError(f"{what} must be {size} bytes")
    return raw


def _int(value: Any, what: str, default: int | None = None) -> int:
    """A JSON integer member (absent: ``default`` if there is one); never ``int()`` on
    untrusted JSON, which takes strings, floats and booleans and raises other errors."""
    if value is None and default is not None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or not -(2**63) <= value < 2**64:
        raise CollateralError(f"{what} is not an integer")
    return value


def _list(value: Any, what: str) -> list:
    if not isinstance(value, list):
        raise CollateralError(f"{what} is not a list")
    return value


def _advisories(level: dict, what: str) -> tuple[str, ...]:
    ids = _list(level.get("advisoryIDs", []), f"{what} advisoryIDs")
    if not all(isinstance(i, str) for i in ids):
        raise CollateralError(f"{what} advisoryIDs are not strings")
    return tuple(ids)


def _str(value: Any, what: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise CollateralError(f"{what} is not a string")
    return value


def _status(value: Any, what: str) -> str:
    if not isinstance(value, str) or value not in STATUS_ORDER:
        raise CollateralError(f"{what} {value!r} is not a known TCB status")
    return str(value)


def _svns(components: Any, what: str) -> tuple[int, ...]:
    if not isinstance(components, list) or len(components) != 16:
        raise CollateralError(f"{what} must list 16 components")
    out = []
    for comp in components:
        svn = comp.get("svn") if isinstance(comp, dict) else None
        if not isinstance(svn, int) or not 0 <= svn <= 255:
            raise CollateralError(f"{what}: svn is not 0..255")
        out.append(svn)
    return tuple(out)


def _signature(members: dict[str, tuple[Any, bytes]], what: str) -> bytes:
    if "signature" not in members:
        raise CollateralError(f"{what} has no signature")
    return _hex(members["signature"][0], 64, f"{what} signature")


@dataclass(frozen=True, slots=True)
class TcbLevel:
    sgx_components: tuple[int, ...]
    pce_svn: int
    tdx_components: tuple[int, ...]
    date: dt.datetime
    status: str
    advisory_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ModuleTcbLevel:
    isv_svn: int
    date: dt.datetime
    status: str
    advisory_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class TdxModuleIdentity:
    id: str  # "TDX_03"; "" for the version-0 ``tdxModule`` entry
    mr_signer: bytes
    attributes: bytes
    attributes_mask: bytes
    levels: tuple[ModuleTcbLevel, ...]


def _module_levels(raw: Any, what: str) -> tuple[ModuleTcbLevel, ...]:
    if not isinstance(raw, list):
        raise CollateralError(f"{what}: tcbLevels is not a list")
    levels = []
    for level in raw:
        if not isinstance(level, dict):
            raise CollateralError(f"{what}: a TCB level is not an object")
        try:
            svn = level["tcb"]["isvsvn"]
        except (KeyError, TypeError) as exc:
            raise CollateralError(f"{what}: level without tcb.isvsvn") from exc
        if not isinstance(svn, int):
            raise CollateralError(f"{what}: isvsvn is not an integer")
        levels.append(ModuleTcbLevel(
            isv_svn=svn, date=_date(level.get("tcbDate"), f"{what} tcbDate"),
            status=_status(level.get("tcbStatus"), f"{what} tcbStatus"),
            advisory_ids=_advisories(level, what)))
    return tuple(levels)


def _module_identity(raw: Any, what: str) -> TdxModuleIdentity:
    if not isinstance(raw, dict):
        raise CollateralError(f"{what} is not an object")
    return TdxModuleIdentity(
        id=_str(raw.get("id"), f"{what} id"),
        mr_signer=_hex(raw.get("mrsigner"), 48, f"{what} mrsigner"),
        attributes=_hex(raw.get("attributes"), 8, f"{what} attributes"),
        attributes_mask=_hex(raw.get("attributesMask"), 8, f"{what} attributesMask"),
        levels=_module_levels(raw.get("tcbLevels", []), what))


def _signed_object(data: bytes, what: str, member: str) -> tuple[dict, dict, bytes]:
    """The signed members of ``data``, the object under ``member`` and its signed bytes."""
    members = signed_members(data, what)
    if member not in members:
        raise CollateralError(f"{what} has no {member} member")
    value, signed = members[member]
    if not isinstance(value, dict):
        raise CollateralError(f"{member} is not an object")
    return members, value, signed


@dataclass(frozen=True, slots=True)
class TcbInfo:
    signed_bytes: bytes
    signature: bytes
    id: str
    version: int
    issue_date: dt.datetime
    next_update: dt.datetime
    fmspc: bytes
    pce_id: bytes
    evaluation_data_number: int
    tdx_module: TdxModuleIdentity | None
    module_identities: tuple[TdxModuleIdentity, ...]
    levels: tuple[TcbLevel, ...]

    @classmethod
    def parse(cls, data: bytes) -> TcbInfo:
        members, info, signed = _signed_object(data, "TCB Info", "tcbInfo")
        levels = []
        for level in _list(info.get("tcbLevels", []), "TCB Info tcbLevels"):
            if not isinstance(level, dict):
                raise CollateralError("TCB Info level is not an object")
            tcb = level.get("tcb", {})
            if not isinstance(tcb, dict) or not isinstance(tcb.get("pcesvn"), int):
                raise CollateralError("TCB Info level without tcb.pcesvn")
            levels.append(TcbLevel(
                sgx_components=_svns(tcb.get("sgxtcbcomponents"), "sgxtcbcomponents"),
                pce_svn=tcb["pcesvn"],
                tdx_components=_svns(tcb.get("tdxtcbcomponents"), "tdxtcbcomponents"),
                date=_date(level.get("tcbDate"), "tcbDate"),
                status=_status(level.get("tcbStatus"), "tcbStatus"),
                advisory_ids=_advisories(level, "TCB Info level")))
        if not levels:
            raise CollateralError("TCB Info has no TCB levels")
        module = info.get("tdxModule")
        return cls(
            signed_bytes=signed, signature=_signature(members, "TCB Info"),
            id=_str(info.get("id"), "TCB Info id"),
            version=_int(info.get("version"), "TCB Info version", 0),
            issue_date=_date(info.get("issueDate"), "issueDate"),
            next_update=_date(info.get("nextUpdate"), "nextUpdate"),
            fmspc=_hex(info.get("fmspc"), 6, "fmspc"),
            pce_id=_hex(info.get("pceId"), 2, "pceId"),
            evaluation_data_number=_int(info.get("tcbEvaluationDataNumber"),
                                        "tcbEvaluationDataNumber", 0),
            tdx_module=_module_identity(module, "tdxModule") if module else None,
            module_identities=tuple(
                _module_identity(m, f"tdxModuleIdentities[{i}]")
                for i, m in enumerate(_list(info.get("tdxModuleIdentities", []),
                                            "tdxModuleIdentities"))),
            levels=tuple(levels))


@dataclass(frozen=True, slots=True)
class EnclaveIdentity:
    signed_bytes: bytes
    signature: bytes
    id: str
    version: int
    issue_date: dt.datetime
    next_update: dt.datetime
    misc_select: int
    misc_select_mask: int
    attributes: bytes
    attributes_mask: bytes
    mr_signer: bytes
    isv_prod_id: int
    levels: tuple[ModuleTcbLevel, ...]

    @classmethod
    def parse(cls, data: bytes) -> EnclaveIdentity:
        members, ident, signed = _signed_object(data, "QE Identity", "enclaveIdentity")
        return cls(
            signed_bytes=signed, signature=_signature(members, "QE Identity"),
            id=_str(ident.get("id"), "QE Identity id"),
            version=_int(ident.get("version"), "QE Identity version", 0),
            issue_date=_date(ident.get("issueDate"), "issueDate"),
            next_update=_date(ident.get("nextUpdate"), "nextUpdate"),
            misc_select=int.from_bytes(_hex(ident.get("miscselect"), 4, "miscselect"), "big"),
            misc_select_mask=int.from_bytes(
                _hex(ident.get("miscselectMask"), 4, "miscselectMask"), "big"),
            attributes=_hex(ident.get("attributes"), 16, "attributes"),
            attributes_mask=_hex(ident.get("attributesMask"), 16, "attributesMask"),
            mr_signer=_hex(ident.get("mrsigner"), 32, "mrsigner"),
            isv_prod_id=_int(ident.get("isvprodid"), "isvprodid", -1),
            levels=_module_levels(ident.get("tcbLevels", []), "enclaveIdentity"))


@dataclass(frozen=True)
class TdxCollateral:
    """Everything a full TDX verification needs besides the quote and the pinned root."""

    tcb_info: TcbInfo
    qe_identity: EnclaveIdentity | None
    signing_chain: tuple[x509.Certificate, ...]  # TCB Signing first; the root is pinned
    pck_crl: x509.CertificateRevocationList | None = None
    root_crl: x509.CertificateRevocationList | None = None

    def crl_issuer(self, crl: x509.CertificateRevocationList) -> x509.Name:
        """The issuer name of one of this collateral's CRLs, decoded once."""
        if crl is self.pck_crl:
            return self._pck_crl_issuer
        if crl is self.root_crl:
            return self._root_crl_issuer
        return crl.issuer

    @functools.cached_property
    def _pck_crl_issuer(self) -> x509.Name:
        return self.pck_crl.issuer if self.pck_crl is not None else x509.Name([])

    @functools.cached_property
    def _root_crl_issuer(self) -> x509.Name:
        return self.root_crl.issuer if self.root_crl is not None else x509.Name([])

    @classmethod
    def load(cls, *, tcb_info: bytes, qe_identity: bytes | None, signing_chain_pem: bytes,
             pck_crl_der: bytes | None = None,
             root_crl_der: bytes | None = None) -> TdxCollateral:
        try:
            chain = tuple(x509.load_pem_x509_certificates(signing_chain_pem))
            pck_crl = x509.load_der_x509_crl(pck_crl_der) if pck_crl_der else None
            root_crl = x509.load_der_x509_crl(root_crl_der) if root_crl_der else None
        except ValueError as exc:
            raise CollateralError(f"collateral certificate or CRL is invalid: {exc}") from exc
        return cls(tcb_info=TcbInfo.parse(tcb_info),
                   qe_identity=EnclaveIdentity.parse(qe_identity) if qe_identity else None,
                   signing_chain=chain, pck_crl=pck_crl, root_crl=root_crl)
