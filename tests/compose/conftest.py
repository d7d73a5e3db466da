"""Toy compose projects whose services are small Python commands, and /proc checks that
do not use the harness's own scanner (so a bug there cannot hide a leak)."""

from __future__ import annotations

import os
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from compose import LocalHarness


def live_processes(*, pgids: set[int], marker: str) -> list[int]:
    """PIDs (not zombies) whose process group is in ``pgids`` or whose environment holds
    ``marker``: read straight from /proc."""
    found = []
    needle = marker.encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            environ = Path(f"/proc/{entry}/environ").read_bytes()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        state, pgid = fields[0], int(fields[2])
        if state == "Z":
            continue
        if pgid in pgids or needle in environ:
            found.append(int(entry))
    return found


HarnessFactory = Callable[..., LocalHarness]


@pytest.fixture
def make_harness(tmp_path: Path) -> Iterator[HarnessFactory]:
    """Write a compose file into tmp_path and open a local harness on it; every harness is
    brought down at the end of the test, and no process of it may survive."""
    made: list[LocalHarness] = []

    def factory(
        text: str,
        *,
        variables: dict[str, str] | None = None,
        profiles: tuple[str, ...] = (),
        name: str = "docker-compose.yml",
    ) -> LocalHarness:
        compose_file = tmp_path / name
        compose_file.write_text(textwrap.dedent(text))
        harness = LocalHarness(
            compose_file,
            tmp_path / f"run{len(made)}",
            variables={} if variables is None else variables,
            profiles=profiles,
        )
        made.append(harness)
        return harness

    yield factory
    for harness in made:
        harness.down()
        assert live_processes(pgids=set(), marker=f"CT_COMPOSE_ID={harness.run_id}:") == []
        assert not harness.run_dir.exists()
