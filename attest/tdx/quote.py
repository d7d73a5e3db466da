"""Intel TDX DCAP quote, versions 4 and 5 (ECDSA P-256 attestation key, ``tee_type`` 0x81).

All integers are little-endian. Every length field is checked against the bytes that remain
and against a fixed maximum before anything is sliced or allocated; anything outside the
declared lengths (some real quotes end with padding or text) is ignored.

Header (48 bytes, offset 0):

======  ====  ==================  ==============================================
offset  size  field               notes
======  ====  ==================  ==============================================
0       2     version             4 or 5
2       2     att_key_type        2 = ECDSA P-256 with SHA-256
4       4     tee_type            0x81 = TDX
8       4     reserved            zero
12      16    qe_vendor_id        939a7233f79c4ca9940a0db3957f0607 (Intel QE)
28      20    user_data           QE-defined (first 16 bytes: platform id hint)
======  ====  ==================  ==============================================

v4: the TD report body (584 bytes) follows at 48. v5: at 48 a u16 body type (2 = TDX 1.0,
584 bytes; 3 = TDX 1.5, 648 bytes) and a u32 body size (which must match the type), then the
body at 54. The **signed bytes** are the header plus (v5) type/size plus the body.

TD report body (offsets within the body):

======  ====  ==================  ==============================================
0       16    tee_tcb_svn         [0] TDX module minor SVN, [1] module major version, ...
16      48    mr_seam             TDX module measurement
64      48    mr_signer_seam      TDX module signer (zero for Intel's)
112     8     seam_attributes
120     8     td_attributes       bit 0 DEBUG, bit 28 SEPT_VE_DISABLE, 27 PKS, 30 KL, 63 PERFMON
128     8     xfam
136     48    mr_td               the TD's initial measurement
184     48    mr_config_id
232     48    mr_owner
280     48    mr_owner_config
328     192   rtmr0..rtmr3        4 x 48
520     64    report_data         supplied by the TD
584     16    tee_tcb_svn2        TDX 1.5 body only
600     48    mr_servicetd        TDX 1.5 body only
======  ====  ==================  ==============================================

After the body: u32 ``sig_data_len`` (at most :data:`MAX_SIG_DATA`), then the signature data:

======  ====  ======================================================================
0       64    quote signature r||s (big-endian), ECDSA P-256/SHA-256 over the signed bytes
64      64    attestation public key X||Y (big-endian), P-256
128     2     certification data type: must be 6 (QE report certification data)
130     4     certification data size
134     384   QE report (SGX REPORT body, see :class:`SgxReportBody`)
518     64    QE report signature r||s by the PCK certificate key (ECDSA P-256/SHA-256)
582     2     QE auth data length A (at most :data:`MAX_AUTH_DATA`)
584     A     QE auth data
584+A   2     inner certification data type: must be 5 (PCK chain, PEM)
586+A   4     inner size C (at most :data:`MAX_CERT_DATA`)
590+A   C     PEM certificates: PCK leaf, Platform/Processor CA, Intel SGX Root CA, in
              canonical PEM (64-column base64, LF line ends), optionally one NUL after
======  ====  ======================================================================

SGX REPORT body (384 bytes): cpu_svn 16 @0, misc_select u32 @16, attributes 16 @48,
mr_enclave 32 @64, mr_signer 32 @128, isv_prod_id u16 @256, isv_svn u16 @258,
report_data 64 @320; the rest reserved.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from attest.interface import MalformedEvidence

__all__ = [
    "MAX_QUOTE_SIZE",
    "SgxReportBody",
    "TdReportBody",
    "TdxQuote",
    "parse_quote",
]

HEADER_SIZE = 48
BODY_V4_SIZE = 584
BODY_V15_SIZE = 648
QE_REPORT_SIZE = 384
ATT_KEY_TYPE_ECDSA_P256 = 2
TEE_TYPE_TDX = 0x81
CERT_TYPE_QE_REPORT = 6
CERT_TYPE_PCK_CHAIN = 5
MAX_SIG_DATA = 16384
MAX_AUTH_DATA = 1024
MAX_CERT_DATA = 12288
MAX_QUOTE_SIZE = 32768
INTEL_QE_VENDOR_ID = bytes.fromhex("939a7233f79c4ca9940a0db3957f0607")

TD_ATTR_DEBUG = 1 << 0
TD_ATTR_SEPT_VE_DISABLE = 1 << 28
TD_ATTR_PKS = 1 << 30
TD_ATTR_KL = 1 << 31
TD_ATTR_PERFMON = 1 << 63


@dataclass(frozen=True, slots=True)
class TdReportBody:
    tee_tcb_svn: bytes
    mr_seam: bytes
    mr_signer_seam: bytes
    seam_attributes: bytes
    td_attributes: bytes
    xfam: bytes
    mr_td: bytes
    mr_config_id: bytes
    mr_owner: bytes
    mr_owner_config: bytes
    rtmrs: tuple[bytes, bytes, bytes, bytes]
    report_data: bytes
    tee_tcb_svn2: bytes | None = None
    mr_servicetd: bytes | None = None

    @property
    def td_attributes_int(self) -> int:
        return int.from_bytes(self.td_attributes, "little")

    @property
    def debug(self) -> bool:
        return bool(self.td_attributes_int & TD_ATTR_DEBUG)

    @property
    def sept_ve_disable(self) -> bool:
        return bool(self.td_attributes_int & TD_ATTR_SEPT_VE_DISABLE)


@dataclass(frozen=True, slots=True)
class SgxReportBody:
    raw: bytes
    cpu_svn: bytes
    misc_select: int
    attributes: bytes
    mr_enclave: bytes
    mr_signer: bytes
    isv_prod_id: int
    isv_svn: int
    report_data: bytes


@dataclass(frozen=True, slots=True)
class TdxQuote:
    version: int
    att_key_type: int
    tee_type: int
    qe_vendor_id: bytes
    user_data: bytes
    body_type: int  # 2 = TDX 1.0 (584-byte body), 3 = TDX 1.5 (648)
    body: TdReportBody
    signed_bytes: bytes
    signature: bytes  # r||s, 64 bytes
    attestation_key: bytes  # X||Y, 64 bytes
    qe_report: SgxReportBody
    qe_report_signature: bytes  # r||s, 64 bytes
    qe_auth_data: bytes
    pck_chain_pem: bytes
    declared_size: int  # bytes up to the end of the signature data


def _parse_body(b: bytes) -> TdReportBody:
    def f(off: int, n: int) -> bytes:
        return bytes(b[off:off + n])

    rtmrs = (f(328, 48), f(376, 48), f(424, 48), f(472, 48))
    return TdReportBody(
        tee_tcb_svn=f(0, 16), mr_seam=f(16, 48), mr_signer_seam=f(64, 48),
        seam_attributes=f(112, 8), td_attributes=f(120, 8), xfam=f(128, 8),
        mr_td=f(136, 48), mr_config_id=f(184, 48), mr_owner=f(232, 48),
        mr_owner_config=f(280, 48), rtmrs=rtmrs, report_data=f(520, 64),
        tee_tcb_svn2=f(584, 16) if len(b) == BODY_V15_SIZE else None,
        mr_servicetd=f(600, 48) if len(b) == BODY_V15_SIZE else None,
    )


def parse_sgx_report_body(b: bytes) -> SgxReportBody:
    if len(b) != QE_REPORT_SIZE:
        raise MalformedEvidence(f"SGX report body must be {QE_REPORT_SIZE} bytes")
    (misc,) = struct.unpack_from("<I", b, 16)
    prod, svn = struct.unpack_from("<HH", b, 256)
    return SgxReportBody(raw=bytes(b), cpu_svn=bytes(b[0:16]), misc_select=misc,
                         attributes=bytes(b[48:64]), mr_enclave=bytes(b[64:96]),
                         mr_signer=bytes(b[128:160]), isv_prod_id=prod, isv_svn=svn,
                         report_data=bytes(b[320:384]))


class _Reader:
    def __init__(self, data: bytes, end: int) -> None:
        self.data, self.pos, self.end = data, 0, end

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or n > self.end - self.pos:
            raise MalformedEvidence(f"TDX quote is truncated in {what}")
        out = bytes(self.data[self.pos:self.pos + n])
        self.pos += n
        return out

    def u16(self, what: str) -> int:
        return int(struct.unpack("<H", self.take(2, what))[0])

    def u32(self, what: str) -> int:
        return int(struct.unpack("<I", self.take(4, what))[0])


def parse_quote(data: bytes) -> TdxQuote:
    """Parse a v4/v5 TDX quote; :class:`MalformedEvidence` names the bad field."""
    if len(data) > MAX_QUOTE_SIZE:
        raise MalformedEvidence(f"TDX quote is {len(data)} bytes, more than {MAX_QUOTE_SIZE}")
    r = _Reader(data, len(data))
    header = r.take(HEADER_SIZE, "the header")
    version, att_key_type, tee_type = struct.unpack_from("<HHI", header, 0)
    if version not in (4, 5):
        raise MalformedEvidence(f"TDX quote version {version} is not 4 or 5")
    if att_key_type != ATT_KEY_TYPE_ECDSA_P256:
        raise MalformedEvidence(f"attestation key type {att_key_type} is not 2 (ECDSA P-256)")
    if tee_type != TEE_TYPE_TDX:
        raise MalformedEvidence(f"tee_type {tee_type:#x} is not 0x81 (TDX)")
    if version == 4:
        body_type, body_size = 2, BODY_V4_SIZE
        type_size = b""
    else:
        type_size = r.take(6, "the body type and size")
        body_type, body_size = struct.unpack("<HI", type_size)
        want = {2: BODY_V4_SIZE, 3: BODY_V15_SIZE}.get(body_type)
        if want is None:
            raise MalformedEvidence(f"v5 body type {body_type} is not 2 or 3 (TDX)")
        if body_size != want:
            raise MalformedEvidence(f"v5 body type {body_type} must be {want} bytes, "
                                    f"size says {body_size}")
    body_bytes = r.take(body_size, "the TD report body")
    signed = header + type_size + body_bytes
    sig_len = r.u32("sig_data_len")
    if sig_len > MAX_SIG_DATA:
        raise MalformedEvidence(f"sig_data_len {sig_len} is more than {MAX_SIG_DATA}")
    if sig_len > r.end - r.pos:
        raise MalformedEvidence("TDX quote is truncated in the signature data")
    r.end = r.pos + sig_len  # nothing past the declared signature data is read
    signature = r.take(64, "the quote signature")
    att_key = r.take(64, "the attestation key")
    cert_type = r.u16("the certification data type")
    if cert_type != CERT_TYPE_QE_REPORT:
        raise MalformedEvidence(f"certification data type {cert_type} is not 6 (QE report)")
    cert_size = r.u32("the certification data size")
    if cert_size != r.end - r.pos:
        raise MalformedEvidence(f"certification data size {cert_size} does not match the "
                                f"{r.end - r.pos} bytes left in the signature data")
    qe_report = parse_sgx_report_body(r.take(QE_REPORT_SIZE, "the QE report"))
    qe_sig = r.take(64, "the QE report signature")
    auth_len = r.u16("the QE auth data length")
    if auth_len > MAX_AUTH_DATA:
        raise MalformedEvidence(f"QE auth data length {auth_len} is more than {MAX_AUTH_DATA}")
    auth = r.take(auth_len, "the QE auth data")
    inner_type = r.u16("the PCK certification data type")
    if inner_type != CERT_TYPE_PCK_CHAIN:
        raise MalformedEvidence(f"PCK certification data type {inner_type} is not 5 "
                                "(PEM chain)")
    inner_size = r.u32("the PCK certification data size")
    if inner_size > MAX_CERT_DATA:
        raise MalformedEvidence(f"PCK chain size {inner_size} is more than {MAX_CERT_DATA}")
    if inner_size != r.end - r.pos:
        raise MalformedEvidence(f"PCK chain size {inner_size} does not match the "
                                f"{r.end - r.pos} bytes left in the certification data")
    chain = r.take(inner_size, "the PCK chain")
    return TdxQuote(
        version=version, att_key_type=att_key_type, tee_type=tee_type,
        qe_vendor_id=header[12:28], user_data=header[28:48], body_type=body_type,
        body=_parse_body(body_bytes), signed_bytes=signed, signature=signature,
        attestation_key=att_key, qe_report=qe_report, qe_report_signature=qe_sig,
        qe_auth_data=auth, pck_chain_pem=chain, declared_size=r.end)
