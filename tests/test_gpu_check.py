"""``make gpu-check`` stops clearly on a machine without an NVIDIA GPU (it measures nothing
there, and says so, rather than printing goal lines it did not earn)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has a GPU")
def test_gpu_check_without_a_gpu_exits_2_and_says_why() -> None:
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], cwd=ROOT,
                          env={**os.environ, "PY": sys.executable}, capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 2
    assert "no NVIDIA GPU" in proc.stderr and "nothing measured" in proc.stderr
    assert "goal " not in proc.stdout


def test_gpu_check_pieces_refuse_unknown_commands() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "nope"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2 and "usage" in proc.stderr
