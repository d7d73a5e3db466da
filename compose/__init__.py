"""Run docker-compose.yml: under ``docker compose`` where an engine exists, else as local
processes with the same commands, environment and config files (DESIGN.md section 8).

    with open_harness("docker-compose.yml", run_dir) as h:
        h.up(wait=True)
        h.restart("provider-broker")
        print(h.logs("node-a"))
"""

from compose.errors import (
    ComposeError,
    ComposeFileError,
    LeftoverProcesses,
    ServiceFailed,
    UnknownService,
)
from compose.harness import Harness, docker_engine_available, open_harness
from compose.local import LocalHarness, ServiceStatus
from compose.spec import Project, Service, load_project

__all__ = [
    "ComposeError",
    "ComposeFileError",
    "Harness",
    "LeftoverProcesses",
    "LocalHarness",
    "Project",
    "Service",
    "ServiceFailed",
    "ServiceStatus",
    "UnknownService",
    "docker_engine_available",
    "load_project",
    "open_harness",
]
