"""Node side: CPU TEE reports through the kernel's configfs-tsm interface, and composite
evidence for a confidential GPU node.

configfs-tsm (Linux 6.7+, ``Documentation/ABI/testing/configfs-tsm``) is the one interface
for TDX quotes and SEV-SNP reports: make a directory under
``/sys/kernel/config/tsm/report/``, write the 64-byte report data to ``inblob``, read
``outblob`` (a TDX DCAP quote, or an SEV-SNP report), ``auxblob`` (SEV-SNP: the certificate
table with the VCEK/VLEK and ASK) and ``provider`` (``tdx_guest`` / ``sev_guest``), and check
that ``generation`` did not move while reading (another writer would have changed the
report). The directory is removed afterwards.

SEV-SNP certificate table (auxblob): entries of GUID (16 bytes, little-endian UUID layout),
offset (u32 LE), length (u32 LE), ended by an all-zero entry; offsets are from the start of
the table. GUIDs: VCEK 63da758d-e664-4564-adc5-f4b93be8accd, VLEK
a8074bc2-a25a-483e-aae6-39c045a0b8a1, ASK 4ab7b379-bbac-4fe4-a02f-05aef327c782, ARK
c0b406a4-a803-4952-9743-3fb6014cd0ae (the ARK is never sent: the verifier pins its own).

``collect_composite(binding)`` asks every GPU for an SPDM report over ``binding`` (NVML), then
the CPU TEE for a report over ``binding || gpu_digest(gpus)`` (attest.composite).
"""

from __future__ import annotations

import os
import secrets
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path

from attest.composite import CompositeEvidence, cpu_report_data, encode_composite

__all__ = ["TSM_REPORT_ROOT", "TeeUnavailable", "TsmReport", "collect_composite",
           "configfs_tsm_report", "cpu_tee_evidence", "snp_certificates", "tee_interfaces"]

TSM_REPORT_ROOT = Path("/sys/kernel/config/tsm/report")
MAX_BLOB = 64 * 1024
_GUIDS = {
    uuid.UUID("63da758d-e664-4564-adc5-f4b93be8accd"): "vcek",
    uuid.UUID("a8074bc2-a25a-483e-aae6-39c045a0b8a1"): "vlek",
    uuid.UUID("4ab7b379-bbac-4fe4-a02f-05aef327c782"): "ask",
    uuid.UUID("c0b406a4-a803-4952-9743-3fb6014cd0ae"): "ark",
}


class TeeUnavailable(RuntimeError):
    """No CPU TEE report can be had here (no configfs-tsm, or not a TDX / SEV-SNP guest)."""


@dataclass(frozen=True, slots=True)
class TsmReport:
    provider: str
    outblob: bytes
    auxblob: bytes


def tee_interfaces() -> dict[str, bool]:
    """Which TEE guest interfaces this machine has (what `attest doctor` reports)."""
    return {"configfs_tsm": TSM_REPORT_ROOT.is_dir(),
            "tdx_guest": Path("/dev/tdx_guest").exists(),
            "sev_guest": Path("/dev/sev-guest").exists()}


def _read(path: Path) -> bytes:
    with open(path, "rb") as f:
        data = f.read(MAX_BLOB + 1)
    if len(data) > MAX_BLOB:
        raise TeeUnavailable(f"{path.name} is larger than {MAX_BLOB} bytes")
    return data


def configfs_tsm_report(report_data: bytes, *, root: Path = TSM_REPORT_ROOT,
                        attempts: int = 3) -> TsmReport:
    """One report over ``report_data`` (64 bytes) through configfs-tsm."""
    if len(report_data) != 64:
        raise ValueError("report data must be 64 bytes")
    if not root.is_dir():
        raise TeeUnavailable(f"{root} does not exist: no configfs-tsm (not a TDX / SEV-SNP "
                             "guest, or a kernel before 6.7)")
    entry = root / f"kmsbroker-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        entry.mkdir()
    except OSError as exc:
        raise TeeUnavailable(f"cannot create a configfs-tsm report: {exc.strerror}") from None
    try:
        for _ in range(attempts):
            (entry / "inblob").write_bytes(report_data)
            before = _read(entry / "generation")
            outblob = _read(entry / "outblob")
            auxblob = _read(entry / "auxblob") if (entry / "auxblob").exists() else b""
            provider = _read(entry / "provider").decode("ascii", "replace").strip()
            if _read(entry / "generation") == before:
                return TsmReport(provider=provider, outblob=outblob, auxblob=auxblob)
        raise TeeUnavailable("another writer kept changing the configfs-tsm report")
    finally:
        entry.rmdir()


def snp_certificates(auxblob: bytes) -> dict[str, bytes]:
    """The SEV-SNP certificate table as ``{"vcek"|"vlek"|"ask"|"ark": DER}``."""
    out: dict[str, bytes] = {}
    pos = 0
    while True:
        if len(auxblob) - pos < 24:
            raise TeeUnavailable("SEV-SNP certificate table is not terminated")
        guid = uuid.UUID(bytes_le=auxblob[pos:pos + 16])
        offset, length = struct.unpack_from("<II", auxblob, pos + 16)
        pos += 24
        if guid.int == 0 and offset == 0 and length == 0:
            return out
        if offset + length > len(auxblob) or length == 0:
            raise TeeUnavailable("SEV-SNP certificate table entry runs past the table")
        if guid in _GUIDS:
            out[_GUIDS[guid]] = auxblob[offset:offset + length]


def cpu_tee_evidence(report_data: bytes, *, root: Path = TSM_REPORT_ROOT) -> tuple[str, bytes]:
    """(kind, evidence) for this guest's CPU TEE: ``tdx`` (the quote) or ``sev-snp``."""
    report = configfs_tsm_report(report_data, root=root)
    if report.provider.startswith("tdx"):
        return "tdx", report.outblob
    if report.provider.startswith("sev"):
        from attest.snp import encode_evidence

        certs = snp_certificates(report.auxblob)
        leaf = certs.get("vlek") or certs.get("vcek")
        if leaf is None:
            raise TeeUnavailable("the SEV-SNP certificate table has no VCEK or VLEK (the host "
                                 "did not load certificates)")
        chain = [leaf] + ([certs["ask"]] if "ask" in certs else [])
        return "sev-snp", encode_evidence(report.outblob, chain)
    raise TeeUnavailable(f"configfs-tsm provider {report.provider!r} is not TDX or SEV-SNP")


def collect_composite(binding: bytes, *, root: Path = TSM_REPORT_ROOT) -> bytes:
    """``composite`` evidence over the session ``binding`` (32 bytes) for this node."""
    from attest.nvidia.nvml import collect_gpu_evidence

    gpus = collect_gpu_evidence(binding)
    kind, cpu = cpu_tee_evidence(cpu_report_data(binding, gpus), root=root)
    return encode_composite(CompositeEvidence(kind, cpu, tuple(gpus)))
