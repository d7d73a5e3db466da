"""TEST ONLY entry point: ``run_job`` with a key from a test :class:`KeyServer` socket.

    python -m torch.distributed.run --standalone --nproc-per-node 2 \\
        tests/trainer/socket_entry.py --job JOB.yaml --key-socket PATH

This file lives under tests/ and is not part of the trainer package, so the ``trainer``
command cannot reach it: production processes get keys only through ``--attest``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import socket
import sys
import threading

from trainer import signals

signals.start()  # as the real entry point does, before torch starts threads

from sealed.secrets import SecretBuffer  # noqa: E402
from trainer.cli import setup_logging  # noqa: E402
from trainer.config import JobConfig  # noqa: E402
from trainer.keysource import KeyHandle, KeySourceUnavailable  # noqa: E402
from trainer.shred import EXIT_FAILURE, EXIT_OK  # noqa: E402
from trainer.train import run_job  # noqa: E402


class SocketKeySource:
    def __init__(self, path: str) -> None:
        self._path = path
        self._sock: socket.socket | None = None

    def acquire(self) -> KeyHandle:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(self._path)
        self._sock = sock
        dek = SecretBuffer(32)
        with dek.view() as out:
            got = 0
            while got < 32:
                n = sock.recv_into(out[got:])
                if n == 0:
                    raise KeySourceUnavailable("key server closed the connection")
                got += n
        handle = KeyHandle(dek=dek)

        def watch() -> None:
            with contextlib.suppress(OSError):
                if sock.recv(1) == b"R":
                    handle.revoke("revoked by the test key server")

        threading.Thread(target=watch, daemon=True).start()
        return handle

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--job", required=True)
    p.add_argument("--key-socket", required=True)
    args = p.parse_args()
    setup_logging("INFO")
    config = JobConfig.from_yaml(args.job)
    try:
        result = run_job(config, SocketKeySource(args.key_socket), require_hardening=True)
    except Exception as exc:
        logging.getLogger("trainer").error("failed: %s: %s", type(exc).__name__, exc)
        return EXIT_FAILURE
    if result.rank == 0:
        print(f"RESULT steps_done={result.steps_done} start_step={result.start_step} "
              f"pid={os.getpid()}", flush=True)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
