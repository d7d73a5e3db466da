"""Test-only entry point: ``kms-broker serve`` that kills itself (SIGKILL) at one named point.

    python -m tests.kms_broker.fault_broker POINT N MARKER serve --config broker.yaml

``POINT`` is ``TARGET.METHOD:WHEN`` with TARGET ``repo`` (SqliteRepository), ``hsm``
(Pkcs11Hsm) or ``audit`` (AuditLog), and WHEN:

- ``before``: the process is killed when the N-th call of METHOD begins (nothing of it done);
- ``after``: killed right after the N-th call returned (its effect done, nothing after it);
- ``torn`` (repo methods only): killed right after the N-th call's transaction committed,
  and MARKER records the WAL file's size before and after that commit so the test can cut
  the WAL in the middle of the commit's frames: what a kill (or power loss) while SQLite was
  writing the commit leaves on disk.

Before dying it writes ``WHEN`` (and for ``torn`` the sizes) to MARKER, so the test knows the
point was reached and not some other failure. The production code runs unmodified: the fault
is a wrapper installed on the class here, in this test-only process, and counting calls makes
the kill point deterministic (no timing). Then it runs ``kms_broker.cli.main``.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any


def _targets() -> dict[str, type]:
    from kms_broker.audit import AuditLog
    from kms_broker.hsm.pkcs11_hsm import Pkcs11Hsm
    from kms_broker.state.sqlite import SqliteRepository

    return {"repo": SqliteRepository, "hsm": Pkcs11Hsm, "audit": AuditLog}


def _wal_size(repo: Any) -> int:
    path = repo._db.execute("PRAGMA database_list").fetchone()[2]
    try:
        return os.stat(f"{path}-wal").st_size
    except FileNotFoundError:
        return 0


def install(point: str, n: int, marker: Path) -> None:
    target, _, rest = point.partition(".")
    method, _, when = rest.partition(":")
    if when not in ("before", "after", "torn") or (when == "torn" and target != "repo"):
        raise SystemExit(f"bad fault point {point!r}")
    cls = _targets()[target]
    original = getattr(cls, method)
    lock = threading.Lock()
    calls = [0]

    def die(note: str) -> None:
        marker.write_text(note)
        os.kill(os.getpid(), signal.SIGKILL)

    @functools.wraps(original)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        with lock:
            calls[0] += 1
            mine = calls[0] == n
        if not mine:
            return original(self, *args, **kwargs)
        if when == "before":
            die("before")
        pre = _wal_size(self) if when == "torn" else 0
        result = original(self, *args, **kwargs)
        die(f"torn {pre} {_wal_size(self)}" if when == "torn" else "after")
        return result

    setattr(cls, method, wrapper)


def main() -> int:
    point, n, marker, *argv = sys.argv[1:]
    install(point, int(n), Path(marker))
    from kms_broker.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
