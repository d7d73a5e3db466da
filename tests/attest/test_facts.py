"""Hardening facts from an injected root: each hostile setting shows up in its claim."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from attest.facts import CLAIM_NAMES, GpuState, HostSource, collect_facts, nvidia_smi_probe

HARDENED_LIMITS = (
    "Limit                     Soft Limit           Hard Limit           Units\n"
    "Max cpu time              unlimited            unlimited            seconds\n"
    "Max core file size        0                    0                    bytes\n"
)


def make_root(tmp_path: Path, **files: str) -> Path:
    base = {
        "proc/cmdline": "BOOT_IMAGE=/vmlinuz init_on_free=1 lockdown=integrity\n",
        "proc/swaps": "Filename\tType\tSize\tUsed\tPriority\n",
        "proc/self/limits": HARDENED_LIMITS,
        "proc/sys/kernel/core_pattern": "|/bin/false\n",
        "proc/sys/kernel/yama/ptrace_scope": "3\n",
        "sys/kernel/security/lockdown": "none [integrity] confidentiality\n",
        "sys/kernel/mm/ksm/run": "0\n",
    }
    base.update({k.replace("__", "/"): v for k, v in files.items()})
    for rel, text in base.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


def facts(root: Path, gpu=None, **kw):
    return collect_facts(HostSource(root=root, gpu_probe=lambda: gpu, **kw))


def test_hardened_node(tmp_path):
    f = facts(make_root(tmp_path))
    assert set(f) == set(CLAIM_NAMES)
    assert f["ksm_enabled"] is False
    assert f["swap_enabled"] is False and f["swap_devices"] == []
    assert f["core_dumps_allowed"] is False
    assert (f["core_rlimit_soft"], f["core_rlimit_hard"]) == (0, 0)
    assert f["core_pattern"] == "|/bin/false"
    assert f["ptrace_scope"] == 3
    assert f["kernel_lockdown"] == "integrity"
    assert f["init_on_free"] is True
    assert f["kernel_cmdline"].startswith("BOOT_IMAGE=")
    assert f["gpu_present"] is False and f["gpu_compute_mode"] == "none"
    assert f["container_image_digest"] == "none"


def test_ksm_on(tmp_path):
    assert facts(make_root(tmp_path, sys__kernel__mm__ksm__run="1\n"))["ksm_enabled"] is True


def test_swap_on(tmp_path):
    swaps = "Filename\tType\tSize\tUsed\tPriority\n/swapfile file 1048572 0 -2\n"
    f = facts(make_root(tmp_path, proc__swaps=swaps))
    assert f["swap_enabled"] is True
    assert f["swap_devices"] == ["/swapfile"]


@pytest.mark.parametrize(("soft", "hard"), [("unlimited", "unlimited"), ("0", "unlimited"),
                                            ("4096", "4096")])
def test_core_dumps_allowed(tmp_path, soft, hard):
    limits = HARDENED_LIMITS.replace(
        "Max core file size        0                    0",
        f"Max core file size        {soft:<20} {hard}",
    )
    f = facts(make_root(tmp_path, proc__self__limits=limits))
    assert f["core_dumps_allowed"] is True
    assert f["core_rlimit_hard"] == (-1 if hard == "unlimited" else int(hard))


def test_limits_of_another_process(tmp_path):
    root = make_root(tmp_path, proc__4242__limits=HARDENED_LIMITS.replace(
        "0                    0", "unlimited            unlimited"))
    assert facts(root, pid=4242)["core_dumps_allowed"] is True
    assert facts(root)["core_dumps_allowed"] is False


def test_unreadable_limits_assume_the_worst(tmp_path):
    root = make_root(tmp_path)
    (root / "proc/self/limits").unlink()
    assert facts(root)["core_dumps_allowed"] is True


def test_missing_kernel_features(tmp_path):
    root = make_root(tmp_path)
    for rel in ("sys/kernel/security/lockdown", "proc/sys/kernel/yama/ptrace_scope",
                "sys/kernel/mm/ksm/run"):
        (root / rel).unlink()
    f = facts(root)
    assert f["kernel_lockdown"] == "unavailable"
    assert f["ptrace_scope"] == -1
    assert f["ksm_enabled"] is False


def test_init_on_free_from_kernel_config_and_cmdline_override(tmp_path):
    root = make_root(tmp_path, proc__cmdline="quiet\n",
                     proc__sys__kernel__osrelease="6.1.0-test\n")
    (root / "boot").mkdir()
    (root / "boot/config-6.1.0-test").write_text("CONFIG_INIT_ON_FREE_DEFAULT_ON=y\n")
    assert facts(root)["init_on_free"] is True
    (root / "proc/cmdline").write_text("init_on_free=0\n")
    assert facts(root)["init_on_free"] is False
    (root / "proc/cmdline").write_text("quiet\n")
    (root / "boot/config-6.1.0-test").write_text("# CONFIG_INIT_ON_FREE_DEFAULT_ON is not set\n")
    assert facts(root)["init_on_free"] is False


def test_gpu_claims_count_only_other_processes(tmp_path):
    gpu = GpuState(("Exclusive_Process", "Exclusive_Process"), "on", (os.getpid(), 999))
    f = facts(make_root(tmp_path), gpu=gpu)
    assert f["gpu_present"] is True and f["gpu_count"] == 2
    assert f["gpu_compute_mode"] == "Exclusive_Process"
    assert f["gpu_cc_mode"] == "on"
    assert f["gpu_other_processes"] == 1


def test_gpu_mixed_modes_and_declared_trainer_pids(tmp_path):
    gpu = GpuState(("Default", "Exclusive_Process"), "off", (10, 11))
    f = facts(make_root(tmp_path), gpu=gpu, trainer_pids=(10, 11))
    assert f["gpu_compute_mode"] == "mixed"
    assert f["gpu_other_processes"] == 0


def test_container_digest_sources(tmp_path):
    root = make_root(tmp_path)
    assert facts(root)["container_image_digest"] == "none"
    (root / "proc/self/cgroup").write_text("0::/kubepods/besteffort/pod1/abc\n")
    assert facts(root)["container_image_digest"] == "unknown"
    (root / "run/attest").mkdir(parents=True)
    digest = "sha256:" + "ab" * 32
    (root / "run/attest/image-digest").write_text(digest + "\n")
    assert facts(root)["container_image_digest"] == digest
    (root / "run/attest/image-digest").write_text("not-a-digest\n")
    (root / "run/.containerenv").write_text(f'engine="podman"\nimageid="{"cd" * 32}"\n')
    assert facts(root)["container_image_digest"] == "sha256:" + "cd" * 32


def test_nvidia_smi_probe_parses_a_real_process(tmp_path):
    fake = tmp_path / "nvidia-smi"
    fake.write_text(
        "#!/bin/sh\n"
        'case "$1" in\n'
        '  --query-gpu=compute_mode) echo Exclusive_Process ;;\n'
        '  conf-compute) echo "CC status: ON" ;;\n'
        '  --query-compute-apps=pid) printf "123\\n456\\n" ;;\n'
        "esac\n"
    )
    fake.chmod(0o755)
    state = nvidia_smi_probe(str(fake))
    assert state == GpuState(("Exclusive_Process",), "on", (123, 456))


def test_nvidia_smi_absent_means_no_gpu(tmp_path):
    assert nvidia_smi_probe(str(tmp_path / "missing")) is None


def test_real_host_collects_every_claim():
    f = collect_facts(HostSource(gpu_probe=lambda: None))
    assert set(f) == set(CLAIM_NAMES)
    assert isinstance(f["kernel_cmdline"], str)
