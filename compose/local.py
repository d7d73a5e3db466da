"""Run the services of a compose file as local processes (no container engine needed).

How container paths become host paths
-------------------------------------
Each service gets a root directory ``RUN/roots/<service>``. Every mount target of the
service appears inside it as a symbolic link: a named volume ``store:/store`` becomes
``RUN/roots/<service>/store -> RUN/volumes/store``, a bind mount ``./deploy/config:/config``
becomes ``RUN/roots/<service>/config -> <project>/deploy/config``. The compose file writes
every container path it passes to a program as ``${CT_ROOT:-}/store/...``: under
``docker compose`` CT_ROOT is unset and the path stays ``/store/...``; here the harness sets
CT_ROOT to the service's root while interpolating that service's strings. Volume targets
themselves are written plainly (``store:/store``).

Host names: services reach each other as ``${CT_HOST:-provider-broker}``: the service name
under Docker, ``127.0.0.1`` here (CT_HOST). Listen addresses use ``${CT_HOST:-0.0.0.0}``.
Ports must differ between services (they share one network namespace here); make them
variables (``${PROVIDER_BROKER_PORT:-50051}``) so that tests can pass free ports.

Process environment: only what the compose file gives (env_file, environment) plus PATH (the
harness's Python first, as the image's would be), HOME and TMPDIR under
``RUN/roots/<service>/.ct``, LANG, ``image_env`` (what an image would set, for example PATH
with a measured environment's ``bin`` first: compose/image.py), and the run marker
``CT_COMPOSE_ID`` (see ``compose.proctree``). The harness's own environment is not passed
through, as a container would not see it. Logs: each service's stdout and stderr go to
``RUN/logs/<service>.log``, across restarts.

Not enforced here, documented: read-only mounts, resource limits, the image, users and
network isolation. The healthcheck runs as a host process with the service's environment
and working directory.

Lifecycle: ``up()`` starts services in dependency order, waiting for each dependency's
condition; a supervisor thread per process applies the restart policy; a monitor thread
runs the healthcheck (``start_interval`` during ``start_period``, where failures do not
count; ``interval`` afterwards; unhealthy after ``retries`` consecutive failures).
``down()`` stops everything in reverse dependency order, kills whatever is left in the
run's process groups or carries its marker, checks that nothing is left and removes the
run directory.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from compose.errors import ComposeError, LeftoverProcesses, ServiceFailed, UnknownService
from compose.proctree import MARKER_VARIABLE, kill_all, marked_processes
from compose.spec import Project, Service, load_project

__all__ = ["LocalHarness", "ServiceStatus"]

log = logging.getLogger("compose")

LOG_TAIL_LINES = 30
MAX_PROBE_OUTPUT = 4096
_RESTART_BACKOFF_START = 0.1
_RESTART_BACKOFF_MAX = 2.0


@dataclass(frozen=True)
class ServiceStatus:
    """What ``ps()`` reports for one service."""

    name: str
    state: str  # created, running, exited, stopped
    health: str | None  # None (no healthcheck), starting, healthy, unhealthy
    pid: int | None
    exit_code: int | None
    restarts: int


class _Runtime:
    """Mutable state of one service; guarded by the harness's condition variable."""

    def __init__(self, service: Service, root: Path) -> None:
        self.service = service
        self.root = root
        self.state = "created"
        self.health: str | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.exit_code: int | None = None
        self.restarts = 0
        self.generation = 0
        self.user_stopped = False
        self.restart_pending = False
        self.failed_checks = 0
        self.last_probe_output = ""
        self.wake = threading.Event()  # set to interrupt sleeps of the current generation
        self.pgids: set[int] = set()


class LocalHarness:
    """Runs a compose project's services as process groups under ``run_dir``.

    ``variables`` are what ``${VAR}`` sees (default: this process's environment); the
    harness adds CT_HOST and, per service, CT_ROOT. ``run_dir`` must not exist or be empty:
    ``down()`` deletes it. ``image_env`` stands for the environment an image would set (for
    example compose.image.image_environment_variables); the compose file's own
    environment comes after it.
    """

    mode = "local"

    def __init__(
        self,
        compose_file: str | Path,
        run_dir: str | Path,
        *,
        variables: Mapping[str, str] | None = None,
        profiles: Sequence[str] = (),
        project_name: str | None = None,
        image_env: Mapping[str, str] | None = None,
    ) -> None:
        self.image_env = dict(image_env or {})
        self.run_dir = Path(run_dir).resolve()
        if self.run_dir.exists() and (not self.run_dir.is_dir() or any(self.run_dir.iterdir())):
            raise ComposeError(
                f"run directory {self.run_dir} exists and is not empty; down() would wipe it"
            )
        base = dict(os.environ if variables is None else variables)
        base["CT_HOST"] = "127.0.0.1"
        self.project: Project = load_project(
            compose_file,
            variables=base,
            per_service=lambda name: {"CT_ROOT": str(self.run_dir / "roots" / name)},
            name=project_name,
        )
        self.profiles = tuple(profiles)
        self.enabled = self.project.enabled(self.profiles)
        self.run_id = secrets.token_hex(8)
        self._cond = threading.Condition()
        self._closed = False
        self._runtimes = {
            name: _Runtime(self.project.services[name], self.run_dir / "roots" / name)
            for name in self.enabled
        }
        self._prepared = False

    # --- public API ----------------------------------------------------------------------

    def up(self, services: Iterable[str] | None = None, *, wait: bool = False) -> None:
        """Start ``services`` (default: all enabled) and their dependencies, in order.

        Each dependency's condition is awaited before its dependent starts. With ``wait``,
        also wait until every started service with a healthcheck is healthy and every
        one-shot service that already exited did so with status 0. On ``ServiceFailed`` the
        services already started keep running (to be inspected); ``down()`` ends them.
        """
        order = self._start_order(services)
        self._prepare()
        for name in order:
            runtime = self._runtime(name)
            for dep in runtime.service.depends_on:
                if dep.service not in self._runtimes:
                    if dep.required:
                        raise UnknownService(
                            f"service {name!r} needs {dep.service!r}, whose profile is not enabled"
                        )
                    continue
                self._await_condition(dep.service, dep.condition, dependent=name)
            with self._cond:
                already = runtime.state == "running" or (
                    runtime.state == "exited" and runtime.exit_code == 0
                    and not runtime.service.restart.should_restart(0, 0)
                )
            if not already:
                self._spawn(name, fresh=True)
        if wait:
            for name in order:
                runtime = self._runtime(name)
                if runtime.service.healthcheck is not None:
                    self.wait_healthy(name)
                else:
                    with self._cond:
                        exited = runtime.state == "exited"
                    if exited:
                        self.wait_completed(name)

    def wait_healthy(self, service: str) -> None:
        """Block until ``service`` is healthy; ``ServiceFailed`` if it becomes unhealthy or
        exits for good. The healthcheck's own retries bound the wait."""
        runtime = self._runtime(service)
        if runtime.service.healthcheck is None:
            raise ComposeError(f"service {service!r} has no healthcheck to wait for")
        with self._cond:
            while True:
                if runtime.state == "running" and runtime.health == "healthy":
                    return
                if runtime.state == "running" and runtime.health == "unhealthy":
                    reason = (
                        f"service {service!r} is unhealthy after {runtime.failed_checks} "
                        f"failed health checks; last check output: "
                        f"{runtime.last_probe_output.strip() or '(none)'}"
                    )
                    break
                if runtime.state in ("exited", "stopped") and not runtime.restart_pending:
                    reason = self._ended_reason(runtime, "before becoming healthy")
                    break
                if runtime.state == "created":
                    reason = f"service {service!r} was never started"
                    break
                self._cond.wait()
        raise ServiceFailed(service, self._with_log_tail(service, reason))

    def wait_completed(self, service: str) -> int:
        """Block until a one-shot ``service`` has exited for good; ``ServiceFailed`` unless
        its status is 0."""
        runtime = self._runtime(service)
        with self._cond:
            while True:
                if runtime.state == "created":
                    raise ServiceFailed(service, f"service {service!r} was never started")
                if runtime.state in ("exited", "stopped") and not runtime.restart_pending:
                    code = runtime.exit_code
                    break
                self._cond.wait()
        if code != 0:
            reason = self._ended_reason(runtime, "instead of completing successfully")
            raise ServiceFailed(service, self._with_log_tail(service, reason))
        return code

    def wait_all_completed(self, services: Iterable[str]) -> None:
        """Block until every one of ``services`` has exited with status 0; ``ServiceFailed``
        as soon as one of them exits otherwise (its peers may be left waiting for it)."""
        runtimes = [self._runtime(name) for name in services]
        failed: _Runtime | None = None
        with self._cond:
            while failed is None:
                finished = 0
                for runtime in runtimes:
                    if runtime.state == "created":
                        name = runtime.service.name
                        raise ServiceFailed(name, f"service {name!r} was never started")
                    if runtime.state in ("exited", "stopped") and not runtime.restart_pending:
                        if runtime.exit_code != 0:
                            failed = runtime
                            break
                        finished += 1
                if failed is None:
                    if finished == len(runtimes):
                        return
                    self._cond.wait()
        reason = self._ended_reason(failed, "instead of completing successfully")
        raise ServiceFailed(failed.service.name, self._with_log_tail(failed.service.name, reason))

    def stop(self, service: str, *, timeout: float | None = None) -> None:
        """Signal the service's process group with its stop signal, SIGKILL after the grace
        period (``stop_grace_period`` or ``timeout``). Its restart policy does not apply."""
        runtime = self._runtime(service)
        grace = runtime.service.stop_grace_period if timeout is None else timeout
        with self._cond:
            runtime.user_stopped = True
            runtime.restart_pending = False
            proc = runtime.proc
            runtime.wake.set()
            pgids = frozenset(runtime.pgids)
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, runtime.service.stop_signal)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                log.warning("service %s did not stop within %.1fs; killing it", service, grace)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
        # Whatever is left in its groups or carries its marker (helpers, workers) goes too.
        kill_all(f"{self.run_id}:{service}", pgids=pgids)
        if proc is not None:
            proc.wait()
        with self._cond:
            while runtime.state == "running":
                self._cond.wait()
            if runtime.state != "created":
                runtime.state = "stopped"
            runtime.health = None
            self._cond.notify_all()

    def start(self, service: str) -> None:
        """Start a stopped (or never started) service again, without waiting for anything."""
        runtime = self._runtime(service)
        self._prepare()
        with self._cond:
            if runtime.state == "running":
                return
        self._spawn(service, fresh=True)

    def restart(self, service: str, *, timeout: float | None = None) -> None:
        self.stop(service, timeout=timeout)
        self.start(service)

    def exec(
        self,
        service: str,
        argv: Sequence[str],
        *,
        input: bytes | None = None,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[bytes]:
        """Run ``argv`` next to a running service, with its environment and working directory
        (``docker compose exec``). Returns the completed process with stdout and stderr."""
        runtime = self._runtime(service)
        with self._cond:
            if runtime.state != "running":
                raise ComposeError(f"service {service!r} is not running ({runtime.state})")
        return self._run_command(runtime, argv, input=input, env=env)

    def run(
        self,
        service: str,
        argv: Sequence[str],
        *,
        input: bytes | None = None,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[bytes]:
        """Run a one-off ``argv`` with the service's environment, mounts and working
        directory, whether or not the service runs (``docker compose run --rm --no-deps``):
        for example a tenant command after the ``tenant`` one-shot has finished."""
        runtime = self._runtime(service)
        self._prepare()
        return self._run_command(runtime, argv, input=input, env=env)

    def _run_command(self, runtime, argv: Sequence[str], *, input: bytes | None,
                     env: Mapping[str, str] | None) -> subprocess.CompletedProcess[bytes]:
        """``argv`` with the service's environment (plus ``env``) and working directory."""
        environment = self._environment(runtime)
        environment.update(env or {})
        return subprocess.run(
            list(argv),
            input=input,
            capture_output=True,
            env=environment,
            cwd=self._working_dir(runtime),
            start_new_session=True,
            check=False,
        )

    def logs(self, service: str) -> str:
        """Everything the service wrote to stdout and stderr, across restarts."""
        self._runtime(service)
        path = self.log_path(service)
        if not path.exists():
            return ""
        return path.read_text(encoding="utf-8", errors="replace")

    def log_path(self, service: str) -> Path:
        return self.run_dir / "logs" / f"{service}.log"

    def host_path(self, service: str, container_path: str) -> Path:
        """Where ``container_path`` (absolute, inside the service) lives on this host."""
        if not container_path.startswith("/"):
            raise ValueError(f"container path must be absolute: {container_path!r}")
        return self._runtime(service).root / container_path.lstrip("/")

    def volume_path(self, volume: str) -> Path:
        if volume not in self.project.volumes:
            raise UnknownService(f"no volume {volume!r} in the compose file")
        return self.run_dir / "volumes" / volume

    def ps(self) -> list[ServiceStatus]:
        with self._cond:
            return [
                ServiceStatus(
                    name=name,
                    state=rt.state,
                    health=rt.health,
                    pid=rt.proc.pid if rt.proc is not None and rt.state == "running" else None,
                    exit_code=rt.exit_code,
                    restarts=rt.restarts,
                )
                for name, rt in self._runtimes.items()
            ]

    def processes(self) -> list[int]:
        """PIDs of every live process of this run (for checks that nothing is left)."""
        return [p.pid for p in marked_processes(f"{self.run_id}:", pgids=self._all_pgids())]

    def down(self) -> None:
        """Stop every service (dependents first), kill anything left, verify that no process
        of the run survives and delete the run directory. Idempotent."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
        errors: list[str] = []
        for name in reversed(self._start_order(None)):
            runtime = self._runtimes[name]
            if runtime.state in ("running", "exited") or runtime.restart_pending:
                try:
                    self.stop(name)
                except ComposeError as exc:  # keep going: everything must end
                    errors.append(str(exc))
        survivors = kill_all(f"{self.run_id}:", pgids=self._all_pgids())
        if survivors:
            described = ", ".join(f"{p.pid} ({p.command}, state {p.state})" for p in survivors)
            raise LeftoverProcesses(
                [p.pid for p in survivors],
                f"processes of run {self.run_id} survived SIGKILL: {described}; "
                f"run directory {self.run_dir} kept",
            )
        shutil.rmtree(self.run_dir, ignore_errors=True)
        if self.run_dir.exists():
            raise ComposeError(f"could not remove run directory {self.run_dir}")
        if errors:
            raise ComposeError("; ".join(errors))

    def __enter__(self) -> LocalHarness:
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    # --- internals -----------------------------------------------------------------------

    def _runtime(self, service: str) -> _Runtime:
        runtime = self._runtimes.get(service)
        if runtime is None:
            if service in self.project.services:
                raise UnknownService(f"service {service!r} is not in an enabled profile")
            raise UnknownService(
                f"no service {service!r} in {self.project.path}; "
                f"services: {', '.join(self.project.services)}"
            )
        return runtime

    def _all_pgids(self) -> frozenset[int]:
        with self._cond:
            return frozenset(g for rt in self._runtimes.values() for g in rt.pgids)

    def _start_order(self, services: Iterable[str] | None) -> list[str]:
        wanted = list(self.enabled if services is None else services)
        order: list[str] = []
        seen: set[str] = set()

        def visit(name: str) -> None:
            if name in seen:
                return
            seen.add(name)
            runtime = self._runtime(name)
            for dep in runtime.service.depends_on:
                if dep.service in self._runtimes:
                    visit(dep.service)
            order.append(name)

        for name in wanted:
            visit(name)
        return order

    def _prepare(self) -> None:
        """Create the run directory, volumes and per-service roots with their mount links."""
        if self._prepared:
            return
        if self._closed:
            raise ComposeError("this harness has been brought down; create a new one")
        (self.run_dir / "logs").mkdir(parents=True, exist_ok=True, mode=0o700)
        self.run_dir.chmod(0o700)
        for volume in self.project.volumes:
            (self.run_dir / "volumes" / volume).mkdir(parents=True, exist_ok=True)
        for name, runtime in self._runtimes.items():
            root = runtime.root
            (root / ".ct" / "home").mkdir(parents=True, exist_ok=True)
            (root / ".ct" / "tmp").mkdir(parents=True, exist_ok=True)
            for i, mount in enumerate(runtime.service.mounts):
                if mount.kind == "bind":
                    assert mount.source is not None
                    source = Path(mount.source)
                    if not source.exists():
                        raise ComposeError(
                            f"service {name!r}: bind mount source {source} does not exist"
                        )
                elif mount.source is None:
                    source = self.run_dir / "volumes" / "_anonymous" / name / str(i)
                    source.mkdir(parents=True, exist_ok=True)
                else:
                    source = self.run_dir / "volumes" / mount.source
                link = root / mount.target.lstrip("/")
                if link.is_symlink() or link.exists():
                    raise ComposeError(
                        f"service {name!r}: mount target {mount.target} clashes with "
                        f"another mount or the harness's own .ct directory"
                    )
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(source, target_is_directory=source.is_dir())
        self._prepared = True

    def _environment(self, runtime: _Runtime) -> dict[str, str]:
        env = {
            "PATH": os.pathsep.join(
                [str(Path(sys.executable).parent), os.environ.get("PATH", os.defpath)]
            ),
            "HOME": str(runtime.root / ".ct" / "home"),
            "TMPDIR": str(runtime.root / ".ct" / "tmp"),
            "LANG": "C.UTF-8",
        }
        env.update(self.image_env)
        env.update(runtime.service.environment)
        env[MARKER_VARIABLE] = f"{self.run_id}:{runtime.service.name}"
        return env

    def _working_dir(self, runtime: _Runtime) -> Path:
        configured = runtime.service.working_dir
        if configured is None:
            return runtime.root
        path = Path(configured)
        if not path.is_absolute():
            raise ComposeError(
                f"service {runtime.service.name!r}: working_dir {configured!r} is not absolute"
            )
        if not path.exists():
            if not path.is_relative_to(runtime.root):
                raise ComposeError(
                    f"service {runtime.service.name!r}: working_dir {configured} does not exist "
                    "on this host; write container paths as ${CT_ROOT:-}/..."
                )
            path.mkdir(parents=True)
        return path

    def _spawn(self, name: str, *, fresh: bool) -> None:
        runtime = self._runtime(name)
        service = runtime.service
        if not service.argv:
            raise ComposeError(
                f"service {name!r} has no command or entrypoint; the local harness cannot "
                "use an image's default command"
            )
        env = self._environment(runtime)
        cwd = self._working_dir(runtime)
        with self._cond:
            if self._closed and fresh:
                raise ComposeError("this harness has been brought down; create a new one")
            if not fresh and (runtime.user_stopped or self._closed):
                # stop() or down() came between the restart decision and now.
                runtime.restart_pending = False
                self._cond.notify_all()
                return
            if fresh:
                runtime.user_stopped = False
                runtime.restarts = 0
            runtime.generation += 1
            generation = runtime.generation
            runtime.wake = threading.Event()
            runtime.failed_checks = 0
            runtime.last_probe_output = ""
            runtime.restart_pending = False
            with open(self.log_path(name), "ab") as log_file:
                try:
                    proc = subprocess.Popen(
                        list(service.argv),
                        stdin=subprocess.DEVNULL,
                        stdout=log_file,
                        stderr=subprocess.STDOUT,
                        env=env,
                        cwd=cwd,
                        start_new_session=True,
                    )
                except OSError as exc:
                    runtime.state = "exited"
                    runtime.exit_code = 127
                    self._cond.notify_all()
                    raise ServiceFailed(
                        name, f"service {name!r} could not start {service.argv[0]!r}: {exc}"
                    ) from None
            runtime.proc = proc
            runtime.pgids.add(proc.pid)
            runtime.state = "running"
            runtime.exit_code = None
            runtime.health = "starting" if service.healthcheck is not None else None
            self._cond.notify_all()
            wake = runtime.wake
        log.info("started %s (pid %d)", name, proc.pid)
        threading.Thread(
            target=self._supervise, args=(runtime, proc, generation), daemon=True,
            name=f"compose-supervise-{name}",
        ).start()
        if service.healthcheck is not None:
            threading.Thread(
                target=self._monitor, args=(runtime, proc, generation, wake, cwd), daemon=True,
                name=f"compose-health-{name}",
            ).start()

    def _supervise(self, runtime: _Runtime, proc: subprocess.Popen[bytes], generation: int) -> None:
        code = proc.wait()
        name = runtime.service.name
        with self._cond:
            if runtime.generation != generation:
                return
            runtime.state = "exited"
            runtime.exit_code = code
            runtime.health = None
            runtime.wake.set()
            restart = (
                not runtime.user_stopped
                and not self._closed
                and runtime.service.restart.should_restart(code, runtime.restarts)
            )
            runtime.restart_pending = restart
            wake = runtime.wake
            self._cond.notify_all()
        log.info("%s exited with status %d%s", name, code, " (restarting)" if restart else "")
        if not restart:
            return
        delay = min(_RESTART_BACKOFF_START * (2 ** runtime.restarts), _RESTART_BACKOFF_MAX)
        wake.clear()
        interrupted = wake.wait(delay)
        with self._cond:
            if (
                interrupted
                or runtime.generation != generation
                or runtime.user_stopped
                or self._closed
            ):
                runtime.restart_pending = False
                self._cond.notify_all()
                return
            runtime.restarts += 1
        try:
            self._spawn(name, fresh=False)
        except ComposeError as exc:
            log.error("%s", exc)

    def _monitor(
        self,
        runtime: _Runtime,
        proc: subprocess.Popen[bytes],
        generation: int,
        wake: threading.Event,
        cwd: Path,
    ) -> None:
        check = runtime.service.healthcheck
        assert check is not None
        env = self._environment(runtime)
        started = time.monotonic()
        while True:
            in_start_period = time.monotonic() - started < check.start_period
            pause = check.start_interval if in_start_period else check.interval
            if wake.wait(pause):
                return
            in_start_period = time.monotonic() - started < check.start_period
            ok, output = self._probe(runtime, check.argv, check.timeout, env, cwd)
            with self._cond:
                if runtime.generation != generation or proc.poll() is not None:
                    return
                runtime.last_probe_output = output
                if ok:
                    runtime.failed_checks = 0
                    runtime.health = "healthy"
                elif not in_start_period:
                    runtime.failed_checks += 1
                    if runtime.failed_checks >= check.retries:
                        runtime.health = "unhealthy"
                self._cond.notify_all()

    def _probe(
        self,
        runtime: _Runtime,
        argv: tuple[str, ...],
        timeout: float,
        env: dict[str, str],
        cwd: Path,
    ) -> tuple[bool, str]:
        try:
            probe = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=cwd,
                start_new_session=True,
            )
        except OSError as exc:
            return False, f"cannot run healthcheck {argv[0]!r}: {exc}"
        with self._cond:
            runtime.pgids.add(probe.pid)
        try:
            output, _ = probe.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(probe.pid, signal.SIGKILL)
            output, _ = probe.communicate()
            return False, f"healthcheck timed out after {timeout:g}s"
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(probe.pid, signal.SIGKILL)  # nothing a probe started may linger
            with self._cond:
                runtime.pgids.discard(probe.pid)
        text = output[-MAX_PROBE_OUTPUT:].decode("utf-8", errors="replace")
        if probe.returncode != 0:
            return False, f"exit status {probe.returncode}: {text}"
        return True, text

    def _await_condition(self, service: str, condition: str, *, dependent: str) -> None:
        try:
            if condition == "service_healthy":
                self.wait_healthy(service)
            elif condition == "service_completed_successfully":
                self.wait_completed(service)
            else:
                runtime = self._runtime(service)
                with self._cond:
                    started = runtime.state != "created"
                if not started:
                    raise ServiceFailed(service, f"service {service!r} was never started")
        except ServiceFailed as exc:
            raise ServiceFailed(
                service, f"dependency of {dependent!r} failed ({condition}): {exc}"
            ) from None

    def _ended_reason(self, runtime: _Runtime, what: str) -> str:
        name = runtime.service.name
        if runtime.state == "stopped":
            return f"service {name!r} was stopped {what}"
        code = runtime.exit_code
        if code is not None and code < 0:
            return f"service {name!r} was killed by signal {signal.Signals(-code).name} {what}"
        return f"service {name!r} exited with status {code} {what}"

    def _with_log_tail(self, service: str, reason: str) -> str:
        lines = self.logs(service).splitlines()[-LOG_TAIL_LINES:]
        tail = "\n".join(f"  | {line}" for line in lines) if lines else "  | (empty log)"
        return f"{reason}\nlast lines of {self.log_path(service)}:\n{tail}"
