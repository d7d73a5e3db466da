"""Pick the runner: ``docker compose`` where an engine answers, local processes otherwise."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Literal, Protocol

from compose.docker import DockerHarness
from compose.local import LocalHarness, ServiceStatus

__all__ = ["Harness", "docker_engine_available", "open_harness"]

Mode = Literal["auto", "local", "docker"]


class Harness(Protocol):
    """What integration tests and the CLI use; both runners implement it."""

    mode: str

    def up(self, services: Iterable[str] | None = None, *, wait: bool = False) -> None: ...
    def wait_healthy(self, service: str) -> None: ...
    def wait_completed(self, service: str) -> int: ...
    def wait_all_completed(self, services: Iterable[str]) -> None: ...
    def stop(self, service: str, *, timeout: float | None = None) -> None: ...
    def start(self, service: str) -> None: ...
    def restart(self, service: str, *, timeout: float | None = None) -> None: ...
    def exec(
        self,
        service: str,
        argv: Sequence[str],
        *,
        input: bytes | None = None,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[bytes]: ...
    def run(
        self,
        service: str,
        argv: Sequence[str],
        *,
        input: bytes | None = None,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[bytes]: ...
    def logs(self, service: str) -> str: ...
    def ps(self) -> list[ServiceStatus]: ...
    def down(self) -> None: ...


def docker_engine_available(docker: str = "docker") -> bool:
    """True when ``docker info`` reaches an engine and the compose plugin is installed."""
    if shutil.which(docker) is None:
        return False
    for argv in ([docker, "info"], [docker, "compose", "version"]):
        try:
            result = subprocess.run(argv, capture_output=True, check=False, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return False
        if result.returncode != 0:
            return False
    return True


def open_harness(
    compose_file: str | Path,
    run_dir: str | Path,
    *,
    mode: Mode = "auto",
    variables: Mapping[str, str] | None = None,
    profiles: Sequence[str] = (),
    project_name: str | None = None,
    image_env: Mapping[str, str] | None = None,
) -> LocalHarness | DockerHarness:
    """A harness for ``compose_file``; ``mode="auto"`` uses Docker only if an engine runs.

    ``image_env`` applies to local processes only (under Docker the image sets it)."""
    if mode not in ("auto", "local", "docker"):
        raise ValueError(f"mode must be auto, local or docker, not {mode!r}")
    if mode == "docker" or (mode == "auto" and docker_engine_available()):
        return DockerHarness(
            compose_file, run_dir, variables=variables, profiles=profiles,
            project_name=project_name,
        )
    return LocalHarness(
        compose_file, run_dir, variables=variables, profiles=profiles,
        project_name=project_name, image_env=image_env,
    )
