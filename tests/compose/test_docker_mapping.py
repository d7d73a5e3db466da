"""How the harness drives `docker compose` where an engine exists.

No engine runs on these machines, so these tests put a recording stand-in for the `docker`
executable in its place: they check the command mapping and the engine detection only. The
services themselves run under Docker only where an engine exists (not tested here).
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from compose import ServiceFailed, docker_engine_available, open_harness
from compose.docker import DockerHarness
from compose.local import LocalHarness

STUB = r'''#!/usr/bin/env python3
import json, os, sys
args = sys.argv[1:]
with open(os.environ["STUB_LOG"], "a") as log:
    log.write(json.dumps({"argv": args, "WHO": os.environ.get("WHO")}) + "\n")
if args[:1] == ["info"]:
    sys.exit(int(os.environ.get("STUB_INFO_RC", "0")))
if "ps" in args and "json" in args:
    health = os.environ.get("STUB_HEALTH", "healthy")
    print(json.dumps({"Service": "web", "State": "running", "Health": health, "ExitCode": 0}))
elif "wait" in args:
    print(os.environ.get("STUB_WAIT", "0"))
elif "logs" in args:
    print("web says hi")
'''


@pytest.fixture
def stub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    docker = tmp_path / "docker"
    docker.write_text(STUB)
    docker.chmod(0o755)
    log = tmp_path / "calls.jsonl"
    monkeypatch.setenv("STUB_LOG", str(log))
    return docker, log


def _calls(log: Path) -> list[list[str]]:
    return [json.loads(line)["argv"] for line in log.read_text().splitlines()]


def _project(tmp_path: Path) -> Path:
    path = tmp_path / "docker-compose.yml"
    path.write_text(textwrap.dedent("""
        name: toy
        services:
          web:
            command: [serve]
            healthcheck: {test: [CMD, probe], interval: 1s}
        """))
    return path


def test_engine_detection(stub, monkeypatch: pytest.MonkeyPatch):
    docker, log = stub
    assert docker_engine_available(str(docker))
    assert _calls(log) == [["info"], ["compose", "version"]]
    monkeypatch.setenv("STUB_INFO_RC", "1")
    assert not docker_engine_available(str(docker))
    assert not docker_engine_available(str(docker.parent / "no-such-docker"))


def test_auto_mode_falls_back_to_local_processes(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no docker at all
    harness = open_harness(_project(tmp_path), tmp_path / "run", variables={})
    assert isinstance(harness, LocalHarness)


def test_command_mapping(stub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    docker, log = stub
    path = _project(tmp_path)
    base = ["compose", "--project-name", "toy", "--file", str(path), "--profile", "debug"]
    harness = DockerHarness(path, tmp_path / "run", variables={"WHO": "caller",
                            "STUB_LOG": str(log)}, profiles=["debug"], docker=str(docker))
    harness.up(wait=True)
    harness.wait_healthy("web")
    assert harness.wait_completed("web") == 0
    harness.wait_all_completed([])
    harness.stop("web", timeout=3)
    harness.start("web")
    harness.restart("web")
    result = harness.exec("web", ["echo", "hi"], env={"A": "1"})
    assert result.returncode == 0
    assert harness.run("web", ["true"]).returncode == 0
    assert harness.logs("web") == "web says hi\n"
    harness.down()
    harness.down()  # idempotent
    assert _calls(log) == [
        [*base, "up", "--detach", "--wait"],
        [*base, "ps", "--all", "--format", "json", "web"],
        [*base, "wait", "web"],
        [*base, "stop", "--timeout", "3", "web"],
        [*base, "start", "web"],
        [*base, "restart", "web"],
        [*base, "exec", "-T", "--env", "A=1", "web", "echo", "hi"],
        [*base, "run", "--rm", "--no-deps", "-T", "web", "true"],
        [*base, "logs", "--no-color", "--no-log-prefix", "web"],
        [*base, "down", "--volumes", "--remove-orphans"],
        [*base, "ps", "--all", "-q"],
    ]
    # interpolation variables reach docker compose through its environment
    assert {json.loads(line)["WHO"] for line in log.read_text().splitlines()} == {"caller"}


def test_unhealthy_and_failed_services_raise(stub, tmp_path: Path):
    docker, log = stub
    path = _project(tmp_path)
    harness = DockerHarness(path, tmp_path / "run", docker=str(docker), variables={
        "STUB_LOG": str(log), "STUB_HEALTH": "unhealthy", "STUB_WAIT": "3"})
    with pytest.raises(ServiceFailed, match=r"(?s)'web' is unhealthy.*web says hi"):
        harness.wait_healthy("web")
    with pytest.raises(ServiceFailed, match="'web' exited with status 3"):
        harness.wait_completed("web")
