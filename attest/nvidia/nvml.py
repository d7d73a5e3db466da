"""Node side: GPU facts and GPU evidence through NVML (``nvidia-ml-py``), never by parsing
``nvidia-smi``.

``gpu_facts()`` returns one mapping per GPU with the facts the ``nvidia-gpu`` evidence
container carries (see :mod:`attest.nvidia.evidence`): ``cc_mode`` ("on", "off",
"devtools"), ``cc_ready``, ``architecture``, ``driver_version``, ``compute_mode``,
``mig_mode``, ``other_processes`` (compute processes on the GPU other than this one),
``ecc``, ``uuid``. ``collect_gpu_evidence(nonce)`` asks every GPU for an SPDM attestation
report over ``nonce`` (the session binding, 32 bytes) and its certificate chain, and returns
one encoded evidence per GPU.

``nvidia-ml-py`` is optional (``pip install .[gpu]``); without it, or without a driver,
:class:`NvmlUnavailable` says so.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from .evidence import encode_evidence

__all__ = ["NvmlUnavailable", "collect_gpu_evidence", "gpu_facts"]

_ARCH_NAMES = {"NVML_DEVICE_ARCH_HOPPER": "Hopper", "NVML_DEVICE_ARCH_BLACKWELL": "Blackwell",
               "NVML_DEVICE_ARCH_AMPERE": "Ampere", "NVML_DEVICE_ARCH_ADA": "Ada"}
_COMPUTE_MODES = {0: "default", 1: "exclusive_thread", 2: "prohibited",
                  3: "exclusive_process"}


class NvmlUnavailable(RuntimeError):
    """NVML cannot be used here (no nvidia-ml-py, no driver, or no GPU)."""


@contextmanager
def _nvml() -> Iterator[Any]:
    try:
        import pynvml
    except ImportError as exc:
        raise NvmlUnavailable("nvidia-ml-py is not installed (pip install .[gpu])") from exc
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        raise NvmlUnavailable(f"NVML could not start: {exc}") from exc
    try:
        yield pynvml
    finally:
        pynvml.nvmlShutdown()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _cc_system(nv: Any) -> tuple[str, bool]:
    try:
        state = nv.nvmlSystemGetConfComputeState()
    except nv.NVMLError:
        return "unknown", False
    if state.ccFeature != nv.NVML_CC_SYSTEM_FEATURE_ENABLED:
        mode = "off"
    elif state.devToolsMode == nv.NVML_CC_SYSTEM_DEVTOOLS_MODE_ON:
        mode = "devtools"
    else:
        mode = "on"
    try:
        ready = (nv.nvmlSystemGetConfComputeGpusReadyState()
                 == nv.NVML_CC_ACCEPTING_CLIENT_REQUESTS_TRUE)
    except nv.NVMLError:
        ready = False
    return mode, ready


def _device_facts(nv: Any, handle: Any, cc_mode: str, cc_ready: bool,
                  driver: str) -> dict[str, Any]:
    arch_code = nv.nvmlDeviceGetArchitecture(handle)
    arch = next((name for const, name in _ARCH_NAMES.items()
                 if getattr(nv, const, None) == arch_code), "unknown")
    try:
        mig = nv.nvmlDeviceGetMigMode(handle)[0] == nv.NVML_DEVICE_MIG_ENABLE
    except nv.NVMLError:
        mig = False  # not MIG-capable
    try:
        ecc = nv.nvmlDeviceGetCurrentEccMode(handle) == nv.NVML_FEATURE_ENABLED
    except nv.NVMLError:
        ecc = False
    me = os.getpid()
    others = [p for p in nv.nvmlDeviceGetComputeRunningProcesses(handle) if p.pid != me]
    return {
        "cc_mode": cc_mode, "cc_ready": cc_ready, "architecture": arch,
        "driver_version": driver,
        "compute_mode": _COMPUTE_MODES.get(nv.nvmlDeviceGetComputeMode(handle), "unknown"),
        "mig_mode": mig, "other_processes": len(others), "ecc": ecc,
        "uuid": _text(nv.nvmlDeviceGetUUID(handle)),
    }


def gpu_facts() -> list[dict[str, Any]]:
    """NVML facts for every GPU, index order."""
    with _nvml() as nv:
        cc_mode, cc_ready = _cc_system(nv)
        driver = _text(nv.nvmlSystemGetDriverVersion())
        return [_device_facts(nv, nv.nvmlDeviceGetHandleByIndex(i), cc_mode, cc_ready, driver)
                for i in range(nv.nvmlDeviceGetCount())]


def collect_gpu_evidence(nonce: bytes) -> list[bytes]:
    """One ``nvidia-gpu`` evidence per GPU, each an SPDM report over ``nonce``."""
    if len(nonce) != 32:
        raise ValueError("the GPU nonce must be 32 bytes")
    out = []
    with _nvml() as nv:
        cc_mode, cc_ready = _cc_system(nv)
        driver = _text(nv.nvmlSystemGetDriverVersion())
        for i in range(nv.nvmlDeviceGetCount()):
            handle = nv.nvmlDeviceGetHandleByIndex(i)
            try:
                report = nv.nvmlDeviceGetConfComputeGpuAttestationReport(handle, nonce)
                certs = nv.nvmlDeviceGetConfComputeGpuCertificate(handle)
            except nv.NVMLError as exc:
                raise NvmlUnavailable(f"GPU {i} gave no attestation report: {exc}") from exc
            spdm = bytes(report.attestationReport[:report.attestationReportSize])
            pem = bytes(certs.attestationCertChain[:certs.attestationCertChainSize])
            chain = [c.public_bytes(Encoding.DER)
                     for c in x509.load_pem_x509_certificates(pem)]
            facts = _device_facts(nv, handle, cc_mode, cc_ready, driver)
            out.append(encode_evidence(spdm, chain, facts))
    return out
