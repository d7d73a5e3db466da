"""``kms-broker serve --workers N``: N broker processes sharing one port and one state.

Why: one Python process runs its request handling under one interpreter lock, and the
PKCS#11 module (SoftHSM2, initialised by python-pkcs11 without its own locking) seals one
share at a time per process; a second process doubles both on a machine with two cores.

How. The supervisor (:func:`supervise`) runs no broker code itself. It starts worker 0, which
initialises the state (schema migrations, the audit log, the HSM signing key and token
marker) and listens on the configured address with ``SO_REUSEPORT``; once it listens, the
supervisor starts workers 1..N-1 on the same port. The kernel spreads incoming connections
across the workers (a connection, and every RPC on it, stays with one worker). Each worker has
its own gRPC server, PKCS#11 session pool (its own SoftHSM instance over the same token
files), SQLite connection and audit appender. What must hold across workers does:

- single-use nonces: one conditional UPDATE in SQLite;
- lease room (``max_nodes``): one ``BEGIN IMMEDIATE`` transaction
  (:meth:`SqliteRepository.take_lease`);
- the audit chain: each append holds ``flock`` on the log and re-reads its tail if another
  worker wrote since (:class:`kms_broker.audit.AuditLog`);
- revocation pushes: through the store (:class:`kms_broker.domain.revocations.RevocationRelay`);
- HSM keys made or destroyed by one worker (KEKs, import keys) are seen by the others, which
  read the token's files; the per-worker caches hold only verdicts over immutable inputs.

Per worker: pending TPM enrolments (Begin/CompleteEnrolNode must reach the same worker, which
they do when made on one channel) and metrics, which the supervisor collects and serves on
``metrics_port`` (prometheus_client multiprocess mode, files under ``STATE/workers/metrics``).

Signals: SIGTERM or SIGINT stops every worker (each drains for 2 s and writes a signed audit
checkpoint), then the supervisor exits 0. A worker that dies is restarted on the same port;
more than ``MAX_RESTARTS`` deaths within ``RESTART_WINDOW_S`` stop the broker with status 1.
Workers get SIGTERM if the supervisor itself dies (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import collections
import ctypes
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from kms_broker.config import BrokerConfig

__all__ = ["MAX_WORKERS", "WorkerFailed", "supervise", "worker_port_file"]

MAX_WORKERS = 64
MAX_RESTARTS = 5
RESTART_WINDOW_S = 60.0
STOP_GRACE_S = 10.0
log = logging.getLogger("kms_broker.workers")


class WorkerFailed(RuntimeError):
    """A worker exited before it listened; the message names it and its exit status."""


def run_dir(config: BrokerConfig) -> Path:
    return Path(config.state_dir) / "workers"


def worker_port_file(config: BrokerConfig, index: int) -> Path:
    return run_dir(config) / f"{index}.port"


_LIBC = ctypes.CDLL(None, use_errno=True)  # loaded in the parent: the child only calls it


def _die_with_parent() -> None:  # runs in the child between fork and exec
    _LIBC.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class _Workers:
    def __init__(self, config_path: Path, config: BrokerConfig, env: dict[str, str],
                 entry_module: str) -> None:
        self.config_path, self.config, self.env = config_path, config, env
        self.entry_module = entry_module
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    def start(self, index: int, listen: str) -> None:
        worker_port_file(self.config, index).unlink(missing_ok=True)
        self.procs[index] = subprocess.Popen(
            [sys.executable, "-m", self.entry_module, "serve", "--config", str(self.config_path),
             "--worker", str(index), "--listen", listen],
            env=self.env, preexec_fn=_die_with_parent,
        )

    def wait_listening(self, index: int, stop: threading.Event) -> int:
        path = worker_port_file(self.config, index)
        proc = self.procs[index]
        while not stop.is_set():
            if path.exists():
                text = path.read_text().strip()
                if text:
                    return int(text)
            if proc.poll() is not None:
                raise WorkerFailed(f"worker {index} exited with status {proc.returncode} "
                                   f"before it listened (its log is above)")
            time.sleep(0.02)
        raise WorkerFailed("stopped while starting workers")

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for index, proc in self.procs.items():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("worker %d did not stop in %.0f s: killed", index, STOP_GRACE_S)
                proc.kill()
                proc.wait()


def _serve_metrics(config: BrokerConfig, directory: Path) -> None:
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))
    assert config.metrics_port is not None
    start_http_server(config.metrics_port, addr="127.0.0.1", registry=registry)


def supervise(config_path: Path, config: BrokerConfig, count: int,
              on_listening: Callable[[int], None] | None = None,
              entry_module: str = "kms_broker.cli") -> int:
    """Run ``count`` workers until SIGTERM/SIGINT; returns the process exit status. Each
    worker is ``python -m ENTRY_MODULE serve --worker N`` (the same composition as this
    supervisor's)."""
    if not 2 <= count <= MAX_WORKERS:
        raise ValueError(f"workers must be from 2 to {MAX_WORKERS}")
    Path(config.state_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
    shutil.rmtree(run_dir(config), ignore_errors=True)
    run_dir(config).mkdir(mode=0o700)
    env = dict(os.environ)
    metrics_dir = run_dir(config) / "metrics"
    if config.metrics_port is not None:
        metrics_dir.mkdir(mode=0o700)
        env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)  # a directory, not a secret
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    workers = _Workers(Path(config_path), config, env, entry_module)
    try:
        workers.start(0, config.listen)
        port = workers.wait_listening(0, stop)
        host = config.listen.rsplit(":", 1)[0]
        shared = f"{host}:{port}"
        for index in range(1, count):
            workers.start(index, shared)
        for index in range(1, count):
            workers.wait_listening(index, stop)
    except WorkerFailed as exc:
        log.error("%s", exc)
        workers.stop_all()
        return 1
    if config.metrics_port is not None:
        _serve_metrics(config, metrics_dir)
    if on_listening is not None:
        on_listening(port)
    else:
        log.info("%d workers listening on %s", count, shared)
    deaths: collections.deque[float] = collections.deque()
    status = 0
    while not stop.wait(0.2):
        for index, proc in list(workers.procs.items()):
            if proc.poll() is None:
                continue
            now = time.monotonic()
            deaths.append(now)
            while deaths and now - deaths[0] > RESTART_WINDOW_S:
                deaths.popleft()
            if len(deaths) > MAX_RESTARTS:
                log.error("worker %d exited with status %s; %d worker deaths in %.0f s: "
                          "stopping the broker", index, proc.returncode, len(deaths),
                          RESTART_WINDOW_S)
                status = 1
                stop.set()
                break
            log.error("worker %d exited with status %s; restarting it", index, proc.returncode)
            workers.start(index, shared)
    workers.stop_all()
    return status
