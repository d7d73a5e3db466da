"""The local runner with toy services: ordering, health, mapping, restarts, teardown."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from compose import ComposeError, ServiceFailed
from tests.compose.conftest import HarnessFactory, live_processes

TOY = r'''
import json, os, pathlib, signal, subprocess, sys, time

def event(text):
    with open(os.environ["EVENTS"], "a") as f:
        f.write(text + "\n")

mode, name = sys.argv[1], sys.argv[2]
if mode == "oneshot":
    event(f"{name} start")
    time.sleep(float(sys.argv[3]))
    event(f"{name} done")
    sys.exit(int(sys.argv[4]))
if mode == "serve":
    ready = pathlib.Path(os.environ["HOME"], "ready")

    def on_term(signum, frame):
        ready.unlink(missing_ok=True)  # so that a restarted life is not healthy too early
        sys.exit(0)

    signal.signal(signal.SIGTERM, on_term)
    event(f"{name} start")
    print(f"{name} booting", flush=True)
    time.sleep(float(sys.argv[3]))
    pathlib.Path(os.environ["HOME"], "ready").touch()
    event(f"{name} ready")
    while True:
        time.sleep(60)
if mode == "crash-once":
    marker = pathlib.Path(sys.argv[3])
    if not marker.exists():
        marker.touch()
        print(f"{name} crashing on purpose", flush=True)
        sys.exit(3)
    pathlib.Path(os.environ["HOME"], "ready").touch()
    print(f"{name} second life", flush=True)
    while True:
        time.sleep(60)
if mode == "spawn":
    # A child in our group, one that escapes into its own session (as torchrun workers do),
    # and an orphan whose parent exits at once: all must be found and ended by down().
    pids = pathlib.Path(sys.argv[3])
    sleeper = [sys.executable, "-c", "import time; time.sleep(600)"]
    child = subprocess.Popen(sleeper)
    escaped = subprocess.Popen(sleeper, start_new_session=True)
    middle = os.fork()
    if middle == 0:
        orphan = subprocess.Popen(sleeper, start_new_session=True)
        with open(pids, "a") as f:
            f.write(f"{orphan.pid}\n")
        os._exit(0)
    os.waitpid(middle, 0)
    with open(pids, "a") as f:
        f.write(f"{os.getpid()}\n{child.pid}\n{escaped.pid}\n")
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # make stop() fall back to SIGKILL
    pathlib.Path(os.environ["HOME"], "ready").touch()
    while True:
        time.sleep(60)
'''

# One line, so that it can be put into any indented toy file.
READY_CHECK = (
    "{test: [CMD-SHELL, 'test -f \"$$HOME/ready\"'], interval: 50ms, start_interval: 50ms,"
    " retries: 3, start_period: 20s}"
)


@pytest.fixture
def toy(tmp_path: Path) -> Path:
    app = tmp_path / "app"
    app.mkdir()
    (app / "toy.py").write_text(TOY)
    return app


def events(harness) -> list[str]:
    return (harness.volume_path("shared") / "events").read_text().splitlines()


def test_depends_on_orders_by_completion_and_health(make_harness: HarnessFactory, toy: Path):
    harness = make_harness(
        f"""
        x-env: &env
          EVENTS: ${{CT_ROOT:-}}/shared/events
        services:
          client:
            command: [python, "${{CT_ROOT:-}}/app/toy.py", oneshot, client, "0", "0"]
            environment: *env
            volumes: [shared:/shared, {toy}:/app:ro]
            depends_on:
              web: {{condition: service_healthy}}
          web:
            command: [python, "${{CT_ROOT:-}}/app/toy.py", serve, web, "0.4"]
            environment: *env
            volumes: [shared:/shared, {toy}:/app:ro]
            depends_on:
              init: {{condition: service_completed_successfully}}
            healthcheck: {READY_CHECK}
          init:
            command: [python, "${{CT_ROOT:-}}/app/toy.py", oneshot, init, "0.3", "0"]
            environment: *env
            volumes: [shared:/shared, {toy}:/app:ro]
        volumes:
          shared:
        """
    )
    harness.up()
    assert harness.wait_completed("client") == 0
    # web waited for init to finish; client waited for web to be ready, not just started.
    assert events(harness) == [
        "init start",
        "init done",
        "web start",
        "web ready",
        "client start",
        "client done",
    ]
    states = {s.name: s for s in harness.ps()}
    assert states["init"].state == "exited" and states["init"].exit_code == 0
    assert states["web"].state == "running" and states["web"].health == "healthy"


def test_wait_all_completed_fails_fast(make_harness: HarnessFactory):
    harness = make_harness(
        """
        services:
          ok:
            command: [python, -c, "print('fine')"]
          waiting:
            command: [python, -c, "import time; time.sleep(600)"]
          broken:
            command: [python, -c, "import sys; print('peer lost'); sys.exit(6)"]
        """
    )
    harness.up()
    with pytest.raises(ServiceFailed, match=r"(?s)'broken' exited with status 6.*peer lost"):
        harness.wait_all_completed(["ok", "waiting", "broken"])
    assert {s.name: s.state for s in harness.ps()}["waiting"] == "running"
    harness.stop("waiting")
    with pytest.raises(ServiceFailed, match="'waiting' was stopped instead of completing"):
        harness.wait_all_completed(["ok", "waiting"])
    harness.wait_all_completed(["ok"])


def test_failed_one_shot_blocks_its_dependents(make_harness: HarnessFactory, toy: Path):
    harness = make_harness(
        f"""
        services:
          migrate:
            command: [python, "${{CT_ROOT:-}}/app/toy.py", oneshot, migrate, "0", "4"]
            environment: {{EVENTS: "${{CT_ROOT:-}}/shared/events"}}
            volumes: [shared:/shared, {toy}:/app]
          api:
            command: [python, "${{CT_ROOT:-}}/app/toy.py", oneshot, api, "0", "0"]
            environment: {{EVENTS: "${{CT_ROOT:-}}/shared/events"}}
            volumes: [shared:/shared, {toy}:/app]
            depends_on:
              migrate: {{condition: service_completed_successfully}}
        volumes: {{shared: {{}}}}
        """
    )
    with pytest.raises(ServiceFailed) as failure:
        harness.up()
    assert failure.value.service == "migrate"
    message = str(failure.value)
    assert "dependency of 'api' failed (service_completed_successfully)" in message
    assert "service 'migrate' exited with status 4" in message
    assert events(harness) == ["migrate start", "migrate done"]
    assert {s.name: s.state for s in harness.ps()}["api"] == "created"


def test_health_check_retries_until_healthy(make_harness: HarnessFactory, tmp_path: Path):
    # The check fails twice and passes on its third run; retries=5 tolerates that.
    counter = tmp_path / "attempts"
    harness = make_harness(
        f"""
        services:
          slow:
            command: [python, -c, "import time; time.sleep(600)"]
            healthcheck:
              test: [CMD, python, -c, "import pathlib, sys; p = pathlib.Path('{counter}');
                n = len(p.read_text()) + 1 if p.exists() else 1; p.write_text('x' * n);
                print('attempt', n); sys.exit(0 if n >= 3 else 1)"]
              interval: 50ms
              retries: 5
        """
    )
    harness.up()
    harness.wait_healthy("slow")
    assert counter.read_text() == "xxx"
    assert {s.name: s.health for s in harness.ps()}["slow"] == "healthy"


def test_failures_in_start_period_do_not_count(make_harness: HarnessFactory, toy: Path):
    # retries=1 would mark it unhealthy at the first failure, were it not in its start period.
    harness = make_harness(
        f"""
        services:
          web:
            command: [python, "${{CT_ROOT:-}}/app/toy.py", serve, web, "0.5"]
            environment: {{EVENTS: "${{CT_ROOT:-}}/events"}}
            volumes: ["{toy}:/app"]
            healthcheck:
              test: ["CMD-SHELL", "test -f \\"$$HOME/ready\\""]
              interval: 50ms
              start_interval: 50ms
              start_period: 20s
              retries: 1
        """
    )
    harness.up()
    harness.wait_healthy("web")
    assert "web ready" in (harness.host_path("web", "/events")).read_text()


def test_never_healthy_fails_naming_service_with_log_tail(make_harness: HarnessFactory):
    harness = make_harness(
        """
        services:
          db:
            command: [python, -c, "import os, pathlib, time;
              print('db booting, cannot bind', flush=True);
              pathlib.Path(os.environ['HOME'], 'booted').touch(); time.sleep(600)"]
            healthcheck:
              # fails only once the service has logged, so that its log tail is known
              test: ["CMD-SHELL", "until test -f $$HOME/booted; do sleep 0.05; done;
                echo not ready yet; exit 1"]
              interval: 50ms
              retries: 3
          app:
            command: [python, -c, "print('should never run')"]
            depends_on:
              db: {condition: service_healthy}
        """
    )
    with pytest.raises(ServiceFailed) as failure:
        harness.up()
    assert failure.value.service == "db"
    message = str(failure.value)
    assert "dependency of 'app' failed (service_healthy)" in message
    assert "service 'db' is unhealthy after 3 failed health checks" in message
    assert "not ready yet" in message
    assert "db booting, cannot bind" in message  # the log tail
    states = {s.name: s for s in harness.ps()}
    assert states["db"].health == "unhealthy"
    assert states["app"].state == "created"
    assert harness.logs("app") == ""


def test_service_exiting_before_healthy_fails_fast(make_harness: HarnessFactory):
    harness = make_harness(
        """
        services:
          web:
            command: [python, -c, "import sys; print('config missing'); sys.exit(2)"]
            healthcheck:
              test: [CMD, "true"]
              interval: 10s
        """
    )
    harness.up()
    with pytest.raises(ServiceFailed, match=r"(?s)'web' exited with status 2 before becoming "
                       r"healthy.*config missing"):
        harness.wait_healthy("web")


def test_environment_and_volume_mapping(make_harness: HarnessFactory, tmp_path: Path):
    config = tmp_path / "config"
    config.mkdir()
    (config / "settings.txt").write_text("from the bind mount\n")
    (tmp_path / "base.env").write_text(
        "# comment\nFROM_FILE=file value\nOVERRIDDEN=from file\nexport QUOTED=\"a b\"\n"
    )
    dump = (
        "import json, os, pathlib;"
        "root = os.environ['OUT'];"
        "keys = ['FROM_FILE', 'OVERRIDDEN', 'QUOTED', 'LISTED', 'PASSED', 'DEFAULTED', 'EMPTY',"
        " 'HOME', 'TMPDIR', 'PYTEST_CURRENT_TEST', 'MISSING'];"
        "env = {k: os.environ.get(k) for k in keys};"
        "env['cwd'] = os.getcwd();"
        "env['config'] = pathlib.Path(os.environ['CONFIG'], 'settings.txt').read_text();"
        "pathlib.Path(root, 'env.json').write_text(json.dumps(env))"
    )
    harness = make_harness(
        f"""
        services:
          writer:
            command: [python, -c, "{dump}"]
            env_file: base.env
            environment:
              - OVERRIDDEN=from environment
              - LISTED=x=y
              - PASSED
              - MISSING
              - DEFAULTED=${{NOT_SET:-fallback}}
              - OUT=${{CT_ROOT:-}}/data
              - CONFIG=${{CT_ROOT:-}}/etc/app
              - EMPTY=
            working_dir: ${{CT_ROOT:-}}/data
            volumes:
              - data:/data
              - ./config:/etc/app:ro
          reader:
            entrypoint: [python, -c]
            command: ["import time; time.sleep(600)"]
            volumes:
              - type: volume
                source: data
                target: /mnt/shared
        volumes:
          data:
        """,
        variables={"PASSED": "from the caller"},
    )
    harness.up(["writer"])
    assert harness.wait_completed("writer") == 0
    written = harness.volume_path("data") / "env.json"
    env = json.loads(written.read_text())
    assert env["FROM_FILE"] == "file value"
    assert env["OVERRIDDEN"] == "from environment"
    assert env["QUOTED"] == "a b"
    assert env["LISTED"] == "x=y"
    assert env["PASSED"] == "from the caller"
    assert env["MISSING"] is None  # listed without value and not a variable: left unset
    assert env["DEFAULTED"] == "fallback"
    assert env["EMPTY"] == ""
    assert env["PYTEST_CURRENT_TEST"] is None  # the harness's environment does not leak in
    assert env["config"] == "from the bind mount\n"
    root = harness.run_dir / "roots" / "writer"
    assert Path(env["cwd"]).resolve() == written.parent.resolve()
    assert env["HOME"].startswith(str(root)) and env["TMPDIR"].startswith(str(root))
    # The same volume under another container path in another service.
    harness.up(["reader"])
    shown = harness.exec("reader", ["python", "-c", "import os, sys; "
                                    "print(open(sys.argv[1] + '/env.json').read())",
                                    str(harness.host_path("reader", "/mnt/shared"))])
    assert shown.returncode == 0
    assert json.loads(shown.stdout) == env
    assert harness.host_path("reader", "/mnt/shared").resolve() == written.parent.resolve()


def test_exec_sees_service_environment_and_requires_running(make_harness: HarnessFactory):
    harness = make_harness(
        """
        services:
          web:
            command: [python, -c, "import time; time.sleep(600)"]
            environment: {GREETING: hello}
            working_dir: ${CT_ROOT:-}/srv
        """
    )
    with pytest.raises(ComposeError, match="'web' is not running"):
        harness.exec("web", ["true"])
    harness.up()
    result = harness.exec("web", ["sh", "-c", 'echo "$GREETING from $(pwd)"; cat >&2'],
                          input=b"stdin works")
    assert result.returncode == 0
    assert result.stdout.decode() == f"hello from {harness.host_path('web', '/srv')}\n"
    assert result.stderr == b"stdin works"


def test_run_one_off_command_of_a_finished_service(make_harness: HarnessFactory):
    harness = make_harness(
        """
        services:
          setup:
            command: [python, -c, "import os; open(os.environ['OUT'], 'w').write('setup')"]
            environment: {OUT: "${CT_ROOT:-}/data/out", ROLE: tenant}
            volumes: [data:/data]
        volumes: {data: {}}
        """
    )
    harness.up()
    assert harness.wait_completed("setup") == 0
    result = harness.run("setup", ["sh", "-c", 'cat "$OUT"; echo " again as $ROLE"'])
    assert result.returncode == 0
    assert result.stdout == b"setup again as tenant\n"
    with pytest.raises(ComposeError, match="'setup' is not running"):
        harness.exec("setup", ["true"])


def test_restart_one_service_while_others_keep_running(make_harness: HarnessFactory, toy: Path):
    harness = make_harness(
        f"""
        x-common: &common
          environment: {{EVENTS: "${{CT_ROOT:-}}/shared/events"}}
          volumes: [shared:/shared, "{toy}:/app"]
        services:
          broker:
            <<: *common
            command: [python, "${{CT_ROOT:-}}/app/toy.py", serve, broker, "0"]
            healthcheck: {READY_CHECK}
          node:
            <<: *common
            command: [python, "${{CT_ROOT:-}}/app/toy.py", serve, node, "0"]
            depends_on: {{broker: {{condition: service_healthy}}}}
            healthcheck: {READY_CHECK}
        volumes: {{shared: {{}}}}
        """
    )
    harness.up(wait=True)
    before = {s.name: s.pid for s in harness.ps()}
    harness.stop("broker")
    assert {s.name: s.state for s in harness.ps()} == {"broker": "stopped", "node": "running"}
    harness.start("broker")
    harness.wait_healthy("broker")
    harness.restart("broker")
    harness.wait_healthy("broker")
    after = {s.name: s.pid for s in harness.ps()}
    assert after["node"] == before["node"]
    assert Path(f"/proc/{before['node']}").exists()
    assert after["broker"] != before["broker"]
    assert not Path(f"/proc/{before['broker']}").exists()
    assert events(harness).count("broker start") == 3
    assert events(harness).count("node start") == 1
    assert harness.logs("broker").count("broker booting") == 3


def test_restart_policy_on_failure(make_harness: HarnessFactory, toy: Path, tmp_path: Path):
    harness = make_harness(
        f"""
        services:
          flaky:
            command: [python, "${{CT_ROOT:-}}/app/toy.py", crash-once, flaky, "{tmp_path}/m"]
            volumes: ["{toy}:/app"]
            restart: on-failure
            healthcheck: {READY_CHECK}
        """
    )
    harness.up()
    harness.wait_healthy("flaky")
    (status,) = harness.ps()
    assert status.restarts == 1
    assert harness.logs("flaky").splitlines() == ["flaky crashing on purpose", "flaky second life"]
    # A stop is not a failure: the policy must not bring it back.
    harness.stop("flaky")
    (status,) = harness.ps()
    assert status.state == "stopped" and status.restarts == 1


def test_down_leaves_no_process_and_wipes_run_dir(
    make_harness: HarnessFactory, toy: Path, tmp_path: Path
):
    pid_file = tmp_path / "pids"
    harness = make_harness(
        f"""
        services:
          spawner:
            command: [python, "${{CT_ROOT:-}}/app/toy.py", spawn, spawner, "{pid_file}"]
            volumes: ["{toy}:/app"]
            stop_grace_period: 200ms
            healthcheck: {READY_CHECK}
        """
    )
    harness.up(wait=True)
    pids = [int(p) for p in pid_file.read_text().split()]
    (leader,) = [s.pid for s in harness.ps()]
    pgids = {leader}
    marker = f"CT_COMPOSE_ID={harness.run_id}:"
    found = live_processes(pgids=pgids, marker=marker)
    assert set(pids) <= set(found)
    # Two of them left the service's process group: only the marker finds those.
    assert len(live_processes(pgids=pgids, marker="\0never\0")) == 2
    assert harness.run_dir.exists()
    harness.down()
    assert live_processes(pgids=pgids, marker=marker) == []
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or _is_zombie(pid)
    assert not harness.run_dir.exists()
    harness.down()  # idempotent


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:  # gone meanwhile
        return b""


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rfind(")") + 2] == "Z"


def test_stop_escalates_to_sigkill(make_harness: HarnessFactory):
    harness = make_harness(
        f"""
        services:
          stubborn:
            command: [python, -c, "import os, pathlib, signal, time;
              signal.signal(signal.SIGTERM, signal.SIG_IGN);
              pathlib.Path(os.environ['HOME'], 'ready').touch(); time.sleep(600)"]
            stop_grace_period: 100ms
            healthcheck: {READY_CHECK}
        """
    )
    harness.up(wait=True)
    harness.stop("stubborn")
    (status,) = harness.ps()
    assert status.state == "stopped"
    assert status.exit_code == -signal.SIGKILL


def test_profiles_select_services(make_harness: HarnessFactory):
    harness = make_harness(
        """
        services:
          always:
            command: [python, -c, "print('always')"]
          debug:
            command: [python, -c, "print('debug')"]
            profiles: [debug]
        """
    )
    harness.up()
    assert [s.name for s in harness.ps()] == ["always"]
    assert harness.wait_completed("always") == 0
    with pytest.raises(ComposeError, match="not in an enabled profile"):
        harness.logs("debug")


def test_run_dir_must_be_empty(tmp_path: Path):
    from compose import LocalHarness

    (tmp_path / "docker-compose.yml").write_text("services:\n  a:\n    command: ['true']\n")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "precious").write_text("keep me")
    with pytest.raises(ComposeError, match="exists and is not empty"):
        LocalHarness(tmp_path / "docker-compose.yml", busy, variables={})
    assert (busy / "precious").read_text() == "keep me"


def test_missing_command_is_a_clear_error(make_harness: HarnessFactory):
    harness = make_harness(
        """
        services:
          db:
            image: postgres:16
        """
    )
    with pytest.raises(ComposeError, match="'db' has no command or entrypoint"):
        harness.up()


def test_stop_ends_only_that_service(make_harness: HarnessFactory):
    # "node" is a prefix of "node-b": stopping one must not touch the other's processes,
    # not even the helpers that left its process group.
    spawn = ("import os, pathlib, subprocess, sys, time; subprocess.Popen([sys.executable, '-c',"
             " 'import time; time.sleep(600)'], start_new_session=True);"
             " pathlib.Path(os.environ['HOME'], 'ready').touch(); time.sleep(600)")
    harness = make_harness(
        f"""
        services:
          node:
            command: [python, -c, "{spawn}"]
            healthcheck: {READY_CHECK}
          node-b:
            command: [python, -c, "{spawn}"]
            healthcheck: {READY_CHECK}
        """
    )
    harness.up(wait=True)

    def pythons(service: str) -> set[int]:  # leaves out healthcheck probes (sh)
        marker = f"CT_COMPOSE_ID={harness.run_id}:{service}\0"
        return {p for p in live_processes(pgids=set(), marker=marker) if b"python" in _cmdline(p)}

    others = pythons("node-b")
    assert len(others) == 2  # the service and its helper in another session
    assert len(pythons("node")) == 2
    harness.stop("node")
    assert live_processes(pgids=set(), marker=f"CT_COMPOSE_ID={harness.run_id}:node\0") == []
    assert pythons("node-b") == others
