"""Find and end the processes of a run by reading /proc (no psutil).

Every process the local runner starts gets its own process group (``start_new_session``)
and the environment variable ``CT_COMPOSE_ID=<run id>:<service>``. Descendants inherit the
variable even when they start their own session (torchrun does, for its workers) or are
orphaned and re-parented, so scanning ``/proc/*/environ`` for it finds every one of them.
The marker is a random run id, not a secret.

Zombies (state Z) are dead processes waiting to be reaped by their parent; they hold no
resources and are not counted as left behind.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["MARKER_VARIABLE", "ProcessInfo", "kill_all", "marked_processes", "read_process"]

MARKER_VARIABLE = "CT_COMPOSE_ID"
_PROC = Path("/proc")
MAX_ENVIRON_BYTES = 1 << 20


@dataclass(frozen=True)
class ProcessInfo:
    pid: int
    pgid: int
    state: str  # R, S, D, Z, T, ...
    command: str  # comm, at most 15 characters


def read_process(pid: int) -> ProcessInfo | None:
    """State of one process, or None if it is gone."""
    try:
        stat = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # comm is in parentheses and may contain spaces or parentheses itself.
    left, right = stat.find("("), stat.rfind(")")
    fields = stat[right + 2 :].split()
    return ProcessInfo(pid=pid, pgid=int(fields[2]), state=fields[0],
                       command=stat[left + 1 : right])


def _environ_has(pid: int, needle: bytes) -> bool:
    """``needle`` ending in ``:`` matches any service of the run, else exactly one."""
    try:
        with open(_PROC / str(pid) / "environ", "rb") as handle:
            data = handle.read(MAX_ENVIRON_BYTES)
    except OSError:
        return False
    if needle.endswith(b":"):
        return any(entry.startswith(needle) for entry in data.split(b"\0"))
    return needle in data.split(b"\0")


def marked_processes(marker_prefix: str, *, pgids: frozenset[int] = frozenset()) -> list[
    ProcessInfo
]:
    """Live processes whose environment has ``CT_COMPOSE_ID=<run id>:<service>`` matching
    ``marker_prefix`` (``"<run id>:"``: any service of the run; ``"<run id>:<service>"``:
    that service only) or whose process group is in ``pgids``. Zombies and this process are
    left out."""
    needle = f"{MARKER_VARIABLE}={marker_prefix}".encode()
    own = os.getpid()
    found = []
    for entry in _PROC.iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        if pid == own:
            continue
        info = read_process(pid)
        if info is None or info.state == "Z":
            continue
        if info.pgid in pgids or _environ_has(pid, needle):
            found.append(info)
    return found


def kill_all(
    marker_prefix: str,
    *,
    pgids: frozenset[int] = frozenset(),
    rounds: int = 50,
    pause: float = 0.05,
) -> list[ProcessInfo]:
    """SIGKILL every matching process until none is left; return those that survived.

    A process can appear while we scan (a parent forking), hence several rounds.
    """
    survivors: list[ProcessInfo] = []
    for _ in range(rounds):
        survivors = marked_processes(marker_prefix, pgids=pgids)
        if not survivors:
            return []
        for pgid in pgids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
        for info in survivors:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(info.pid, signal.SIGKILL)
        time.sleep(pause)
    return marked_processes(marker_prefix, pgids=pgids)
