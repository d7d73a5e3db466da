"""TEST ONLY software TEE (like swtpm for the TPM): Intel TDX quotes and NVIDIA GPU SPDM
reports made on demand over a fresh nonce, signed by test roots.

Everything here is shaped like the real thing and goes through the production verifiers
unchanged: a DCAP v4 quote (header, TD report body, ECDSA P-256 quote signature by an
attestation key, QE report signed by a PCK certificate with the SGX extension, QE binding,
PCK chain to a root) with PCS-shaped TCB Info / QE Identity JSON signed by a TCB Signing
certificate and DER CRLs; an SPDM 1.1 GET_MEASUREMENTS request/response signed by a P-384
"GH100 A01 GSP FMC LF" leaf with the DICE FWID extension, chained to a device root, plus
XMLDSig-signed RIMs (signxml) chained to a RIM root. The roots are made in a test directory
and trusted only by the broker configurations the tests write (:meth:`SoftTdx.reference`,
:meth:`SoftGpu.reference`); production configurations trust the bundled Intel and NVIDIA
roots, which refuse all of this (tests/attest/test_softtee.py shows it).

State (keys, certificates, collateral, RIMs) lives in a directory, so a trainer subprocess
can ``load`` the same TEE the test created.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from attest.composite import CompositeEvidence, cpu_report_data, encode_composite
from attest.nvidia import encode_evidence as encode_gpu_evidence

__all__ = ["SoftGpu", "SoftSnp", "SoftTdx", "composite_evidence", "snp_composite_evidence"]

_NOT_BEFORE = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
_NOT_AFTER = dt.datetime(2045, 1, 1, tzinfo=dt.UTC)
QE_VENDOR = bytes.fromhex("939a7233f79c4ca9940a0db3957f0607")
QE_MRSIGNER = bytes.fromhex("dc9e2a7c6f948f17474e34a7fc43ed030f7c1563f1babddf6340c82e0e54a8c5")


# --- small helpers ------------------------------------------------------------------------------

def _der_len(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def _tlv(tag: int, body: bytes) -> bytes:
    return bytes([tag]) + _der_len(len(body)) + body


def _oid(dotted: str) -> bytes:
    parts = [int(p) for p in dotted.split(".")]
    out = bytearray([40 * parts[0] + parts[1]])
    for p in parts[2:]:
        chunk = [p & 0x7F]
        p >>= 7
        while p:
            chunk.append(0x80 | (p & 0x7F))
            p >>= 7
        out += bytes(reversed(chunk))
    return _tlv(0x06, bytes(out))


def _int(value: int) -> bytes:
    return _tlv(0x02, value.to_bytes(max(1, (value.bit_length() + 8) // 8), "big"))


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Soft TEE (test only)"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject: str, key: Any, issuer: tuple[x509.Certificate, Any] | None, *, ca: bool,
          digest: hashes.HashAlgorithm, extra: list[x509.ExtensionType] | None = None,
          unrecognized: list[tuple[str, bytes]] | None = None) -> x509.Certificate:
    issuer_cert, issuer_key = issuer if issuer else (None, key)
    builder = (x509.CertificateBuilder().subject_name(_name(subject))
               .issuer_name(issuer_cert.subject if issuer_cert else _name(subject))
               .public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(_NOT_BEFORE).not_valid_after(_NOT_AFTER)
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(
                   digital_signature=not ca, content_commitment=False, key_encipherment=False,
                   data_encipherment=False, key_agreement=False, key_cert_sign=ca,
                   crl_sign=ca, encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                              critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                   issuer_key.public_key()), critical=False))
    for ext in extra or []:
        builder = builder.add_extension(ext, critical=False)
    for oid, value in unrecognized or []:
        builder = builder.add_extension(
            x509.UnrecognizedExtension(x509.ObjectIdentifier(oid), value), critical=False)
    return builder.sign(issuer_key, digest)


def _rs(key: ec.EllipticCurvePrivateKey, message: bytes, digest: hashes.HashAlgorithm,
        size: int) -> bytes:
    r, s = decode_dss_signature(key.sign(message, ec.ECDSA(digest)))
    return r.to_bytes(size, "big") + s.to_bytes(size, "big")


def _save_key(path: Path, key: Any) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))


def _load_key(path: Path) -> Any:
    return serialization.load_pem_private_key(path.read_bytes(), password=None)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


# --- TDX ----------------------------------------------------------------------------------------

SGX_SVNS = (5, 5, 2, 2, 3, 1, 0, 3, 0, 0, 0, 0, 0, 0, 0, 0)
# the software TD's "image": MRTD (firmware), RTMR1 (kernel), RTMR2 (command line, initrd)
SOFT_TD_MEASUREMENTS = {
    "mr_td": hashlib.sha384(b"soft td firmware").hexdigest(),
    "rtmr1": hashlib.sha384(b"soft td kernel").hexdigest(),
    "rtmr2": hashlib.sha384(b"soft td cmdline and initrd with the trainer").hexdigest(),
}
UP_TO_DATE_TEE_TCB_SVN = bytes([3, 0, 5]) + bytes(13)
OUT_OF_DATE_TEE_TCB_SVN = bytes([3, 0, 2]) + bytes(13)


def _sgx_extension(fmspc: bytes, instance: bytes) -> bytes:
    arc = "1.2.840.113741.1.13.1"
    comps = b"".join(_tlv(0x30, _oid(f"{arc}.2.{i + 1}") + _int(svn))
                     for i, svn in enumerate(SGX_SVNS))
    comps += _tlv(0x30, _oid(f"{arc}.2.17") + _int(11))
    comps += _tlv(0x30, _oid(f"{arc}.2.18") + _tlv(0x04, bytes(SGX_SVNS)))
    body = (_tlv(0x30, _oid(f"{arc}.1") + _tlv(0x04, os.urandom(16)))
            + _tlv(0x30, _oid(f"{arc}.2") + _tlv(0x30, comps))
            + _tlv(0x30, _oid(f"{arc}.3") + _tlv(0x04, b"\x00\x00"))
            + _tlv(0x30, _oid(f"{arc}.4") + _tlv(0x04, fmspc))
            + _tlv(0x30, _oid(f"{arc}.5") + _tlv(0x0A, b"\x01"))
            + _tlv(0x30, _oid(f"{arc}.6") + _tlv(0x04, instance)))
    return _tlv(0x30, body)


def _svn_list(svns: bytes | tuple[int, ...]) -> list[dict[str, int]]:
    return [{"svn": v} for v in svns]


def _signed_json(member: str, value: dict[str, Any], key: ec.EllipticCurvePrivateKey) -> bytes:
    body = json.dumps(value, separators=(",", ":")).encode()
    signature = _rs(key, body, hashes.SHA256(), 32).hex()
    return b'{"' + member.encode() + b'":' + body + b',"signature":"' + signature.encode() + b'"}'


class TcbInfoDoc:
    @staticmethod
    def member(path: Path, name: str) -> bytes:
        from attest.tdx.collateral import signed_members

        return signed_members(path.read_bytes(), name)[name][1]


@dataclass
class SoftTdx:
    """A test TDX platform: PCK certificate, quoting enclave, collateral; see the module doc."""

    directory: Path
    root: x509.Certificate
    platform_ca: x509.Certificate
    pck: x509.Certificate
    pck_key: ec.EllipticCurvePrivateKey
    attestation_key: ec.EllipticCurvePrivateKey
    fmspc: bytes = bytes.fromhex("00aabbccdd00")

    @classmethod
    def create(cls, directory: Path) -> SoftTdx:
        directory.mkdir(parents=True, exist_ok=True)
        root_key, ca_key, pck_key, signing_key, att_key = (
            ec.generate_private_key(ec.SECP256R1()) for _ in range(5))
        sha = hashes.SHA256()
        root = _cert("Soft TEE SGX Root CA", root_key, None, ca=True, digest=sha)
        ca = _cert("Soft TEE SGX PCK Platform CA", ca_key, (root, root_key), ca=True, digest=sha)
        fmspc = bytes.fromhex("00aabbccdd00")
        pck = _cert("Soft TEE SGX PCK Certificate", pck_key, (ca, ca_key), ca=False, digest=sha,
                    unrecognized=[("1.2.840.113741.1.13.1",
                                   _sgx_extension(fmspc, os.urandom(16)))])
        signer = _cert("Soft TEE SGX TCB Signing", signing_key, (root, root_key), ca=False,
                       digest=sha)
        for name, key in (("root", root_key), ("ca", ca_key), ("pck", pck_key),
                          ("signing", signing_key), ("attestation", att_key)):
            _save_key(directory / f"{name}.key", key)
        (directory / "root.pem").write_bytes(_pem(root))
        (directory / "chain.pem").write_bytes(_pem(pck) + _pem(ca) + _pem(root))
        (directory / "signing_chain.pem").write_bytes(_pem(signer) + _pem(root))
        now = dt.datetime.now(dt.UTC)
        for name, issuer, issuer_key in (("pck.crl", ca, ca_key), ("root.crl", root, root_key)):
            crl = (x509.CertificateRevocationListBuilder().issuer_name(issuer.subject)
                   .last_update(now - dt.timedelta(days=1))
                   .next_update(now + dt.timedelta(days=30)).sign(issuer_key, sha))
            (directory / name).write_bytes(crl.public_bytes(serialization.Encoding.DER))
        stamp = {"issueDate": (now - dt.timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ"),
                 "nextUpdate": (now + dt.timedelta(days=30)).strftime("%Y-%m-%dT%H:%M:%SZ")}
        level = {"sgxtcbcomponents": _svn_list(SGX_SVNS), "pcesvn": 11}
        tcb_info = {
            "id": "TDX", "version": 3, **stamp, "fmspc": fmspc.hex(), "pceId": "0000",
            "tcbType": 0, "tcbEvaluationDataNumber": 17,
            "tdxModule": {"mrsigner": "00" * 48, "attributes": "00" * 8,
                          "attributesMask": "ff" * 8},
            "tcbLevels": [
                {"tcb": {**level, "tdxtcbcomponents": _svn_list(UP_TO_DATE_TEE_TCB_SVN)},
                 "tcbDate": "2024-03-13T00:00:00Z", "tcbStatus": "UpToDate"},
                {"tcb": {**level, "tdxtcbcomponents": _svn_list(OUT_OF_DATE_TEE_TCB_SVN)},
                 "tcbDate": "2023-08-09T00:00:00Z", "tcbStatus": "OutOfDate",
                 "advisoryIDs": ["INTEL-SA-00837"]},
            ]}
        qe_identity = {
            "id": "TD_QE", "version": 2, **stamp, "tcbEvaluationDataNumber": 17,
            "miscselect": "00000000", "miscselectMask": "FFFFFFFF",
            "attributes": "11000000000000000000000000000000",
            "attributesMask": "FBFFFFFFFFFFFFFF0000000000000000",
            "mrsigner": QE_MRSIGNER.hex().upper(), "isvprodid": 2,
            "tcbLevels": [{"tcb": {"isvsvn": 4}, "tcbDate": "2024-03-13T00:00:00Z",
                           "tcbStatus": "UpToDate"}]}
        (directory / "tcb_info.json").write_bytes(_signed_json("tcbInfo", tcb_info, signing_key))
        (directory / "qe_identity.json").write_bytes(
            _signed_json("enclaveIdentity", qe_identity, signing_key))
        return cls(directory, root, ca, pck, pck_key, att_key, fmspc)

    @classmethod
    def load(cls, directory: Path) -> SoftTdx:
        pck, ca, root = x509.load_pem_x509_certificates((directory / "chain.pem").read_bytes())
        return cls(directory, root, ca, pck, _load_key(directory / "pck.key"),
                   _load_key(directory / "attestation.key"))

    def collateral(self, *, tcb_levels: list[tuple[bytes, str]] | None = None,
                   qe_levels: list[tuple[int, str]] | None = None,
                   module_identities: list[dict[str, Any]] | None = None,
                   revoke_pck: bool = False) -> Any:
        """A TdxCollateral signed by this TEE's TCB Signing key with the given TCB levels
        (TEE_TCB_SVN, status), QE levels (ISVSVN, status) and TDX module identities."""
        from attest.tdx import TdxCollateral

        d = self.directory
        key = _load_key(d / "signing.key")
        tcb_info = json.loads(TcbInfoDoc.member(d / "tcb_info.json", "tcbInfo"))
        qe = json.loads(TcbInfoDoc.member(d / "qe_identity.json", "enclaveIdentity"))
        level = {"sgxtcbcomponents": _svn_list(SGX_SVNS), "pcesvn": 11}
        if tcb_levels is not None:
            tcb_info["tcbLevels"] = [
                {"tcb": {**level, "tdxtcbcomponents": _svn_list(svn)},
                 "tcbDate": "2024-03-13T00:00:00Z", "tcbStatus": status,
                 "advisoryIDs": [f"INTEL-SA-{i:05d}"]}
                for i, (svn, status) in enumerate(tcb_levels)]
        if module_identities is not None:
            tcb_info["tdxModuleIdentities"] = module_identities
        if qe_levels is not None:
            qe["tcbLevels"] = [{"tcb": {"isvsvn": svn}, "tcbDate": "2024-03-13T00:00:00Z",
                                "tcbStatus": status} for svn, status in qe_levels]
        pck_crl = (d / "pck.crl").read_bytes()
        if revoke_pck:
            now = dt.datetime.now(dt.UTC)
            entry = (x509.RevokedCertificateBuilder().serial_number(self.pck.serial_number)
                     .revocation_date(now - dt.timedelta(hours=1)).build())
            pck_crl = (x509.CertificateRevocationListBuilder()
                       .issuer_name(self.platform_ca.subject)
                       .last_update(now - dt.timedelta(hours=1))
                       .next_update(now + dt.timedelta(days=30)).add_revoked_certificate(entry)
                       .sign(_load_key(d / "ca.key"), hashes.SHA256())
                       .public_bytes(serialization.Encoding.DER))
        return TdxCollateral.load(
            tcb_info=_signed_json("tcbInfo", tcb_info, key),
            qe_identity=_signed_json("enclaveIdentity", qe, key),
            signing_chain_pem=(d / "signing_chain.pem").read_bytes(),
            pck_crl_der=pck_crl, root_crl_der=(d / "root.crl").read_bytes())

    def trust_store(self) -> Any:
        from attest.tdx import IntelTrustStore

        return IntelTrustStore(roots=(self.root,))

    def reference(self) -> dict[str, Any]:
        """The broker's ``reference_values`` entry for ``tdx`` that trusts this test TEE."""
        d = self.directory
        return {"roots": [str(d / "root.pem")],
                "collateral": {"tcb_info": str(d / "tcb_info.json"),
                               "qe_identity": str(d / "qe_identity.json"),
                               "signing_chain": str(d / "signing_chain.pem"),
                               "pck_crl": str(d / "pck.crl"), "root_crl": str(d / "root.crl")}}

    def quote(self, report_data: bytes, *, debug: bool = False,
              tee_tcb_svn: bytes = UP_TO_DATE_TEE_TCB_SVN, mr_td: bytes | None = None,
              rtmr3: bytes = bytes(48)) -> bytes:
        """A DCAP v4 quote over ``report_data`` (64 bytes)."""
        if len(report_data) != 64 or len(tee_tcb_svn) != 16 or len(rtmr3) != 48:
            raise ValueError("report_data 64, tee_tcb_svn 16 and rtmr3 48 bytes")
        header = struct.pack("<HHI", 4, 2, 0x81) + bytes(4) + QE_VENDOR + os.urandom(16) + \
            bytes(4)
        td_attributes = (1 << 28) | (1 if debug else 0)
        m = {k: bytes.fromhex(v) for k, v in SOFT_TD_MEASUREMENTS.items()}
        body = (tee_tcb_svn + hashlib.sha384(b"soft seam").digest() + bytes(48) + bytes(8)
                + struct.pack("<Q", td_attributes) + struct.pack("<Q", 0x0006_1ae7)
                + (mr_td or m["mr_td"]) + bytes(48 * 3)
                + hashlib.sha384(b"soft rtmr0").digest() + m["rtmr1"] + m["rtmr2"] + rtmr3
                + report_data)
        signed = header + body
        att_pub = self.attestation_key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)[1:]
        auth = bytes(range(32))
        qe = bytearray(384)
        qe[48:64] = bytes.fromhex("11000000000000000000000000000000")
        qe[64:96] = hashlib.sha256(b"soft qe").digest()
        qe[128:160] = QE_MRSIGNER
        struct.pack_into("<HH", qe, 256, 2, 4)
        qe[320:352] = hashlib.sha256(att_pub + auth).digest()
        chain = (self.directory / "chain.pem").read_bytes()
        certification = (bytes(qe) + _rs(self.pck_key, bytes(qe), hashes.SHA256(), 32)
                         + struct.pack("<H", len(auth)) + auth
                         + struct.pack("<HI", 5, len(chain)) + chain)
        sig_data = (_rs(self.attestation_key, signed, hashes.SHA256(), 32) + att_pub
                    + struct.pack("<HI", 6, len(certification)) + certification)
        return signed + struct.pack("<I", len(sig_data)) + sig_data


# --- NVIDIA GPU ---------------------------------------------------------------------------------

DRIVER_VERSION = "570.124.06"
VBIOS_BYTES = bytes.fromhex("00b3009601000000")  # "96.00.b3.00.01"
VBIOS_VERSION = "96.00.b3.00.01"
DRIVER_INDICES = range(20, 30)
VBIOS_INDICES = range(0, 10)


def _golden_value(index: int) -> bytes:
    return hashlib.sha384(f"soft gpu measurement {index}".encode()).digest()


def _rim_xml(version: str, indices: range) -> bytes:
    swid = "http://standards.iso.org/iso/19770/-2/2015/schema.xsd"
    sha = "http://www.w3.org/2001/04/xmlenc#sha384"
    resources = "".join(
        f'<Resource type="Measurement" index="{i}" active="True" alternatives="1" '
        f'ns2:Hash0="{_golden_value(i).hex()}" name="Measurement_{i}" size="48"/>'
        for i in indices)
    return (f'<SoftwareIdentity xmlns="{swid}" xmlns:ns2="{sha}" name="GH100" '
            f'tagId="soft-{version}" version="1.0"><Meta colloquialVersion="{version}" '
            f'product="GH100"/><Payload>{resources}</Payload></SoftwareIdentity>').encode()


@dataclass
class SoftGpu:
    """A test Hopper GPU: device identity chain, SPDM measurements, RIMs; see the module doc."""

    directory: Path
    chain: list[x509.Certificate]  # leaf, ICA, root
    leaf_key: ec.EllipticCurvePrivateKey
    fwid: bytes

    @classmethod
    def create(cls, directory: Path) -> SoftGpu:
        from lxml import etree
        from signxml import (
            CanonicalizationMethod,
            DigestAlgorithm,
            SignatureMethod,
            XMLSigner,
            methods,
        )

        directory.mkdir(parents=True, exist_ok=True)
        sha = hashes.SHA384()
        root_key, ica_key, leaf_key, rim_root_key, rim_key = (
            ec.generate_private_key(ec.SECP384R1()) for _ in range(5))
        root = _cert("Soft TEE Device Identity CA", root_key, None, ca=True, digest=sha)
        ica = _cert("Soft TEE GH100 Provisioner ICA", ica_key, (root, root_key), ca=True,
                    digest=sha)
        fwid = hashlib.sha384(b"soft gsp fmc").digest()
        dice = _tlv(0x30, _tlv(0xA6, _tlv(0x30, _oid("2.16.840.1.101.3.4.2.2")
                                           + _tlv(0x04, fwid))))
        leaf = _cert("GH100 A01 GSP FMC LF", leaf_key, (ica, ica_key), ca=False, digest=sha,
                     unrecognized=[("2.23.133.5.4.1", dice)])
        rim_root = _cert("Soft TEE CoRIM signing Root CA", rim_root_key, None, ca=True,
                         digest=sha)
        rim_signer = _cert("Soft TEE RIM Signer", rim_key, (rim_root, rim_root_key), ca=False,
                           digest=sha)
        _save_key(directory / "leaf.key", leaf_key)
        (directory / "chain.pem").write_bytes(_pem(leaf) + _pem(ica) + _pem(root))
        (directory / "device_root.pem").write_bytes(_pem(root))
        (directory / "rim_root.pem").write_bytes(_pem(rim_root))
        (directory / "fwid").write_bytes(fwid)
        signer = XMLSigner(method=methods.enveloped,
                           signature_algorithm=SignatureMethod.ECDSA_SHA384,
                           digest_algorithm=DigestAlgorithm.SHA384,
                           c14n_algorithm=CanonicalizationMethod.CANONICAL_XML_1_1)
        certs = [_pem(rim_signer).decode(), _pem(rim_root).decode()]
        for name, version, indices in (("driver.swidtag", DRIVER_VERSION, DRIVER_INDICES),
                                       ("vbios.swidtag", VBIOS_VERSION, VBIOS_INDICES)):
            signed = signer.sign(etree.fromstring(_rim_xml(version, indices)), key=rim_key,
                                 cert=certs)
            (directory / name).write_bytes(etree.tostring(signed))
        return cls(directory, [leaf, ica, root], leaf_key, fwid)

    @classmethod
    def load(cls, directory: Path) -> SoftGpu:
        chain = x509.load_pem_x509_certificates((directory / "chain.pem").read_bytes())
        return cls(directory, chain, _load_key(directory / "leaf.key"),
                   (directory / "fwid").read_bytes())

    def reference(self) -> dict[str, Any]:
        """The broker's ``reference_values`` entry for ``nvidia-gpu`` that trusts this GPU."""
        d = self.directory
        return {"device_roots": [str(d / "device_root.pem")],
                "rim_roots": [str(d / "rim_root.pem")],
                "driver_rims": [str(d / "driver.swidtag")],
                "vbios_rims": [str(d / "vbios.swidtag")]}

    def evidence(self, nonce: bytes, *, cc_mode: str = "on",
                 tampered_measurement: int | None = None, index: int = 0) -> bytes:
        """``nvidia-gpu`` evidence: an SPDM report over ``nonce`` plus NVML-shaped facts."""
        request = bytes([0x11, 0xE0, 0x01, 0xFF]) + nonce + b"\x00"
        blocks = b""
        for i in range(1, 65):
            value = _golden_value(i - 1)
            if tampered_measurement is not None and i - 1 == tampered_measurement:
                value = hashlib.sha384(b"tampered").digest()
            blocks += struct.pack("<BBHBH", i, 1, 51, 1, 48) + value
        tlvs = [(3, DRIVER_VERSION.encode() + b"\x00"), (6, VBIOS_BYTES), (14, b"\xb1\x03\x00\x00"),
                (15, b"882\x00"), (17, b"1010\x00"), (18, b"0200\x00"), (20, self.fwid)]
        opaque = b"".join(struct.pack("<HH", t, len(v)) + v for t, v in tlvs)
        response = (bytes([0x11, 0x60, 0x00, 0x00, 64]) + len(blocks).to_bytes(3, "little")
                    + blocks + os.urandom(32) + struct.pack("<H", len(opaque)) + opaque)
        report = request + response
        report += _rs(self.leaf_key, report, hashes.SHA384(), 48)
        facts = {"cc_mode": cc_mode, "cc_ready": cc_mode == "on", "architecture": "Hopper",
                 "driver_version": DRIVER_VERSION, "compute_mode": "exclusive_process",
                 "mig_mode": False, "other_processes": 0, "ecc": True,
                 "uuid": f"GPU-soft-{index}"}
        return encode_gpu_evidence(
            report, [c.public_bytes(serialization.Encoding.DER) for c in self.chain], facts)


def composite_evidence(tdx: SoftTdx, gpus: list[SoftGpu], binding: bytes, *,
                       debug: bool = False, tee_tcb_svn: bytes = UP_TO_DATE_TEE_TCB_SVN,
                       rtmr3: bytes = bytes(48), gpu_cc_modes: list[str] | None = None,
                       gpu_nonces: list[bytes] | None = None) -> bytes:
    """A confidential GPU node's ``composite`` evidence over the session ``binding``."""
    modes = gpu_cc_modes or ["on"] * len(gpus)
    nonces = gpu_nonces or [binding] * len(gpus)
    gpu_evidence = [gpu.evidence(nonce, cc_mode=mode, index=i)
                    for i, (gpu, mode, nonce) in enumerate(zip(gpus, modes, nonces, strict=True))]
    quote = tdx.quote(cpu_report_data(binding, gpu_evidence), debug=debug,
                      tee_tcb_svn=tee_tcb_svn, rtmr3=rtmr3)
    return encode_composite(CompositeEvidence("tdx", quote, tuple(gpu_evidence)))


# --- AMD SEV-SNP ----------------------------------------------------------------------------------

SNP_TCB = bytes([3, 0, 0, 0, 0, 0, 8, 115])  # bl 3, tee 0, snp 8, ucode 115 (Milan layout)


@dataclass
class SoftSnp:
    """A test Milan-shaped SEV-SNP platform: ARK -> ASK -> VCEK (RSA-PSS links, a P-384
    VCEK with the SPL, hwID and productName extensions) and v3 reports on demand. Its
    ``trust_store()`` is an AmdTrustStore pinning only the test ARK."""

    vcek: x509.Certificate
    vcek_key: ec.EllipticCurvePrivateKey
    ask: x509.Certificate
    ark: x509.Certificate
    chip_id: bytes

    @classmethod
    def create(cls) -> SoftSnp:
        from cryptography.hazmat.primitives.asymmetric import padding, rsa

        pss = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)
        ark_key, ask_key = (rsa.generate_private_key(65537, 2048) for _ in range(2))
        vcek_key = ec.generate_private_key(ec.SECP384R1())

        def name(cn: str) -> x509.Name:
            return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Soft TEE"),
                              x509.NameAttribute(NameOID.COMMON_NAME, cn)])

        def build(subject: str, issuer: str, key: Any, signer: Any, ca: bool,
                  exts: list[tuple[str, bytes]] = ()) -> x509.Certificate:
            b = (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(name(issuer))
                 .public_key(key.public_key()).serial_number(x509.random_serial_number())
                 .not_valid_before(_NOT_BEFORE).not_valid_after(_NOT_AFTER)
                 .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
            for oid, value in exts:
                b = b.add_extension(x509.UnrecognizedExtension(x509.ObjectIdentifier(oid),
                                                               value), critical=False)
            return b.sign(signer, hashes.SHA384(), rsa_padding=pss)

        chip_id = os.urandom(64)
        spl = {"1": SNP_TCB[0], "2": SNP_TCB[1], "3": SNP_TCB[6], "8": SNP_TCB[7]}
        exts = [(f"1.3.6.1.4.1.3704.1.3.{k}", _int(v)) for k, v in spl.items()]
        exts += [("1.3.6.1.4.1.3704.1.4", chip_id),
                 ("1.3.6.1.4.1.3704.1.2", _tlv(0x16, b"Milan-B0"))]
        ark = build("ARK-Milan", "ARK-Milan", ark_key, ark_key, True)
        ask = build("SEV-Milan", "ARK-Milan", ask_key, ark_key, True)
        vcek = build("SEV-VCEK", "SEV-Milan", vcek_key, ask_key, False, exts)
        return cls(vcek, vcek_key, ask, ark, chip_id)

    def trust_store(self) -> Any:
        from attest.snp import AmdTrustStore

        return AmdTrustStore.from_certificates([self.ark], [self.ask])

    def evidence(self, report_data: bytes, *, debug: bool = False,
                 measurement: bytes | None = None) -> bytes:
        """``sev-snp`` evidence: a v3 report over ``report_data`` (64 bytes) + the VCEK."""
        from attest.snp import encode_evidence

        if len(report_data) != 64:
            raise ValueError("report_data must be 64 bytes")
        r = bytearray(0x4A0)
        policy = (1 << 17) | (1 << 16) | ((1 << 19) if debug else 0)
        struct.pack_into("<IIQ", r, 0, 3, 1, policy)
        struct.pack_into("<II", r, 0x30, 0, 1)  # vmpl 0, signature algo ECDSA P-384
        for offset in (0x38, 0x180, 0x1E0, 0x1F0):
            r[offset:offset + 8] = SNP_TCB
        struct.pack_into("<QI", r, 0x40, 1, 0)  # platform info: SMT; key info: VCEK
        r[0x50:0x90] = report_data
        r[0x90:0xC0] = measurement or hashlib.sha384(b"soft snp guest").digest()
        r[0x160:0x180] = b"\xff" * 32  # no migration agent
        r[0x188:0x18B] = bytes([0x19, 0x01, 0x01])  # CPUID family/model/stepping (Milan)
        r[0x1A0:0x1E0] = self.chip_id
        r[0x1E8:0x1EB] = r[0x1EC:0x1EF] = bytes([4, 52, 1])
        der = self.vcek_key.sign(bytes(r[:0x2A0]), ec.ECDSA(hashes.SHA384()))
        sig_r, sig_s = decode_dss_signature(der)
        r[0x2A0:0x2E8] = sig_r.to_bytes(72, "little")
        r[0x2E8:0x330] = sig_s.to_bytes(72, "little")
        return encode_evidence(bytes(r), [self.vcek.public_bytes(serialization.Encoding.DER)])


def snp_composite_evidence(snp: SoftSnp, gpus: list[SoftGpu], binding: bytes, *,
                           debug: bool = False) -> bytes:
    """A confidential GPU node's ``composite`` evidence with an SEV-SNP CPU report."""
    gpu_evidence = [gpu.evidence(binding, index=i) for i, gpu in enumerate(gpus)]
    cpu = snp.evidence(cpu_report_data(binding, gpu_evidence), debug=debug)
    return encode_composite(CompositeEvidence("sev-snp", cpu, tuple(gpu_evidence)))
