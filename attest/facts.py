"""Hardening facts of this node, as flat claims a release policy reads.

Every source is injectable: :class:`HostSource` reads files under a ``root`` directory (``/`` in
production, a temporary tree in tests) and asks a GPU probe, so tests can simulate KSM on,
swap on or core dumps allowed without touching the machine. Nothing is read from the
environment. Claims (name: type, meaning):

=========================  ============================================================
kernel_cmdline             str: /proc/cmdline
kernel_lockdown            str: none | integrity | confidentiality | unavailable
init_on_free               bool: init_on_free=1 on the command line, or the kernel's
                           CONFIG_INIT_ON_FREE_DEFAULT_ON without init_on_free=0
ptrace_scope               int: Yama ptrace_scope 0-3, -1 when Yama is absent
ksm_enabled                bool: /sys/kernel/mm/ksm/run is not 0 (absent: False)
swap_enabled               bool: /proc/swaps lists a device; swap_devices: list[str]
core_rlimit_soft/_hard     int: RLIMIT_CORE of the trainer process, -1 = unlimited
core_pattern               str: /proc/sys/kernel/core_pattern
core_dumps_allowed         bool: either core limit is not 0 (the process could dump)
gpu_present, gpu_count     bool, int
gpu_compute_mode           str: none (no GPU) | Default | Exclusive_Process | Prohibited | mixed
gpu_cc_mode                str: none (no GPU) | on | off | devtools | unknown
gpu_other_processes        int: compute processes on the GPUs other than the trainer
container_image_digest     str: the image digest ("sha256:..."), "unknown" inside a container
                           that does not say, "none" outside a container
=========================  ============================================================

The container digest comes from a file the runtime mounts (``/run/attest/image-digest``, one
line ``sha256:<hex>``) or podman's ``/run/.containerenv`` (``imageid``); ``/.dockerenv`` or a
container cgroup path only tell that we are inside one.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["CLAIM_NAMES", "GpuState", "HostSource", "collect_facts", "nvidia_smi_probe"]

CLAIM_NAMES = (
    "kernel_cmdline",
    "kernel_lockdown",
    "init_on_free",
    "ptrace_scope",
    "ksm_enabled",
    "swap_enabled",
    "swap_devices",
    "core_rlimit_soft",
    "core_rlimit_hard",
    "core_pattern",
    "core_dumps_allowed",
    "gpu_present",
    "gpu_count",
    "gpu_compute_mode",
    "gpu_cc_mode",
    "gpu_other_processes",
    "container_image_digest",
)
MAX_FILE = 1 << 16
_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")


@dataclass(frozen=True, slots=True)
class GpuState:
    compute_modes: tuple[str, ...]  # one per GPU
    cc_mode: str  # on | off | devtools | unknown
    compute_pids: tuple[int, ...]  # every compute process on any GPU


GpuProbe = Callable[[], GpuState | None]


def nvidia_smi_probe(binary: str | None = None) -> GpuState | None:
    """Ask ``nvidia-smi``; None when it is absent or sees no GPU."""
    exe = binary or shutil.which("nvidia-smi")
    if exe is None:
        return None

    def run(*args: str) -> str | None:
        try:
            proc = subprocess.run([exe, *args], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return proc.stdout if proc.returncode == 0 else None

    modes_out = run("--query-gpu=compute_mode", "--format=csv,noheader")
    if not modes_out or not modes_out.strip():
        return None
    modes = tuple(line.strip() for line in modes_out.splitlines() if line.strip())
    cc_out = (run("conf-compute", "-f") or "").lower()
    cc = "unknown"
    for word in ("devtools", "on", "off"):
        if re.search(rf"cc status:\s*{word}\b", cc_out):
            cc = word
            break
    pids_out = run("--query-compute-apps=pid", "--format=csv,noheader") or ""
    pids = tuple(int(p) for p in re.findall(r"\d+", pids_out))
    return GpuState(modes, cc, pids)


@dataclass(frozen=True, slots=True)
class HostSource:
    """Where facts come from: files under ``root``, the limits of process ``pid``, a GPU probe."""

    root: Path = Path("/")
    pid: int | str = "self"
    gpu_probe: GpuProbe = field(default=nvidia_smi_probe)
    trainer_pids: tuple[int, ...] = ()  # GPU processes that are ours (default: this process)

    def read(self, path: str) -> str | None:
        try:
            with open(self.root / path.lstrip("/"), encoding="utf-8", errors="replace") as f:
                return f.read(MAX_FILE)
        except OSError:
            return None

    def exists(self, path: str) -> bool:
        return (self.root / path.lstrip("/")).exists()


def _cmdline_params(cmdline: str) -> dict[str, str]:
    out = {}
    for tok in cmdline.split():
        key, _, value = tok.partition("=")
        out[key] = value
    return out


def _truthy(value: str) -> bool:
    return value.lower() in ("1", "y", "yes", "on", "true")


def _init_on_free(src: HostSource, params: dict[str, str]) -> bool:
    if "init_on_free" in params:
        return _truthy(params["init_on_free"])
    release = (src.read("/proc/sys/kernel/osrelease") or "").strip()
    config = src.read(f"/boot/config-{release}") if release else None
    return bool(config and re.search(r"^CONFIG_INIT_ON_FREE_DEFAULT_ON=y$", config, re.M))


def _lockdown(text: str | None) -> str:
    if text is None:
        return "unavailable"
    m = re.search(r"\[(\w+)\]", text)
    return m.group(1) if m else "unavailable"


def _core_limits(src: HostSource) -> tuple[int, int]:
    text = src.read(f"/proc/{src.pid}/limits") or ""
    m = re.search(r"^Max core file size\s+(\S+)\s+(\S+)", text, re.M)
    if not m:
        return -1, -1  # unknown: assume the worst
    return tuple(-1 if v == "unlimited" else int(v) for v in m.groups())  # type: ignore[return-value]


def _container_digest(src: HostSource) -> str:
    given = (src.read("/run/attest/image-digest") or "").strip()
    if _DIGEST_RE.fullmatch(given):
        return given
    env = src.read("/run/.containerenv")
    if env is not None:
        m = re.search(r'^imageid="([0-9a-f]{64})"', env, re.M)
        return f"sha256:{m.group(1)}" if m else "unknown"
    cgroup = src.read(f"/proc/{src.pid}/cgroup") or ""
    if src.exists("/.dockerenv") or re.search(r"docker|containerd|kubepods|libpod", cgroup):
        return "unknown"
    return "none"


def _gpu_claims(src: HostSource) -> dict[str, Any]:
    state = src.gpu_probe()
    if state is None or not state.compute_modes:
        return {
            "gpu_present": False,
            "gpu_count": 0,
            "gpu_compute_mode": "none",
            "gpu_cc_mode": "none",
            "gpu_other_processes": 0,
        }
    ours = set(src.trainer_pids) or {os.getpid() if src.pid == "self" else int(src.pid)}
    modes = set(state.compute_modes)
    return {
        "gpu_present": True,
        "gpu_count": len(state.compute_modes),
        "gpu_compute_mode": modes.pop() if len(modes) == 1 else "mixed",
        "gpu_cc_mode": state.cc_mode,
        "gpu_other_processes": len(set(state.compute_pids) - ours),
    }


def collect_facts(source: HostSource | None = None) -> dict[str, Any]:
    """Every hardening claim of :data:`CLAIM_NAMES`, read from ``source``."""
    src = source or HostSource()
    cmdline = (src.read("/proc/cmdline") or "").strip()
    params = _cmdline_params(cmdline)
    ksm = (src.read("/sys/kernel/mm/ksm/run") or "0").strip()
    swaps = [
        line.split()[0]
        for line in (src.read("/proc/swaps") or "").splitlines()[1:]
        if line.strip()
    ]
    ptrace = (src.read("/proc/sys/kernel/yama/ptrace_scope") or "").strip()
    soft, hard = _core_limits(src)
    facts: dict[str, Any] = {
        "kernel_cmdline": cmdline,
        "kernel_lockdown": _lockdown(src.read("/sys/kernel/security/lockdown")),
        "init_on_free": _init_on_free(src, params),
        "ptrace_scope": int(ptrace) if ptrace.isdigit() else -1,
        "ksm_enabled": ksm != "0",
        "swap_enabled": bool(swaps),
        "swap_devices": swaps,
        "core_rlimit_soft": soft,
        "core_rlimit_hard": hard,
        "core_pattern": (src.read("/proc/sys/kernel/core_pattern") or "").strip(),
        "core_dumps_allowed": soft != 0 or hard != 0,
        "container_image_digest": _container_digest(src),
    }
    facts.update(_gpu_claims(src))
    return facts
