"""The same harness API on top of ``docker compose`` (used where an engine is running).

Command mapping (``DC`` = ``docker compose --project-name P --file F [--profile X]...``,
run with the interpolation variables as its environment):

    up(services, wait)    DC up --detach [--wait] [SERVICE...]
    wait_healthy(s)       poll DC ps --all --format json S until Health is healthy
                          (ServiceFailed on unhealthy, or on exited)
    wait_completed(s)     DC wait S  (exit status of the container)
    wait_all_completed    poll DC ps --all --format json S for each until all exited
    stop(s, timeout)      DC stop [--timeout N] S
    start(s)              DC start S
    restart(s, timeout)   DC restart [--timeout N] S
    exec(s, argv)         DC exec -T S ARGV...
    run(s, argv)          DC run --rm --no-deps -T S ARGV...
    logs(s)               DC logs --no-color --no-log-prefix S
    ps()                  DC ps --all --format json
    down()                DC down --volumes --remove-orphans, then DC ps --all -q must be empty

``docker compose`` runs with this process's environment plus the variables (it interpolates
from its environment). CT_ROOT and CT_HOST are not set, so container paths and service host
names stay as written.
This runner cannot be exercised on machines without an engine (like the development and CI
machines of this project); ``compose.local`` is the one the tests run.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from compose.errors import ComposeError, ServiceFailed
from compose.local import LOG_TAIL_LINES, ServiceStatus
from compose.spec import Project, load_project

__all__ = ["DockerHarness", "compose_base_argv"]

_POLL_SECONDS = 0.5


def compose_base_argv(
    project: Project, profiles: Sequence[str], *, docker: str = "docker"
) -> list[str]:
    argv = [docker, "compose", "--project-name", project.name, "--file", str(project.path)]
    for profile in profiles:
        argv += ["--profile", profile]
    return argv


class DockerHarness:
    mode = "docker"

    def __init__(
        self,
        compose_file: str | Path,
        run_dir: str | Path,
        *,
        variables: Mapping[str, str] | None = None,
        profiles: Sequence[str] = (),
        project_name: str | None = None,
        docker: str = "docker",
    ) -> None:
        self.variables = dict(os.environ if variables is None else variables)
        # Validate with the same parser, so a malformed file fails the same way everywhere.
        self.project = load_project(compose_file, variables=self.variables, name=project_name)
        self.run_dir = Path(run_dir).resolve()
        self.profiles = tuple(profiles)
        self._base = compose_base_argv(self.project, self.profiles, docker=docker)
        # docker itself needs HOME, PATH, DOCKER_HOST...: it gets this process's environment
        # with the variables over it (docker compose interpolates from its environment).
        self._env = {**os.environ, **self.variables}
        self._closed = False

    def _run(
        self, *args: str, check: bool = True, input: bytes | None = None
    ) -> subprocess.CompletedProcess[bytes]:
        result = subprocess.run(
            [*self._base, *args], env=self._env, input=input, capture_output=True,
            check=False, cwd=self.project.directory,
        )
        if check and result.returncode != 0:
            raise ComposeError(
                f"docker compose {' '.join(args[:2])} failed ({result.returncode}): "
                f"{result.stderr.decode(errors='replace').strip()}"
            )
        return result

    def up(self, services: Iterable[str] | None = None, *, wait: bool = False) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._run("up", "--detach", *(["--wait"] if wait else []), *(services or ()))

    def _states(self, service: str | None = None) -> list[dict[str, object]]:
        out = self._run("ps", "--all", "--format", "json", *([service] if service else []))
        text = out.stdout.decode().strip()
        if not text:
            return []
        if text.startswith("["):
            return list(json.loads(text))
        return [json.loads(line) for line in text.splitlines()]

    def wait_healthy(self, service: str) -> None:
        while True:
            states = self._states(service)
            if states:
                state = states[0]
                health, status = state.get("Health"), state.get("State")
                if status == "running" and health == "healthy":
                    return
                if health == "unhealthy" or status in ("exited", "dead"):
                    raise ServiceFailed(
                        service,
                        f"service {service!r} is {health or status}\n{self._tail(service)}",
                    )
            time.sleep(_POLL_SECONDS)

    def wait_completed(self, service: str) -> int:
        result = self._run("wait", service, check=False)
        code = int(result.stdout.decode().strip() or "1")
        if code != 0:
            raise ServiceFailed(
                service, f"service {service!r} exited with status {code}\n{self._tail(service)}"
            )
        return code

    def wait_all_completed(self, services: Iterable[str]) -> None:
        """Polls until all have exited with 0; ServiceFailed as soon as one exits otherwise."""
        pending = list(services)
        while pending:
            for service in list(pending):
                states = self._states(service)
                if states and states[0].get("State") in ("exited", "dead"):
                    code = int(str(states[0].get("ExitCode", 1)))
                    if code != 0:
                        raise ServiceFailed(service, f"service {service!r} exited with status "
                                            f"{code}\n{self._tail(service)}")
                    pending.remove(service)
            if pending:
                time.sleep(_POLL_SECONDS)

    def stop(self, service: str, *, timeout: float | None = None) -> None:
        extra = ["--timeout", str(round(timeout))] if timeout is not None else []
        self._run("stop", *extra, service)

    def start(self, service: str) -> None:
        self._run("start", service)

    def restart(self, service: str, *, timeout: float | None = None) -> None:
        extra = ["--timeout", str(round(timeout))] if timeout is not None else []
        self._run("restart", *extra, service)

    def exec(
        self,
        service: str,
        argv: Sequence[str],
        *,
        input: bytes | None = None,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[bytes]:
        extra: list[str] = []
        for key, value in (env or {}).items():
            extra += ["--env", f"{key}={value}"]
        return self._run("exec", "-T", *extra, service, *argv, check=False, input=input)

    def run(
        self,
        service: str,
        argv: Sequence[str],
        *,
        input: bytes | None = None,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[bytes]:
        extra: list[str] = []
        for key, value in (env or {}).items():
            extra += ["--env", f"{key}={value}"]
        return self._run("run", "--rm", "--no-deps", "-T", *extra, service, *argv, check=False,
                         input=input)

    def logs(self, service: str) -> str:
        return self._run("logs", "--no-color", "--no-log-prefix", service).stdout.decode(
            errors="replace"
        )

    def ps(self) -> list[ServiceStatus]:
        return [
            ServiceStatus(
                name=str(s.get("Service")),
                state=str(s.get("State")),
                health=(str(s["Health"]) if s.get("Health") else None),
                pid=None,
                exit_code=int(str(s.get("ExitCode", 0))),
                restarts=0,
            )
            for s in self._states()
        ]

    def down(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._run("down", "--volumes", "--remove-orphans")
        left = self._run("ps", "--all", "-q").stdout.decode().split()
        if left:
            raise ComposeError(f"containers left after down: {', '.join(left)}")

    def _tail(self, service: str) -> str:
        lines = self.logs(service).splitlines()[-LOG_TAIL_LINES:]
        return "last log lines:\n" + "\n".join(f"  | {line}" for line in lines)

    def __enter__(self) -> DockerHarness:
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()
