"""``python -m demo``'s command line: help and usage errors (the run itself is exercised by
running the demo; the same deployment is tested scenario by scenario in tests/compose)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.compose.conftest import live_processes

REPO = Path(__file__).resolve().parents[2]


def _demo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "demo", *args], cwd=REPO, capture_output=True,
                          text=True, check=False)


def test_help_names_the_options():
    result = _demo("--help")
    assert result.returncode == 0
    for option in ("--steps", "--keep", "--mode", "--run-root", "--state", "--store"):
        assert option in result.stdout


def test_bad_arguments_exit_2_and_start_nothing(tmp_path: Path):
    result = _demo("--steps", "0", "--run-root", str(tmp_path / "runs"))
    assert result.returncode == 2
    assert "steps must be from 1 to 100000" in result.stderr
    assert not (tmp_path / "runs").exists()
    assert _demo("--mode", "podman").returncode == 2
    assert _demo("--state", "mysql").returncode == 2
    assert _demo("--store", "ftp").returncode == 2


@pytest.mark.integration
@pytest.mark.slow
def test_demo_runs_end_to_end_and_leaves_nothing(tmp_path: Path):
    """`make demo`'s command: every phase passes, the summary has its sections, and the
    run directory and every process of the run are gone afterwards."""
    runs = tmp_path / "runs"
    result = _demo("--steps", "10", "--mode", "local", "--run-root", str(runs))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    out = result.stdout
    for phase in ("bootstrap", "services", "enrol", "tenant", "train"):
        assert f"] {phase}: done in " in out
    for node in ("node-a", "node-b"):
        for broker in ("provider", "tenant"):
            assert f"{node}: share release at the {broker} broker: allowed" in out
        assert f"{node}: shred report (normal exit)" in out
    losses = [float(x) for x in re.findall(r"step +\d+/10 +loss ([\d.]+)", out)]
    assert len(losses) >= 2 and losses[-1] < losses[0]
    assert "verify: OK" in out and "denials or errors: none" in out
    assert "corpus lines found in any of them: 0" in out
    assert re.search(r"every file the services wrote .*: \d+; containing corpus text: 0", out)
    assert "encrypted checkpoint" in out and "encrypted shard" in out
    assert out.rstrip().endswith("demo: services stopped, run directory wiped")
    assert list(runs.iterdir()) == []
    run_id = re.search(r"\(local processes, run ([0-9a-f]+)\)", out)
    assert run_id is not None, out[:500]
    assert live_processes(pgids=set(), marker=f"CT_COMPOSE_ID={run_id.group(1)}:") == []


@pytest.mark.integration
@pytest.mark.slow
def test_demo_runs_on_the_postgres_and_s3_services():
    """`make demo DEMO_STATE=postgres DEMO_STORE=s3`'s command: the provider broker keeps
    its state and audit log in the compose `postgres` service (verified offline there), the
    dataset lives in the `s3` service, every object of the bucket is ciphertext, and the run
    leaves nothing behind."""
    # the server runs as the postgres user when this is root: a run directory it can reach
    # (pytest's own directory is 0700, and every new pytest session makes it so again)
    top = Path(tempfile.mkdtemp(prefix="ct-demo-pg-"))
    top.chmod(0o711)
    runs = top / "runs"
    try:
        result = _demo("--steps", "10", "--mode", "local", "--run-root", str(runs),
                       "--state", "postgres", "--store", "s3")
        assert list(runs.iterdir()) == []
    finally:
        shutil.rmtree(top, ignore_errors=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    out = result.stdout
    assert "provider broker on PostgreSQL; dataset in S3 (s3://ct-data/corpus)" in out
    assert "PostgreSQL (the provider broker's state and audit log)" in out
    for node in ("node-a", "node-b"):
        for broker in ("provider", "tenant"):
            assert f"{node}: share release at the {broker} broker: allowed" in out
        assert f"{node}: shred report (normal exit)" in out
    audit = re.search(r"provider broker audit log \(in PostgreSQL\): (\d+) records, "
                      r"verify: OK", out)
    assert audit is not None and int(audit.group(1)) > 0, out[-4000:]
    assert "tenant broker audit log: " in out and out.count("verify: OK") == 2
    assert "denials or errors: none" in out
    shards = re.findall(r"^  s3:shards/\S+ .* encrypted shard$", out, re.MULTILINE)
    manifests = re.findall(r"^  s3:manifests/\S+ .* encrypted manifest$", out, re.MULTILINE)
    assert shards and len(manifests) == 1, out[-4000:]
    assert "corpus lines found in any of them: 0" in out
    assert re.search(r"every file the services wrote .*: \d+; containing corpus text: 0", out)
    assert out.rstrip().endswith("demo: services stopped, run directory wiped")
    run_id = re.search(r"\(local processes, run ([0-9a-f]+);", out)
    assert run_id is not None, out[:500]
    assert live_processes(pgids=set(), marker=f"CT_COMPOSE_ID={run_id.group(1)}:") == []
