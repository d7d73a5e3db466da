"""The trainer's signal mask and signal thread: every stop signal reaches the shredder.

SIGTERM, SIGINT, SIGHUP and SIGQUIT (:data:`SHRED_SIGNALS`) are blocked in the main thread
by :func:`start` at the very top of the entry point (``trainer/__main__.py`` and the
``trainer`` console script, :func:`trainer.entry.main`), before anything imports torch,
OpenMP or gRPC, all of which start threads at import time. A thread inherits the mask of
the thread that creates it, so no thread of the process ever has these signals unblocked
and the kernel cannot hand one to a thread that would take the default action (terminate
without shredding: the ``-15`` of issue 10) or to Python's SIGINT handler (a
``KeyboardInterrupt`` raised wherever the main thread happens to be).

One daemon thread, started by the same call, receives them with ``sigwait``. What it does
with a signal is set later by :func:`on_signal` (``trainer.shred.install_signal_handlers``
points it at the job's shredder once one exists); until then nothing is registered to shred,
and a signal writes a shred report saying so (naming the signal) and exits with the
documented status ``128 + N``: 143 SIGTERM, 130 SIGINT, 129 SIGHUP, 131 SIGQUIT. That path
imports nothing and takes no lock: the main thread may hold the import lock or a logging
lock at that moment.

Child processes inherit a blocked mask across ``fork`` and ``exec``; the trainer starts
none that must react to these signals (data loading runs in-process, ``num_workers=0``).

This module imports only the standard library, so that importing it starts no thread.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable

__all__ = ["SHRED_SIGNALS", "exit_code", "on_signal", "start"]

SHRED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)

_lock = threading.Lock()
_thread: threading.Thread | None = None
_handler: Callable[[int], None] | None = None


def exit_code(signum: int) -> int:
    """The documented exit status for a stop by signal ``signum``: ``128 + signum``."""
    return 128 + int(signum)


def start() -> None:
    """Block :data:`SHRED_SIGNALS` in this thread (and so in every thread created after it)
    and start the signal thread once. Idempotent; call first thing in an entry point."""
    global _thread
    signal.pthread_sigmask(signal.SIG_BLOCK, SHRED_SIGNALS)
    with _lock:
        if _thread is None:
            _thread = threading.Thread(target=_run, name="trainer-signals", daemon=True)
            _thread.start()


def on_signal(handler: Callable[[int], None]) -> None:
    """Route the next stop signal to ``handler(signum)``, which must not return normally
    (it shreds and leaves the process)."""
    global _handler
    with _lock:
        _handler = handler


def _run() -> None:
    signum = signal.sigwait(SHRED_SIGNALS)
    with _lock:
        handler = _handler
    try:
        if handler is None:
            _nothing_held(signum)
        else:
            handler(signum)
    finally:
        os._exit(exit_code(signum))  # a handler that returned or failed still stops the job


def _nothing_held(signum: int) -> None:
    """The report of a job stopped before it registered anything with a shredder. Written
    with ``os.write`` and nothing imported: the main thread may be in the middle of an import
    (the import lock) or of a log line (the handler lock)."""
    name = signal.Signals(signum).name
    os.write(2, f"trainer: received {name} before the job held anything; shred report "
                f"(signal {name}): nothing registered yet (no key, plaintext buffer, tensor or "
                f"work file), exiting {exit_code(signum)}\n".encode())
