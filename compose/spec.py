"""Read the subset of the Compose file format that this project's deployment uses.

The result is a frozen ``Project`` that both runners (local processes and ``docker compose``)
work from. Supported, per service: ``command`` and ``entrypoint`` (list, or string split like
a shell would), ``environment`` (list of ``K=V``/``K`` or a map), ``env_file``,
``working_dir``, ``volumes`` (named volumes, bind mounts, anonymous volumes; short or long
syntax), ``depends_on`` (list, or map with ``condition`` service_started / service_healthy /
service_completed_successfully and ``required``), ``healthcheck`` (``test`` as CMD,
CMD-SHELL, NONE or a string; ``interval``, ``timeout``, ``retries``, ``start_period``,
``start_interval``, ``disable``), ``restart`` (no, on-failure[:N], always, unless-stopped),
``profiles``, ``stop_signal`` and ``stop_grace_period``. Keys that only mean something to a
container engine (``image``, ``build``, ``ports``, ``hostname``, ...) are accepted and left to
the engine. Any other key is an error naming it, so nothing is silently ignored.

Interpolation (see ``compose.interpolate``) is applied to every string value. The variables
come from the caller (the shell environment and ``.env`` for people); the local runner adds
``CT_ROOT`` per service and ``CT_HOST`` (see ``compose.local``). ``per_service`` lets it do
so, because Compose interpolates one file for all services but a local process needs its own
root.
"""

from __future__ import annotations

import itertools
import re
import shlex
import signal
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from compose.errors import ComposeFileError
from compose.interpolate import interpolate

__all__ = [
    "MAX_COMPOSE_FILE_BYTES",
    "Condition",
    "Dependency",
    "Healthcheck",
    "Mount",
    "Project",
    "RestartPolicy",
    "Service",
    "load_project",
    "parse_duration",
    "read_env_file",
]

MAX_COMPOSE_FILE_BYTES = 1 << 20
MAX_ENV_FILE_BYTES = 1 << 20

Condition = Literal["service_started", "service_healthy", "service_completed_successfully"]
_CONDITIONS: tuple[Condition, ...] = (
    "service_started",
    "service_healthy",
    "service_completed_successfully",
)
_TOP_LEVEL_KEYS = {"version", "name", "services", "volumes", "networks", "configs", "secrets"}
_SERVICE_KEYS = {
    "command",
    "entrypoint",
    "environment",
    "env_file",
    "working_dir",
    "volumes",
    "depends_on",
    "healthcheck",
    "restart",
    "profiles",
    "stop_signal",
    "stop_grace_period",
}
# Meaningful to a container engine only; the local runner documents that it ignores them.
_ENGINE_ONLY_KEYS = {
    "image",
    "build",
    "ports",
    "expose",
    "hostname",
    "container_name",
    "networks",
    "init",
    "user",
    "cap_add",
    "cap_drop",
    "devices",
    "tmpfs",
    "read_only",
    "security_opt",
    "ulimits",
    "labels",
    "pull_policy",
    "platform",
    "shm_size",
    "deploy",
    "logging",
    "stdin_open",
    "tty",
}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(us|ms|s|m|h)")
_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_SERVICE_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]*")


@dataclass(frozen=True, kw_only=True)
class Healthcheck:
    """A probe run inside the container (``docker``) or as a host process (local runner)."""

    argv: tuple[str, ...]  # CMD-SHELL becomes ("/bin/sh", "-c", command)
    interval: float = 30.0
    timeout: float = 30.0
    retries: int = 3
    start_period: float = 0.0
    start_interval: float = 5.0


@dataclass(frozen=True, kw_only=True)
class Dependency:
    service: str
    condition: Condition = "service_started"
    required: bool = True


@dataclass(frozen=True, kw_only=True)
class Mount:
    """``source`` is a volume name, an absolute host path (bind) or None (anonymous)."""

    kind: Literal["volume", "bind"]
    source: str | None
    target: str  # absolute path inside the container
    read_only: bool = False


@dataclass(frozen=True, kw_only=True)
class RestartPolicy:
    kind: Literal["no", "on-failure", "always", "unless-stopped"] = "no"
    max_retries: int | None = None  # on-failure:N

    def should_restart(self, exit_code: int, restarts_so_far: int) -> bool:
        if self.kind == "no":
            return False
        if self.kind == "on-failure":
            if exit_code == 0:
                return False
            return self.max_retries is None or restarts_so_far < self.max_retries
        return True


@dataclass(frozen=True, kw_only=True)
class Service:
    name: str
    argv: tuple[str, ...]  # entrypoint + command, interpolated
    environment: Mapping[str, str] = field(default_factory=dict)  # env_file, then environment
    working_dir: str | None = None
    mounts: tuple[Mount, ...] = ()
    depends_on: tuple[Dependency, ...] = ()
    healthcheck: Healthcheck | None = None
    restart: RestartPolicy = RestartPolicy()
    profiles: tuple[str, ...] = ()
    stop_signal: int = signal.SIGTERM
    stop_grace_period: float = 10.0


@dataclass(frozen=True, kw_only=True)
class Project:
    name: str
    path: Path  # the compose file
    services: Mapping[str, Service]
    volumes: frozenset[str]

    @property
    def directory(self) -> Path:
        return self.path.parent

    def enabled(self, profiles: tuple[str, ...] | frozenset[str] = ()) -> list[str]:
        """Service names active with these profiles (services without profiles always are)."""
        wanted = set(profiles)
        return [
            name
            for name, svc in self.services.items()
            if not svc.profiles or wanted.intersection(svc.profiles)
        ]


class _Loader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys (Compose does; PyYAML would keep the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)  # type: ignore[no-untyped-call]
            try:
                duplicate = key in seen
            except TypeError:
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"found duplicate key {key!r}",
                    key_node.start_mark,
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_project(
    path: str | Path,
    *,
    variables: Mapping[str, str],
    per_service: Callable[[str], Mapping[str, str]] | None = None,
    name: str | None = None,
) -> Project:
    """Parse and validate a compose file.

    ``variables`` is what ``${VAR}`` sees; ``per_service(name)`` adds to it for the strings
    of one service. Raises ``ComposeFileError`` naming the file and key path at fault.
    """
    path = Path(path).resolve()
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ComposeFileError(f"{path}: cannot read compose file: {exc.strerror}") from None
    if size > MAX_COMPOSE_FILE_BYTES:
        raise ComposeFileError(f"{path}: {size} bytes, more than {MAX_COMPOSE_FILE_BYTES}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ComposeFileError(f"{path}: not UTF-8 (byte {exc.start})") from None
    try:
        document = yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except (yaml.YAMLError, ValueError) as exc:  # ValueError: an integer past 4300 digits
        raise ComposeFileError(f"{path}: invalid YAML: {exc}") from None
    except RecursionError:
        raise ComposeFileError(f"{path}: nested too deeply") from None
    return _Parser(path, variables, per_service).project(document, name)


def parse_duration(value: object, where: str) -> float:
    """Compose duration (``"1m30s"``, ``"500ms"``, ``"2.5s"``) in seconds."""
    if not isinstance(value, str) or not value:
        raise ComposeFileError(f"{where}: expected a duration like '5s' or '500ms', got {value!r}")
    total = 0.0
    pos = 0
    for match in _DURATION.finditer(value):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if pos != len(value):
        raise ComposeFileError(f"{where}: expected a duration like '5s' or '500ms', got {value!r}")
    return total


def read_env_file(path: Path, where: str) -> dict[str, str | None]:
    """``KEY=VALUE`` lines; ``#`` comments, blank lines, optional ``export`` and quotes.

    A bare ``KEY`` maps to None (take it from the variables, as in ``environment``).
    """
    try:
        size = path.stat().st_size
        if size > MAX_ENV_FILE_BYTES:
            raise ComposeFileError(f"{where}: {path} is {size} bytes, more than allowed")
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ComposeFileError(f"{where}: cannot read env file {path}: {exc.strerror}") from None
    result: dict[str, str | None] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        line = line.removeprefix("export ").lstrip()
        key, sep, value = line.partition("=")
        key = key.strip()
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", key):
            raise ComposeFileError(f"{path}:{number}: invalid variable name {key!r}")
        if not sep:
            result[key] = None
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        result[key] = value
    return result


class _Parser:
    def __init__(
        self,
        path: Path,
        variables: Mapping[str, str],
        per_service: Callable[[str], Mapping[str, str]] | None,
    ) -> None:
        self.path = path
        self.variables = dict(variables)
        self.per_service = per_service

    def error(self, where: str, message: str) -> ComposeFileError:
        return ComposeFileError(f"{self.path}: {where}: {message}")

    def project(self, document: object, name: str | None) -> Project:
        if not isinstance(document, dict):
            raise self.error("top level", "expected a mapping with a 'services' key")
        for key in document:
            if not isinstance(key, str) or (
                key not in _TOP_LEVEL_KEYS and not key.startswith("x-")
            ):
                raise self.error(f"{key}", "unsupported top-level key")
        services_raw = document.get("services")
        if not isinstance(services_raw, dict) or not services_raw:
            raise self.error("services", "expected a non-empty mapping of services")
        volumes_raw = document.get("volumes") or {}
        if not isinstance(volumes_raw, dict):
            raise self.error("volumes", "expected a mapping of volume names")
        for volume, options in volumes_raw.items():
            if options is not None and not isinstance(options, dict):
                raise self.error(f"volumes.{volume}", "expected a mapping or nothing")
        volumes = frozenset(str(v) for v in volumes_raw)
        project_name = name or document.get("name") or self.path.parent.name
        project_name = self._string(
            project_name, "name", self.variables
        ).lower()
        if not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", project_name):
            raise self.error("name", f"invalid project name {project_name!r}")
        services: dict[str, Service] = {}
        for service_name, raw in services_raw.items():
            if not isinstance(service_name, str) or not _SERVICE_NAME.fullmatch(service_name):
                raise self.error(f"services.{service_name}", "invalid service name")
            services[service_name] = self.service(service_name, raw, volumes)
        self._check_dependencies(services)
        return Project(
            name=project_name, path=self.path, services=services, volumes=volumes
        )

    # --- one service ---------------------------------------------------------------------

    def service(self, name: str, raw: object, volumes: frozenset[str]) -> Service:
        where = f"services.{name}"
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise self.error(where, "expected a mapping")
        for key in raw:
            if key not in _SERVICE_KEYS and key not in _ENGINE_ONLY_KEYS and not str(
                key
            ).startswith("x-"):
                raise self.error(f"{where}.{key}", "unsupported service key")
        variables = dict(self.variables)
        if self.per_service is not None:
            variables.update(self.per_service(name))
        argv = self._command(raw.get("entrypoint"), f"{where}.entrypoint", variables)
        argv += self._command(raw.get("command"), f"{where}.command", variables)
        environment = self._environment(raw, where, variables)
        working_dir = raw.get("working_dir")
        if working_dir is not None:
            working_dir = self._string(working_dir, f"{where}.working_dir", variables)
        return Service(
            name=name,
            argv=tuple(argv),
            environment=environment,
            working_dir=working_dir,
            mounts=self._mounts(raw.get("volumes"), f"{where}.volumes", variables, volumes),
            depends_on=self._depends_on(raw.get("depends_on"), f"{where}.depends_on"),
            healthcheck=self._healthcheck(raw.get("healthcheck"), f"{where}.healthcheck",
                                          variables),
            restart=self._restart(raw.get("restart"), f"{where}.restart"),
            profiles=tuple(self._string_list(raw.get("profiles"), f"{where}.profiles",
                                             variables)),
            stop_signal=self._signal(raw.get("stop_signal"), f"{where}.stop_signal"),
            stop_grace_period=(
                10.0
                if raw.get("stop_grace_period") is None
                else parse_duration(raw["stop_grace_period"], f"{where}.stop_grace_period")
            ),
        )

    def _string(self, value: object, where: str, variables: Mapping[str, str]) -> str:
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise self.error(where, f"expected a string, got {type(value).__name__}")
        return interpolate(str(value), variables, where=f"{self.path}: {where}")

    def _string_list(self, value: object, where: str, variables: Mapping[str, str]) -> list[str]:
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.error(where, "expected a list of strings")
        return [self._string(item, f"{where}[{i}]", variables) for i, item in enumerate(value)]

    def _command(self, value: object, where: str, variables: Mapping[str, str]) -> list[str]:
        if value is None:
            return []
        if isinstance(value, str):
            try:
                words = shlex.split(value)
            except ValueError as exc:
                raise self.error(where, f"cannot split command string: {exc}") from None
            return [interpolate(w, variables, where=f"{self.path}: {where}") for w in words]
        return self._string_list(value, where, variables)

    def _environment(
        self, raw: dict[str, Any], where: str, variables: Mapping[str, str]
    ) -> dict[str, str]:
        merged: dict[str, str | None] = {}
        env_files = raw.get("env_file")
        if isinstance(env_files, str):
            env_files = [env_files]
        for i, entry in enumerate(self._string_list(env_files, f"{where}.env_file", variables)):
            file = (self.path.parent / entry).resolve()
            for key, value in read_env_file(file, f"{self.path}: {where}.env_file[{i}]").items():
                merged[key] = None if value is None else interpolate(
                    value, variables, where=f"{file}: {key}"
                )
        env = raw.get("environment")
        if isinstance(env, list):
            for i, item in enumerate(env):
                text = self._string(item, f"{where}.environment[{i}]", variables)
                key, sep, value = text.partition("=")
                merged[key] = value if sep else None
        elif isinstance(env, dict):
            for key, value in env.items():
                if not isinstance(key, str):
                    raise self.error(f"{where}.environment", f"invalid variable name {key!r}")
                if isinstance(value, bool):
                    merged[key] = "true" if value else "false"
                else:
                    merged[key] = (
                        None
                        if value is None
                        else self._string(value, f"{where}.environment.{key}", variables)
                    )
        elif env is not None:
            raise self.error(f"{where}.environment", "expected a list of KEY=VALUE or a map")
        result: dict[str, str] = {}
        for key, value in merged.items():
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", key):
                raise self.error(f"{where}.environment", f"invalid variable name {key!r}")
            if value is None:
                if key in self.variables:
                    result[key] = self.variables[key]
            else:
                result[key] = value
        return result

    def _mounts(
        self,
        value: object,
        where: str,
        variables: Mapping[str, str],
        volumes: frozenset[str],
    ) -> tuple[Mount, ...]:
        if value is None:
            return ()
        if not isinstance(value, list):
            raise self.error(where, "expected a list of mounts")
        mounts: list[Mount] = []
        for i, item in enumerate(value):
            at = f"{where}[{i}]"
            if isinstance(item, str):
                mount = self._short_mount(self._string(item, at, variables), at)
            elif isinstance(item, dict):
                mount = self._long_mount(item, at, variables)
            else:
                raise self.error(at, "expected 'SOURCE:TARGET[:ro]' or a mapping")
            if not mount.target.startswith("/"):
                raise self.error(at, f"target {mount.target!r} must be an absolute path")
            if mount.kind == "volume" and mount.source is not None and mount.source not in volumes:
                raise self.error(
                    at, f"named volume {mount.source!r} is not declared under top-level 'volumes'"
                )
            mounts.append(mount)
        targets = sorted(m.target.rstrip("/") or "/" for m in mounts)
        for a, b in itertools.pairwise(targets):
            if a == b or b.startswith(a.rstrip("/") + "/"):
                raise self.error(where, f"mount targets {a!r} and {b!r} overlap")
        return tuple(mounts)

    def _short_mount(self, text: str, where: str) -> Mount:
        parts = text.split(":")
        if len(parts) == 1:
            return Mount(kind="volume", source=None, target=parts[0])
        if len(parts) not in (2, 3) or not parts[0] or not parts[1]:
            raise self.error(where, f"expected 'SOURCE:TARGET[:MODE]', got {text!r}")
        mode = parts[2] if len(parts) == 3 else "rw"
        if mode not in ("ro", "rw"):
            raise self.error(where, f"unsupported mount mode {mode!r} (use ro or rw)")
        return self._mount_from(parts[0], parts[1], mode == "ro")

    def _mount_from(self, source: str, target: str, read_only: bool) -> Mount:
        if source.startswith(("/", ".", "~")):
            host = Path(source).expanduser()
            if not host.is_absolute():
                host = self.path.parent / host
            return Mount(kind="bind", source=str(host.resolve()), target=target,
                         read_only=read_only)
        return Mount(kind="volume", source=source, target=target, read_only=read_only)

    def _long_mount(self, item: dict[str, Any], where: str, variables: Mapping[str, str]) -> Mount:
        allowed = {"type", "source", "target", "read_only", "bind", "volume"}
        for key in item:
            if key not in allowed:
                raise self.error(f"{where}.{key}", "unsupported mount key")
        kind = item.get("type")
        if kind not in ("volume", "bind"):
            raise self.error(f"{where}.type", "expected 'volume' or 'bind'")
        target = self._string(item.get("target"), f"{where}.target", variables)
        read_only = item.get("read_only", False)
        if not isinstance(read_only, bool):
            raise self.error(f"{where}.read_only", "expected true or false")
        source = item.get("source")
        if source is None:
            if kind == "bind":
                raise self.error(f"{where}.source", "a bind mount needs a source")
            return Mount(kind="volume", source=None, target=target, read_only=read_only)
        source = self._string(source, f"{where}.source", variables)
        mount = self._mount_from(source, target, read_only)
        if mount.kind != kind:
            raise self.error(f"{where}.source", f"{source!r} does not look like a {kind} source")
        return mount

    def _depends_on(self, value: object, where: str) -> tuple[Dependency, ...]:
        if value is None:
            return ()
        if isinstance(value, list):
            if not all(isinstance(v, str) for v in value):
                raise self.error(where, "expected a list of service names")
            return tuple(Dependency(service=v) for v in value)
        if not isinstance(value, dict):
            raise self.error(where, "expected a list of service names or a mapping")
        deps = []
        for service, options in value.items():
            at = f"{where}.{service}"
            options = options or {}
            if not isinstance(options, dict):
                raise self.error(at, "expected a mapping with 'condition'")
            for key in options:
                if key not in ("condition", "required", "restart"):
                    raise self.error(f"{at}.{key}", "unsupported depends_on key")
            condition = options.get("condition", "service_started")
            if condition not in _CONDITIONS:
                raise self.error(
                    f"{at}.condition",
                    f"expected one of {', '.join(_CONDITIONS)}, got {condition!r}",
                )
            required = options.get("required", True)
            if not isinstance(required, bool):
                raise self.error(f"{at}.required", "expected true or false")
            deps.append(Dependency(service=str(service), condition=condition, required=required))
        return tuple(deps)

    def _healthcheck(
        self, value: object, where: str, variables: Mapping[str, str]
    ) -> Healthcheck | None:
        if value is None:
            return None
        if not isinstance(value, dict):
            raise self.error(where, "expected a mapping")
        allowed = {"test", "interval", "timeout", "retries", "start_period", "start_interval",
                   "disable"}
        for key in value:
            if key not in allowed:
                raise self.error(f"{where}.{key}", "unsupported healthcheck key")
        if value.get("disable") is True:
            return None
        test = value.get("test")
        if isinstance(test, str):
            argv: tuple[str, ...] = ("/bin/sh", "-c", self._string(test, f"{where}.test",
                                                                    variables))
        elif isinstance(test, list) and test:
            words = self._string_list(test, f"{where}.test", variables)
            head, rest = words[0], words[1:]
            if head == "NONE":
                return None
            if head == "CMD" and rest:
                argv = tuple(rest)
            elif head == "CMD-SHELL" and len(rest) == 1:
                argv = ("/bin/sh", "-c", rest[0])
            else:
                raise self.error(
                    f"{where}.test",
                    "expected [CMD, program, args...], [CMD-SHELL, command] or [NONE]",
                )
        else:
            raise self.error(f"{where}.test", "expected a list or a string")
        retries = value.get("retries", 3)
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 1:
            raise self.error(f"{where}.retries", f"expected a positive integer, got {retries!r}")

        def duration(key: str, default: float) -> float:
            raw = value.get(key)
            return default if raw is None else parse_duration(raw, f"{self.path}: {where}.{key}")

        check = Healthcheck(
            argv=argv,
            interval=duration("interval", 30.0),
            timeout=duration("timeout", 30.0),
            retries=retries,
            start_period=duration("start_period", 0.0),
            start_interval=duration("start_interval", 5.0),
        )
        if check.interval <= 0 or check.timeout <= 0 or check.start_interval <= 0:
            raise self.error(where, "interval, timeout and start_interval must be positive")
        return check

    def _restart(self, value: object, where: str) -> RestartPolicy:
        if value is None or value is False or value == "no":
            return RestartPolicy()
        if value in ("always", "unless-stopped"):
            return RestartPolicy(kind=value)  # type: ignore[arg-type]
        if isinstance(value, str) and value.startswith("on-failure"):
            rest = value.removeprefix("on-failure")
            if not rest:
                return RestartPolicy(kind="on-failure")
            if rest.startswith(":") and rest[1:].isdigit():
                return RestartPolicy(kind="on-failure", max_retries=int(rest[1:]))
        raise self.error(
            where, f"expected no, on-failure[:N], always or unless-stopped, got {value!r}"
        )

    def _signal(self, value: object, where: str) -> int:
        if value is None:
            return signal.SIGTERM
        if isinstance(value, str):
            name = value if value.startswith("SIG") else f"SIG{value}"
            number = getattr(signal.Signals, name, None)
            if number is not None:
                return int(number)
        raise self.error(where, f"unknown signal {value!r}")

    def _check_dependencies(self, services: dict[str, Service]) -> None:
        for svc in services.values():
            for dep in svc.depends_on:
                target = services.get(dep.service)
                at = f"services.{svc.name}.depends_on.{dep.service}"
                if target is None:
                    raise self.error(at, f"unknown service {dep.service!r}")
                if dep.condition == "service_healthy" and target.healthcheck is None:
                    raise self.error(
                        at, f"condition service_healthy but {dep.service!r} has no healthcheck"
                    )
        state: dict[str, int] = {}  # 1 = visiting, 2 = done

        def visit(name: str, chain: list[str]) -> None:
            if state.get(name) == 2:
                return
            if state.get(name) == 1:
                cycle = " -> ".join([*chain[chain.index(name):], name])
                raise self.error("depends_on", f"dependency cycle: {cycle}")
            state[name] = 1
            for dep in services[name].depends_on:
                visit(dep.service, [*chain, name])
            state[name] = 2

        for name in services:
            visit(name, [])
