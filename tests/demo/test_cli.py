"""``python -m demo``'s command line: help and usage errors (the run itself is exercised by
running the demo; the same deployment is tested scenario by scenario in tests/compose)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _demo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "demo", *args], cwd=REPO, capture_output=True,
                          text=True, check=False)


def test_help_names_the_options():
    result = _demo("--help")
    assert result.returncode == 0
    for option in ("--steps", "--keep", "--mode", "--run-root"):
        assert option in result.stdout


def test_bad_arguments_exit_2_and_start_nothing(tmp_path: Path):
    result = _demo("--steps", "0", "--run-root", str(tmp_path / "runs"))
    assert result.returncode == 2
    assert "steps must be from 1 to 100000" in result.stderr
    assert not (tmp_path / "runs").exists()
    assert _demo("--mode", "podman").returncode == 2
