"""Parsing the compose subset: interpolation, durations, and clear errors for bad files."""

from __future__ import annotations

import signal
import textwrap
from pathlib import Path

import pytest

from compose import ComposeFileError, LocalHarness, load_project
from compose.interpolate import interpolate
from compose.spec import parse_duration


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "docker-compose.yml"
    path.write_text(textwrap.dedent(text))
    return path


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("plain", "plain"),
        ("$$HOME and $$$$", "$HOME and $$"),
        ("${SET}/x $SET", "value/x value"),
        ("${UNSET}", ""),
        ("${UNSET:-fallback}", "fallback"),
        ("${EMPTY:-fallback}", "fallback"),
        ("${EMPTY-fallback}", ""),
        ("${UNSET-fallback}", "fallback"),
        ("${SET:+alt} ${EMPTY:+alt} ${EMPTY+alt}", "alt  alt"),
        ("${UNSET:-${SET}/nested}", "value/nested"),
        ("${CT_ROOT:-}/store/shards", "/store/shards"),
    ],
)
def test_interpolation(text: str, expected: str):
    assert interpolate(text, {"SET": "value", "EMPTY": ""}) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("${UNSET:?tenant id needed}", "required variable UNSET is missing: tenant id needed"),
        ("${EMPTY:?no}", "required variable EMPTY is missing"),
        ("cost $5", "invalid interpolation at '$5'"),
        ("${}", "invalid variable name"),
        ("${A", "invalid interpolation of 'A'"),
        ("${A:-open", "unclosed"),
        ("${A*B}", "invalid interpolation of 'A'"),
    ],
)
def test_interpolation_errors(text: str, message: str):
    with pytest.raises(ComposeFileError, match="at-test") as failure:
        interpolate(text, {"EMPTY": ""}, where="at-test")
    assert message in str(failure.value)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("5s", 5.0), ("500ms", 0.5), ("1m30s", 90.0), ("2.5s", 2.5), ("1h", 3600.0), ("10us", 1e-5)],
)
def test_durations(text: str, seconds: float):
    assert parse_duration(text, "x") == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["", "5", "5 s", "s5", "5x", "1m 30s", 5, None])
def test_bad_durations(bad: object):
    with pytest.raises(ComposeFileError, match="expected a duration like '5s'"):
        parse_duration(bad, "svc.healthcheck.interval")


def test_full_subset_parses(tmp_path: Path):
    (tmp_path / "cfg").mkdir()
    (tmp_path / "x.env").write_text("A=1\n")
    path = write(
        tmp_path,
        """
        name: Demo
        x-anchor: &hc
          test: ["CMD-SHELL", "probe $${X}"]
          interval: 2s
        services:
          one:
            image: ignored/by-the-local-runner
            entrypoint: python -m thing
            command: "serve --port ${PORT:-9} 'two words'"
            env_file: [x.env]
            environment: {B: 2, C: true}
            volumes:
              - data:/var/lib/data
              - ./cfg:/cfg:ro
              - /anon
            healthcheck: *hc
            restart: on-failure:3
            stop_signal: SIGINT
            stop_grace_period: 1m
          two:
            command: [run]
            depends_on: {one: {condition: service_healthy}}
            profiles: [extra]
        volumes:
          data:
        """,
    )
    project = load_project(path, variables={"PORT": "7"})
    assert project.name == "demo"
    one = project.services["one"]
    assert one.argv == ("python", "-m", "thing", "serve", "--port", "7", "two words")
    assert dict(one.environment) == {"A": "1", "B": "2", "C": "true"}
    assert [(m.kind, m.source, m.target, m.read_only) for m in one.mounts] == [
        ("volume", "data", "/var/lib/data", False),
        ("bind", str((tmp_path / "cfg").resolve()), "/cfg", True),
        ("volume", None, "/anon", False),
    ]
    assert one.healthcheck is not None
    assert one.healthcheck.argv == ("/bin/sh", "-c", "probe ${X}")
    assert one.healthcheck.interval == 2.0 and one.healthcheck.retries == 3
    assert one.restart.kind == "on-failure" and one.restart.max_retries == 3
    assert one.restart.should_restart(1, 2) and not one.restart.should_restart(1, 3)
    assert not one.restart.should_restart(0, 0)
    assert one.stop_signal == signal.SIGINT and one.stop_grace_period == 60.0
    two = project.services["two"]
    assert two.depends_on[0].condition == "service_healthy"
    assert project.enabled() == ["one"]
    assert project.enabled(("extra",)) == ["one", "two"]


MALFORMED = [
    ("services:\n  a:\n\tcommand: [x]\n", "invalid YAML"),
    ("services:\n  a:\n    command: [x\n", "invalid YAML"),
    ("- just\n- a list\n", "expected a mapping with a 'services' key"),
    ("version: '3'\n", "services: expected a non-empty mapping"),
    ("servics:\n  a: {}\n", "servics: unsupported top-level key"),
    ("services:\n  a:\n    comand: [x]\n", "services.a.comand: unsupported service key"),
    ("services:\n  a:\n    command: [x]\n  a:\n    command: [y]\n", "found duplicate key 'a'"),
    ("services:\n  a:\n    command: {x: 1}\n", "services.a.command: expected a list of strings"),
    ("services:\n  a:\n    command: [x, [y]]\n", "services.a.command[1]: expected a string"),
    ("services:\n  a:\n    command: 'x \"unclosed'\n", "cannot split command string"),
    ("services:\n  a:\n    depends_on: [b]\n", "services.a.depends_on.b: unknown service 'b'"),
    (
        "services:\n  a:\n    depends_on: [b]\n  b:\n    depends_on: [a]\n",
        "dependency cycle: a -> b -> a",
    ),
    (
        "services:\n  a:\n    depends_on: {b: {condition: service_ready}}\n  b: {}\n",
        "services.a.depends_on.b.condition: expected one of",
    ),
    (
        "services:\n  a:\n    depends_on: {b: {condition: service_healthy}}\n  b: {}\n",
        "condition service_healthy but 'b' has no healthcheck",
    ),
    (
        "services:\n  a:\n    healthcheck: {test: [CMD, x], interval: 5}\n",
        "services.a.healthcheck.interval: expected a duration like '5s'",
    ),
    (
        "services:\n  a:\n    healthcheck: {test: [CMD-SHELL, a, b]}\n",
        "services.a.healthcheck.test: expected [CMD, program, args...]",
    ),
    (
        "services:\n  a:\n    healthcheck: {test: [CMD, x], retries: 0}\n",
        "services.a.healthcheck.retries: expected a positive integer",
    ),
    (
        "services:\n  a:\n    healthcheck: {test: [CMD, x], intervall: 1s}\n",
        "services.a.healthcheck.intervall: unsupported healthcheck key",
    ),
    (
        "services:\n  a:\n    volumes: [data:/data]\n",
        "named volume 'data' is not declared under top-level 'volumes'",
    ),
    ("services:\n  a:\n    volumes: ['./x:relative']\n", "must be an absolute path"),
    ("services:\n  a:\n    volumes: ['./x:/d:rx']\n", "unsupported mount mode 'rx'"),
    (
        "services:\n  a:\n    volumes: ['./x:/d', './y:/d/sub']\n",
        "mount targets '/d' and '/d/sub' overlap",
    ),
    ("services:\n  a:\n    restart: sometimes\n", "services.a.restart: expected no, on-failure"),
    ("services:\n  a:\n    stop_signal: SIGNOPE\n", "unknown signal 'SIGNOPE'"),
    ("services:\n  a:\n    command: [$1]\n", "invalid interpolation at '$1'"),
    ("services:\n  a:\n    environment: [\"1BAD=x\"]\n", "invalid variable name '1BAD'"),
    ("services:\n  a:\n    env_file: missing.env\n", "cannot read env file"),
    ("services:\n  bad name:\n    command: [x]\n", "services.bad name: invalid service name"),
]


@pytest.mark.parametrize(("text", "message"), MALFORMED, ids=[m for _, m in MALFORMED])
def test_malformed_files_get_clear_errors(tmp_path: Path, text: str, message: str):
    path = tmp_path / "docker-compose.yml"
    path.write_text(text)
    run_dir = tmp_path / "run"
    with pytest.raises(ComposeFileError) as failure:
        LocalHarness(path, run_dir, variables={})
    assert message in str(failure.value)
    assert str(path) in str(failure.value)
    assert not run_dir.exists()  # nothing was created


def test_oversized_and_missing_files(tmp_path: Path):
    with pytest.raises(ComposeFileError, match="cannot read compose file"):
        load_project(tmp_path / "nope.yml", variables={})
    big = tmp_path / "big.yml"
    big.write_text("x-pad: '" + "a" * (1 << 20) + "'\n")
    with pytest.raises(ComposeFileError, match="more than 1048576"):
        load_project(big, variables={})
