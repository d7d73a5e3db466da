"""``python -m compose up|down|ps|logs``: run docker-compose.yml for people.

Without a Docker engine, ``up`` runs the services as local processes in the foreground: it
starts them in dependency order, prints their health, follows their logs (each line prefixed
with the service name) and, on Ctrl-C, once every service has exited, or when the
``--exit-code-from`` service exits (its status becomes ours), stops everything and wipes the run
directory. The services run from a measured environment built in the run directory
(compose/image.py: the project installed as the image holds it, with its code manifest, its
``bin`` first on PATH), so ``trainer --attest`` runs as it would in the image. While it
runs, ``ps``, ``logs`` and ``down`` work from another terminal through
``RUN_DIR/state.json`` (run id, service states, pids; no secrets). With an engine, each
command is handed to ``docker compose``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from compose.docker import compose_base_argv
from compose.errors import ComposeError, ServiceFailed
from compose.harness import docker_engine_available
from compose.image import build_image_environment, image_environment_variables
from compose.local import LocalHarness
from compose.proctree import kill_all
from compose.spec import load_project, read_env_file

__all__ = ["main"]

STATE_FILE = "state.json"
_FOLLOW_PAUSE = 0.2


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-f", "--file", default="docker-compose.yml",
                        help="compose file (default: ./docker-compose.yml)")
    common.add_argument("--run-dir", default="run/compose",
                        help="where local runs keep logs, volumes and state (default: run/compose)")
    common.add_argument("--profile", action="append", default=[],
                        help="enable services of this profile (repeatable)")
    common.add_argument("--mode", choices=("auto", "local", "docker"), default="auto",
                        help="docker compose if an engine runs (auto), or force one")
    parser = argparse.ArgumentParser(
        prog="python -m compose",
        description="Run docker-compose.yml under docker compose, or as local processes "
        "where no Docker engine exists.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", parents=[common], help="start services and follow their logs")
    up.add_argument("services", nargs="*", help="services to start (default: all)")
    up.add_argument("--quiet-logs", action="store_true", help="do not print service logs")
    up.add_argument("--exit-code-from", metavar="SERVICE",
                    help="stop everything when SERVICE exits and return its exit status")
    sub.add_parser("down", parents=[common], help="stop everything and wipe the run directory")
    sub.add_parser("ps", parents=[common], help="list services and their state")
    logs = sub.add_parser("logs", parents=[common], help="print a service's log")
    logs.add_argument("service")
    logs.add_argument("--follow", "-F", action="store_true", help="keep printing new lines")
    return parser


def _variables(compose_file: Path) -> dict[str, str]:
    """The shell environment over ``.env`` next to the compose file, as docker compose does."""
    variables: dict[str, str] = {}
    dotenv = compose_file.parent / ".env"
    if dotenv.exists():
        for key, value in read_env_file(dotenv, ".env").items():
            if value is not None:
                variables[key] = value
    variables.update(os.environ)
    return variables


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    compose_file = Path(args.file).resolve()
    run_dir = Path(args.run_dir).resolve()
    try:
        use_docker = args.mode == "docker" or (args.mode == "auto" and docker_engine_available())
        if use_docker:
            return _docker(args, compose_file)
        if args.command == "up":
            return _up(args, compose_file, run_dir)
        if args.command == "down":
            return _down(run_dir)
        if args.command == "ps":
            return _ps(run_dir)
        return _logs(run_dir, args.service, follow=args.follow)
    except ComposeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _docker(args: argparse.Namespace, compose_file: Path) -> int:
    project = load_project(compose_file, variables=_variables(compose_file))
    base = compose_base_argv(project, args.profile)
    extra: list[str] = {
        "up": (["--exit-code-from", args.exit_code_from]
               if getattr(args, "exit_code_from", None) else [])
        + list(getattr(args, "services", [])),
        "down": ["--volumes", "--remove-orphans"],
        "ps": ["--all"],
        "logs": (["--follow"] if getattr(args, "follow", False) else [])
        + [getattr(args, "service", "")],
    }[args.command]
    return subprocess.run([*base, args.command, *extra], check=False).returncode


# --- local mode ----------------------------------------------------------------------------


_STATE_LOCK = threading.Lock()


def _write_state(harness: LocalHarness, path: Path) -> None:
    state = {
        "run_id": harness.run_id,
        "pid": os.getpid(),
        "compose_file": str(harness.project.path),
        "services": [status.__dict__ for status in harness.ps()],
    }
    with _STATE_LOCK:
        if not path.parent.exists():
            return
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        tmp.replace(path)


def _read_state(run_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((run_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None


def _up(args: argparse.Namespace, compose_file: Path, run_dir: Path) -> int:
    # The image the services run from: a measured environment in the run directory
    # (compose/image.py), so `trainer --attest` finds its code manifest; down() removes it.
    image = run_dir / "image"
    harness = LocalHarness(
        compose_file, run_dir, variables=_variables(compose_file), profiles=args.profile,
        image_env=image_environment_variables(image),
    )
    build_image_environment(image)
    if args.exit_code_from is not None and args.exit_code_from not in harness.enabled:
        raise ComposeError(f"--exit-code-from: no enabled service {args.exit_code_from!r}")
    stopping = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        stopping.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    state_path = run_dir / STATE_FILE
    offsets: dict[str, int] = {}
    start_errors: list[ComposeError] = []
    exit_code: int | None = None
    try:
        print(f"run directory: {run_dir} (run {harness.run_id})", flush=True)
        starter = threading.Thread(
            target=_start, args=(harness, args.services, stopping, start_errors),
            kwargs={"watched": args.exit_code_from}, daemon=True,
        )
        starter.start()
        last_report = ""
        while not stopping.is_set():
            if run_dir.exists():
                _write_state(harness, state_path)
                if not args.quiet_logs:
                    _print_new_lines(harness, offsets)
            statuses = {s.name: s for s in harness.ps()}
            report = " ".join(
                f"{s.name}={s.state}{'/' + s.health if s.health else ''}"
                for s in statuses.values()
            )
            if report != last_report:
                print(f"[compose] {report}", flush=True)
                last_report = report
            watched = statuses.get(args.exit_code_from or "")
            if watched is not None and watched.state in ("exited", "stopped"):
                exit_code = watched.exit_code if watched.exit_code is not None else 1
                print(f"[compose] {watched.name} exited with status {exit_code}", flush=True)
                break
            if not starter.is_alive() and all(
                s.state in ("exited", "stopped", "created") for s in statuses.values()
            ):
                break
            stopping.wait(_FOLLOW_PAUSE)
        if not args.quiet_logs and run_dir.exists():
            _print_new_lines(harness, offsets)
        if exit_code is None:
            failed = bool(start_errors) or any(
                s.exit_code not in (None, 0) for s in harness.ps()
            )
            exit_code = 1 if failed else 0
    finally:
        print("[compose] stopping every service", flush=True)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        harness.down()
        print("[compose] all processes gone, run directory removed", flush=True)
    return exit_code


def _start(
    harness: LocalHarness,
    services: list[str],
    stopping: threading.Event,
    errors: list[ComposeError],
    *,
    watched: str | None = None,
) -> None:
    """``up --wait`` in the starter thread; a failure stops the run. ``watched`` (the
    ``--exit-code-from`` service) exiting while services still start is how such a run ends,
    not a failure: ``up`` reports it as one (a one-shot that exited non-zero), and the
    follow loop takes its status, whichever of the two sees the exit first."""
    try:
        harness.up(services or None, wait=True)
        _write_state(harness, harness.run_dir / STATE_FILE)
        print("[compose] every service is up", flush=True)
    except ComposeError as exc:
        if stopping.is_set():
            return  # interrupted while starting: not a failure of the services
        if (isinstance(exc, ServiceFailed) and exc.service == watched
                and any(s.name == watched and s.state in ("exited", "stopped")
                        for s in harness.ps())):
            return
        errors.append(exc)
        print(f"[compose] error: {exc}", file=sys.stderr, flush=True)
        stopping.set()


def _print_new_lines(harness: LocalHarness, offsets: dict[str, int]) -> None:
    width = max(len(name) for name in harness.enabled)
    for name in harness.enabled:
        path = harness.log_path(name)
        try:
            with open(path, "rb") as handle:
                handle.seek(offsets.get(name, 0))
                data = handle.read()
        except OSError:
            continue
        complete = data.rfind(b"\n") + 1
        offsets[name] = offsets.get(name, 0) + complete
        for line in data[:complete].decode("utf-8", errors="replace").splitlines():
            print(f"{name:<{width}} | {line}", flush=True)


def _is_compose_up(pid: int) -> bool:
    """Whether ``pid`` still is a ``python -m compose up`` (and not a reused pid)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"compose" in argv and b"up" in argv


def _down(run_dir: Path) -> int:
    state = _read_state(run_dir)
    if state is None:
        if run_dir.exists():
            print(f"no state in {run_dir}; nothing is running from it", file=sys.stderr)
        else:
            print(f"{run_dir} does not exist; nothing to do")
        return 0
    owner = int(state["pid"])
    if _is_compose_up(owner):
        with contextlib.suppress(ProcessLookupError):
            os.kill(owner, signal.SIGTERM)  # the `up` process tears down cleanly
    for _ in range(300):
        if not run_dir.exists():
            break
        time.sleep(0.1)
    survivors = kill_all(f"{state['run_id']}:")
    shutil.rmtree(run_dir, ignore_errors=True)
    if survivors:
        print(f"error: processes survived: {[p.pid for p in survivors]}", file=sys.stderr)
        return 1
    print(f"run {state['run_id']} stopped; {run_dir} removed")
    return 0


def _ps(run_dir: Path) -> int:
    state = _read_state(run_dir)
    if state is None:
        print(f"nothing running from {run_dir}")
        return 0
    print(f"{'SERVICE':<20} {'STATE':<10} {'HEALTH':<10} {'PID':>8} {'EXIT':>5} {'RESTARTS':>8}")
    for s in state["services"]:
        alive = s["pid"] is not None and Path(f"/proc/{s['pid']}").exists()
        pid = s["pid"] if alive else "-"
        exit_code = "-" if s["exit_code"] is None else s["exit_code"]
        print(f"{s['name']:<20} {s['state']:<10} {s['health'] or '-':<10} {pid!s:>8} "
              f"{exit_code!s:>5} {s['restarts']:>8}")
    return 0


def _logs(run_dir: Path, service: str, *, follow: bool) -> int:
    path = run_dir / "logs" / f"{service}.log"
    if not path.exists():
        print(f"error: no log for service {service!r} in {run_dir}", file=sys.stderr)
        return 1
    with open(path, "rb") as handle:
        while True:
            data = handle.read()
            if data:
                sys.stdout.write(data.decode("utf-8", errors="replace"))
                sys.stdout.flush()
            if not follow or not path.exists():
                return 0
            time.sleep(_FOLLOW_PAUSE)
