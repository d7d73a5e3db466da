"""``composite`` evidence: a confidential GPU node's CPU TEE report, one ``nvidia-gpu`` report
per GPU and optionally a TPM quote, in one Attest, all bound to the one session.

Container (integers big-endian):

======  ======  ================================================================
offset  size    field
======  ======  ================================================================
0       4       magic ``b"CMPE"``
4       1       container version, 1
5       1       entry count n (1..:data:`MAX_ENTRIES`)
6       2       reserved, zero
8       ...     n entries: u8 kind length K (1..32), K bytes ASCII kind,
                u32 payload length P (1..:data:`MAX_ENTRY_SIZE`), P bytes payload
======  ======  ================================================================

Nothing may follow the last entry. Exactly one entry is a CPU TEE report (``tdx`` or
``sev-snp``), up to :data:`MAX_GPUS` are ``nvidia-gpu`` (in GPU index order) and at most one
is ``tpm2``.

**Binding.** With ``B`` = the session binding (``attest.interface.expected_report_data``,
32 bytes): every GPU report's SPDM request nonce is ``B``; a TPM quote's qualifying data is
``B``; the CPU report's 64-byte report data is ``B || G`` where ``G`` = :func:`gpu_digest` =
SHA-256("kmsbroker/v1/gpu-evidence\\0" || BE16 n || for each GPU evidence: BE32 length ||
bytes). So a GPU report lifted from another machine or session fails either its nonce or the
CPU report, and dropping or reordering GPU reports changes ``G``.

**Claims** (what a policy sees): the CPU verifier's own claims (``tdx.*`` or ``snp.*``) plus
``cpu.kind``, ``cpu.verified``, ``cpu.debug``, ``cpu.tcb_status`` (TDX: the TCB status;
SEV-SNP: "n/a", policies compare ``snp.tcb.reported.*``); ``gpu.count`` and ``gpus``, a list
with one map per GPU (the ``nvidia.*`` claims without the prefix and with ``_`` for inner
dots, e.g. ``cc_mode``, ``measurements_matched``, plus ``index`` and ``verified``); the TPM
verifier's claims plus ``tpm.present`` and ``tpm.verified``. Failures keep their ids under a
prefix naming the part: ``cpu.tdx.report_data``, ``gpu1.nvidia.nonce``, ``tpm.tpm2.signature``.

Context: ``reference[kind]`` is handed to the verifier of that kind (``reference["now"]``
to all of them); ``node`` to the CPU and TPM verifiers.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from attest.interface import (
    EvidenceVerifier,
    Failure,
    MalformedEvidence,
    VerificationContext,
    VerificationResult,
)

__all__ = [
    "CPU_KINDS",
    "CompositeEvidence",
    "CompositeVerifier",
    "cpu_report_data",
    "decode_composite",
    "encode_composite",
    "gpu_digest",
]

MAGIC = b"CMPE"
VERSION = 1
MAX_ENTRIES = 10
MAX_GPUS = 8
MAX_ENTRY_SIZE = 256 * 1024
MAX_COMPOSITE_SIZE = 8 + MAX_ENTRIES * (1 + 32 + 4 + MAX_ENTRY_SIZE)
CPU_KINDS = ("tdx", "sev-snp")
GPU_KIND = "nvidia-gpu"
TPM_KIND = "tpm2"
GPU_DIGEST_DOMAIN = b"kmsbroker/v1/gpu-evidence\x00"


@dataclass(frozen=True, slots=True)
class CompositeEvidence:
    cpu_kind: str
    cpu: bytes
    gpus: tuple[bytes, ...]
    tpm: bytes | None = None


def gpu_digest(gpus: Sequence[bytes]) -> bytes:
    h = hashlib.sha256(GPU_DIGEST_DOMAIN)
    h.update(struct.pack(">H", len(gpus)))
    for evidence in gpus:
        h.update(struct.pack(">I", len(evidence)))
        h.update(evidence)
    return h.digest()


def cpu_report_data(binding: bytes, gpus: Sequence[bytes]) -> bytes:
    """The 64 bytes the CPU TEE report must carry: ``binding || gpu_digest(gpus)``."""
    if len(binding) != 32:
        raise ValueError("the session binding must be 32 bytes")
    return binding + gpu_digest(gpus)


def encode_composite(evidence: CompositeEvidence) -> bytes:
    entries = [(evidence.cpu_kind, evidence.cpu)] + [(GPU_KIND, g) for g in evidence.gpus]
    if evidence.tpm is not None:
        entries.append((TPM_KIND, evidence.tpm))
    if evidence.cpu_kind not in CPU_KINDS:
        raise ValueError(f"CPU evidence kind must be one of {CPU_KINDS}")
    if len(evidence.gpus) > MAX_GPUS:
        raise ValueError(f"at most {MAX_GPUS} GPU reports")
    out = bytearray(MAGIC) + struct.pack(">BBH", VERSION, len(entries), 0)
    for kind, payload in entries:
        if not 0 < len(payload) <= MAX_ENTRY_SIZE:
            raise ValueError(f"{kind} payload length is outside 1..{MAX_ENTRY_SIZE}")
        out += bytes([len(kind)]) + kind.encode() + struct.pack(">I", len(payload)) + payload
    return bytes(out)


def decode_composite(data: bytes) -> CompositeEvidence:
    if len(data) > MAX_COMPOSITE_SIZE:
        raise MalformedEvidence(f"composite evidence is more than {MAX_COMPOSITE_SIZE} bytes")
    if len(data) < 8 or data[:4] != MAGIC:
        raise MalformedEvidence("composite evidence does not start with the 'CMPE' header")
    version, count, reserved = struct.unpack_from(">BBH", data, 4)
    if version != VERSION or reserved:
        raise MalformedEvidence(f"composite evidence container version {version} is unknown")
    if not 1 <= count <= MAX_ENTRIES:
        raise MalformedEvidence(f"composite evidence has {count} entries, expected "
                                f"1..{MAX_ENTRIES}")
    pos = 8
    cpu: list[tuple[str, bytes]] = []
    gpus: list[bytes] = []
    tpms: list[bytes] = []
    for i in range(count):
        if len(data) - pos < 1:
            raise MalformedEvidence(f"composite evidence is truncated before entry {i}")
        klen = data[pos]
        pos += 1
        if not 1 <= klen <= 32 or len(data) - pos < klen + 4:
            raise MalformedEvidence(f"entry {i} kind is out of range or truncated")
        try:
            kind = bytes(data[pos:pos + klen]).decode("ascii")
        except UnicodeDecodeError:
            raise MalformedEvidence(f"entry {i} kind is not ASCII") from None
        pos += klen
        (plen,) = struct.unpack_from(">I", data, pos)
        pos += 4
        if not 1 <= plen <= MAX_ENTRY_SIZE or plen > len(data) - pos:
            raise MalformedEvidence(f"entry {i} ({kind}) length {plen} is out of range or "
                                    "truncated")
        payload = bytes(data[pos:pos + plen])
        pos += plen
        if kind in CPU_KINDS:
            cpu.append((kind, payload))
        elif kind == GPU_KIND:
            gpus.append(payload)
        elif kind == TPM_KIND:
            tpms.append(payload)
        else:
            raise MalformedEvidence(f"entry {i} kind {kind!r} cannot be part of composite "
                                    "evidence")
    if pos != len(data):
        raise MalformedEvidence(f"composite evidence has {len(data) - pos} trailing bytes")
    if len(cpu) != 1:
        raise MalformedEvidence(f"composite evidence must hold exactly one CPU TEE report "
                                f"(tdx or sev-snp), not {len(cpu)}")
    if len(gpus) > MAX_GPUS or len(tpms) > 1:
        raise MalformedEvidence(f"composite evidence holds {len(gpus)} GPU reports (at most "
                                f"{MAX_GPUS}) and {len(tpms)} TPM quotes (at most 1)")
    return CompositeEvidence(cpu_kind=cpu[0][0], cpu=cpu[0][1], gpus=tuple(gpus),
                             tpm=tpms[0] if tpms else None)


def _sub_context(context: VerificationContext, kind: str, expected: bytes, *,
                 with_node: bool) -> VerificationContext:
    raw = context.reference.get(kind, {})
    reference = dict(raw) if isinstance(raw, Mapping) else {}
    if "now" in context.reference and "now" not in reference:
        reference["now"] = context.reference["now"]
    return VerificationContext(expected_report_data=expected,
                               node=context.node if with_node else {}, reference=reference)


def _prefixed(prefix: str, failures: Sequence[Failure]) -> list[Failure]:
    return [Failure(f"{prefix}.{f.id}", f.message, f.severity) for f in failures]


class CompositeVerifier:
    """Verifies ``composite`` evidence with the verifier of each part (see the module doc)."""

    kind = "composite"

    def __init__(self, verifiers: Mapping[str, EvidenceVerifier] | None = None) -> None:
        if verifiers is None:
            from attest.nvidia import NvidiaGpuVerifier
            from attest.snp import SnpVerifier
            from attest.tdx import TdxVerifier

            parts: dict[str, EvidenceVerifier] = {
                "tdx": TdxVerifier(), "sev-snp": SnpVerifier(), GPU_KIND: NvidiaGpuVerifier()}
            try:
                from attest.tpm2.verifier import Tpm2Verifier
            except ImportError:  # pragma: no cover - tpm2-pytss missing
                pass
            else:
                parts[TPM_KIND] = Tpm2Verifier()
            verifiers = parts
        self._verifiers = dict(verifiers)

    def _verifier(self, kind: str) -> EvidenceVerifier:
        verifier = self._verifiers.get(kind)
        if verifier is None:
            raise MalformedEvidence(f"no {kind} verifier is configured for composite evidence")
        return verifier

    def verify(self, evidence: bytes, context: VerificationContext) -> VerificationResult:
        parts = decode_composite(evidence)
        binding = context.expected_report_data
        if len(binding) != 32:
            raise ValueError("expected_report_data must be the 32-byte session binding")
        failures: list[Failure] = []
        claims: dict[str, Any] = {"evidence.kind": self.kind}

        cpu = self._verifier(parts.cpu_kind).verify(
            parts.cpu, _sub_context(context, parts.cpu_kind, cpu_report_data(binding, parts.gpus),
                                    with_node=True))
        failures += _prefixed("cpu", cpu.failures)
        claims.update({k: v for k, v in cpu.claims.items() if not k.startswith("evidence.")})
        claims["cpu.kind"] = parts.cpu_kind
        claims["cpu.verified"] = cpu.ok
        if parts.cpu_kind == "tdx":
            claims["cpu.debug"] = bool(cpu.claims.get("tdx.debug", True))
            claims["cpu.tcb_status"] = cpu.claims.get("tdx.tcb.status", "Unknown")
        else:
            claims["cpu.debug"] = bool(cpu.claims.get("snp.debug", True))
            claims["cpu.tcb_status"] = "n/a"

        gpus = []
        for index, payload in enumerate(parts.gpus):
            result = self._verifier(GPU_KIND).verify(
                payload, _sub_context(context, GPU_KIND, binding, with_node=False))
            failures += _prefixed(f"gpu{index}", result.failures)
            gpu = {k.removeprefix("nvidia.").replace(".", "_"): v
                   for k, v in result.claims.items() if k.startswith("nvidia.")}
            gpu.update({"index": index, "verified": result.ok})
            gpus.append(gpu)
        claims["gpu.count"] = len(gpus)
        claims["gpus"] = gpus

        claims["tpm.present"] = parts.tpm is not None
        claims["tpm.verified"] = False
        if parts.tpm is not None:
            tpm = self._verifier(TPM_KIND).verify(
                parts.tpm, _sub_context(context, TPM_KIND, binding, with_node=True))
            failures += _prefixed("tpm", tpm.failures)
            for key, value in tpm.claims.items():
                if not key.startswith("evidence.") and key not in claims:
                    claims[key] = value
            claims["tpm.verified"] = tpm.ok
        claims["evidence.verified"] = not any(f.severity == "error" for f in failures)
        return VerificationResult(kind=self.kind, claims=claims, failures=tuple(failures))
