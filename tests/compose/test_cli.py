"""``python -m compose`` as people use it, in its own process."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

from tests.compose.conftest import live_processes

REPO = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def _compose(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "compose", *args, "--run-dir", str(tmp_path / "run"), "--mode",
         "local"], cwd=tmp_path, env=_env(), capture_output=True, text=True, check=False,
    )


def test_up_runs_to_completion_and_cleans_up(tmp_path: Path):
    (tmp_path / "docker-compose.yml").write_text(textwrap.dedent("""
        services:
          first:
            command: [python, -c, "print('hello from first')"]
          second:
            command: [python, -c, "import os; print('second sees', os.environ['WHO'])"]
            environment: ["WHO=${WHO:-nobody}"]
            depends_on: {first: {condition: service_completed_successfully}}
        """))
    (tmp_path / ".env").write_text("WHO=dotenv\n")
    result = _compose(tmp_path, "up")
    assert result.returncode == 0, result.stderr
    assert "first  | hello from first" in result.stdout
    assert "second | second sees dotenv" in result.stdout
    assert result.stdout.index("hello from first") < result.stdout.index("second sees")
    assert "all processes gone, run directory removed" in result.stdout
    assert not (tmp_path / "run").exists()


def test_up_reports_a_failed_dependency(tmp_path: Path):
    (tmp_path / "docker-compose.yml").write_text(textwrap.dedent("""
        services:
          setup:
            command: [python, -c, "import sys; print('no config'); sys.exit(5)"]
          app:
            command: [python, -c, "print('app ran')"]
            depends_on: {setup: {condition: service_completed_successfully}}
        """))
    result = _compose(tmp_path, "up")
    assert result.returncode == 1
    assert "service 'setup' exited with status 5" in result.stderr
    assert "no config" in result.stderr
    assert "app ran" not in result.stdout
    assert not (tmp_path / "run").exists()


def test_ps_logs_and_down_from_another_process(tmp_path: Path):
    (tmp_path / "docker-compose.yml").write_text(textwrap.dedent("""
        services:
          web:
            command: [python, -c, "import time; print('serving', flush=True); time.sleep(600)"]
            healthcheck:
              test: [CMD, "true"]
              interval: 50ms
        """))
    up = subprocess.Popen(
        [sys.executable, "-m", "compose", "up", "--run-dir", str(tmp_path / "run"), "--mode",
         "local"], cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, text=True,
    )
    try:
        _check_ps_logs_down(tmp_path, up)
    finally:
        if up.poll() is None:  # the checks failed: SIGTERM makes `up` bring everything down
            up.terminate()
        up.wait()
        assert up.stdout is not None
        up.stdout.close()
    assert not (tmp_path / "run").exists()


def _check_ps_logs_down(tmp_path: Path, up: subprocess.Popen[str]) -> None:
    assert up.stdout is not None
    seen = []
    for line in up.stdout:
        seen.append(line)
        if "every service is up" in line:
            break
    assert any("every service is up" in line for line in seen), seen
    run_id = seen[0].split("(run ")[1].rstrip(")\n")
    ps = _compose(tmp_path, "ps")
    assert ps.returncode == 0
    (row,) = [line for line in ps.stdout.splitlines() if line.startswith("web")]
    assert row.split()[1:3] == ["running", "healthy"]
    logs = _compose(tmp_path, "logs", "web")
    assert logs.stdout == "serving\n"
    assert live_processes(pgids=set(), marker=f"CT_COMPOSE_ID={run_id}:")
    down = _compose(tmp_path, "down")
    assert down.returncode == 0, down.stderr
    assert up.wait() == 0
    assert live_processes(pgids=set(), marker=f"CT_COMPOSE_ID={run_id}:") == []


def test_help_and_usage_errors(tmp_path: Path):
    result = subprocess.run([sys.executable, "-m", "compose", "--help"], env=_env(),
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0 and "up" in result.stdout and "down" in result.stdout
    result = subprocess.run([sys.executable, "-m", "compose", "explode"], env=_env(),
                            capture_output=True, text=True, check=False)
    assert result.returncode == 2
    result = _compose(tmp_path, "up")  # no compose file there
    assert result.returncode == 1
    assert "cannot read compose file" in result.stderr


def test_the_watched_service_exiting_while_up_still_waits_is_not_a_start_failure(
    tmp_path: Path
):
    """``up --exit-code-from job`` where ``up --wait`` itself sees the job exit non-zero (the
    server turns healthy only after the job has written its marker and, half a second later,
    exited): the starter leaves the status to the follow loop instead of failing the run
    (a busy machine made the starter see the exit first: exit 1, not the job's 3)."""
    from compose.cli import _start
    from compose.local import LocalHarness

    marker = tmp_path / "job-ran"
    healthy = (f"import os, sys, time; os.path.exists({str(marker)!r}) or sys.exit(1); "
               "time.sleep(0.5)")
    (tmp_path / "docker-compose.yml").write_text(textwrap.dedent(f"""
        services:
          server:
            command: [python, -c, "import time; time.sleep(600)"]
            healthcheck:
              test: [CMD, python, -c, "{healthy}"]
              interval: 50ms
          job:
            command: [python, -c, "open({str(marker)!r}, 'w').close(); raise SystemExit(3)"]
        """))
    harness = LocalHarness(tmp_path / "docker-compose.yml", tmp_path / "run", variables={})
    stopping, errors = threading.Event(), []
    try:
        _start(harness, [], stopping, errors, watched="job")
        assert errors == [] and not stopping.is_set(), errors
        deadline = time.monotonic() + 120
        while (job := {x.name: x for x in harness.ps()}["job"]).state != "exited":
            assert time.monotonic() < deadline, job
            time.sleep(0.05)
        assert job.exit_code == 3
    finally:
        harness.down()


def test_exit_code_from_a_service(tmp_path: Path):
    (tmp_path / "docker-compose.yml").write_text(textwrap.dedent("""
        services:
          server:
            command: [python, -c, "import time; time.sleep(600)"]
          job:
            command: [python, -c, "import sys; print('job finished'); sys.exit(3)"]
            depends_on: [server]
        """))
    result = _compose(tmp_path, "up", "--exit-code-from", "job")
    assert result.returncode == 3, result.stderr
    assert "job    | job finished" in result.stdout
    assert "[compose] job exited with status 3" in result.stdout
    assert not (tmp_path / "run").exists()
    result = _compose(tmp_path, "up", "--exit-code-from", "nope")
    assert result.returncode == 1
    assert "no enabled service 'nope'" in result.stderr
