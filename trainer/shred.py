"""The shredder: one registry of everything secret or plaintext, zeroed in one place.

Registered items and how they are destroyed:

* secrets (:class:`~sealed.secrets.SecretBuffer`: the DEK, shares, derived keys): ``zeroize()``;
* plaintext buffers (``bytearray``/writable ``memoryview``: decrypted shards, batches):
  overwritten with zeros in place;
* tensors, given as a provider callable so that state created later (optimizer moments,
  gradients) is found at shred time: ``tensor.zero_()`` in place, on CUDA too, followed by
  ``torch.cuda.synchronize()`` and ``torch.cuda.empty_cache()``;
* work files: unlinked;
* stop hooks (the prefetch thread): called first, so nothing decrypts while we zero.

:meth:`Shredder.shred` is idempotent and thread-safe, and returns a :class:`ShredReport` of
counts and byte totals (never contents) that is written to the log.

Signals. The entry point blocks SIGTERM, SIGINT, SIGHUP and SIGQUIT before any thread exists
and receives them in one thread with ``sigwait`` (:mod:`trainer.signals`);
:func:`install_signal_handlers` points that thread at the job's shredder. It shreds at once,
even while the main thread sits in a collective or a long kernel, then leaves with
``os._exit`` and the conventional code (128 + signal: 143, 130, 129, 131). Revocation takes
the same path with code 3.

Test hook. When ``TRAINER_TEST_SHRED_HOOK=pause`` is set, after shredding the process prints
``SHRED-DONE <pid>`` on stdout and waits to be killed, so a test can scan ``/proc/<pid>/mem``
for key bytes. The variable carries no secret and only makes the process wait.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sealed.secrets import SecretBuffer, zeroize
from trainer import signals

__all__ = [
    "EXIT_ATTESTATION_DENIED",
    "EXIT_BROKER_UNREACHABLE",
    "EXIT_FAILURE",
    "EXIT_OK",
    "EXIT_REVOKED",
    "ShredReport",
    "Shredder",
    "install_signal_handlers",
    "signal_exit_code",
]

log = logging.getLogger("trainer.shred")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_REVOKED = 3
EXIT_ATTESTATION_DENIED = 4
EXIT_BROKER_UNREACHABLE = 7  # a broker outage (not a refusal): at start or the lease ran out
HANDLED_SIGNALS = signals.SHRED_SIGNALS
TEST_HOOK_ENV = "TRAINER_TEST_SHRED_HOOK"


def signal_exit_code(signum: int) -> int:
    return signals.exit_code(signum)


@dataclass(frozen=True, slots=True)
class ShredReport:
    reason: str
    secrets: int
    secret_bytes: int
    buffers: int
    buffer_bytes: int
    tensors: int
    tensor_bytes: int
    cuda_tensors: int
    files: int
    errors: int
    seconds: float

    def __str__(self) -> str:
        return (
            f"shred report ({self.reason}): secrets {self.secrets} ({self.secret_bytes} B), "
            f"plaintext buffers {self.buffers} ({_mib(self.buffer_bytes)}), "
            f"tensors {self.tensors} ({_mib(self.tensor_bytes)}, {self.cuda_tensors} on cuda), "
            f"work files {self.files} removed, errors {self.errors}, "
            f"took {self.seconds * 1e3:.1f} ms"
        )


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.2f} MiB"


TensorProvider = Callable[[], Iterable[Any]]


class Shredder:
    """Registry of secret and plaintext state; :meth:`shred` zeroes all of it once."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._secrets: list[tuple[str, SecretBuffer]] = []
        self._buffers: list[tuple[str, bytearray | memoryview]] = []
        self._tensors: list[tuple[str, TensorProvider]] = []
        self._files: list[Path] = []
        self._stop_hooks: list[Callable[[], None]] = []
        self._report: ShredReport | None = None
        self._shredding = threading.Event()

    # registration -------------------------------------------------------------------------
    def add_secret(self, name: str, secret: SecretBuffer) -> SecretBuffer:
        with self._lock:
            self._secrets.append((name, secret))
        return secret

    def add_buffer(self, name: str, buffer: bytearray | memoryview) -> None:
        if memoryview(buffer).readonly:
            raise TypeError(f"plaintext buffer {name!r} must be writable to be shredded")
        with self._lock:
            self._buffers.append((name, buffer))

    def add_tensors(self, name: str, provider: TensorProvider) -> None:
        """Register a callable returning the tensors to zero (evaluated at shred time)."""
        with self._lock:
            self._tensors.append((name, provider))

    def add_file(self, path: str | Path) -> None:
        with self._lock:
            self._files.append(Path(path))

    def discard_file(self, path: str | Path) -> None:
        with self._lock, contextlib.suppress(ValueError):
            self._files.remove(Path(path))

    def add_stop_hook(self, hook: Callable[[], None], *, first: bool = False) -> None:
        """Run ``hook`` before zeroing; ``first`` puts it ahead of those already added
        (producers stop before the objects they use are closed)."""
        with self._lock:
            if first:
                self._stop_hooks.insert(0, hook)
            else:
                self._stop_hooks.append(hook)

    @property
    def done(self) -> bool:
        return self._report is not None

    def halt_if_shredding(self) -> None:
        """Called by the training loop: once an emergency shred began (signal, revocation),
        the loop must not touch data or keys again; it waits for the process to exit."""
        if self._shredding.is_set() and threading.current_thread() is threading.main_thread():
            threading.Event().wait()

    # shredding ----------------------------------------------------------------------------
    def shred(self, reason: str) -> ShredReport:
        """Stop producers, zero everything registered, remove work files. Idempotent."""
        with self._lock:
            if self._report is not None:
                return self._report
            self._shredding.set()
            start = time.perf_counter()
            errors = 0
            for hook in self._stop_hooks:
                try:
                    hook()
                except Exception:  # keep shredding whatever a hook did
                    errors += 1
            n_secret_bytes = 0
            for _, secret in self._secrets:
                n_secret_bytes += len(secret)
                secret.zeroize()
            n_buffer_bytes = 0
            for _, buffer in self._buffers:
                try:
                    view = memoryview(buffer).cast("B")
                    n_buffer_bytes += len(view)
                    zeroize(view)
                except (ValueError, TypeError):  # a released view: its owner was shredded
                    errors += 1
            n_tensors = n_tensor_bytes = n_cuda = 0
            for _, provider in self._tensors:
                try:
                    for tensor in provider():
                        n_tensors += 1
                        n_tensor_bytes += tensor.numel() * tensor.element_size()
                        n_cuda += bool(getattr(tensor, "is_cuda", False))
                        tensor.detach().zero_()
                except Exception:
                    errors += 1
            if n_cuda:
                errors += _empty_cuda_cache()
            n_files = 0
            for path in self._files:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    n_files += 1
            self._report = ShredReport(
                reason=reason,
                secrets=len(self._secrets),
                secret_bytes=n_secret_bytes,
                buffers=len(self._buffers),
                buffer_bytes=n_buffer_bytes,
                tensors=n_tensors,
                tensor_bytes=n_tensor_bytes,
                cuda_tensors=n_cuda,
                files=n_files,
                errors=errors,
                seconds=time.perf_counter() - start,
            )
            # a normal exit's report is routine (INFO); any other reason, or a wipe that
            # failed, is worth an operator's attention
            level = (logging.INFO if reason == "normal exit" and not errors
                     else logging.ERROR if errors else logging.WARNING)
            log.log(level, "%s", self._report)
            return self._report

    def shred_and_exit(self, reason: str, code: int) -> None:
        """Shred, honour the test hook, and leave the process at once with ``code``."""
        self._shredding.set()  # the main thread halts at its next check
        try:
            self.shred(reason)
        finally:
            _flush_logs()
            maybe_pause_for_test()
            os._exit(code)


def _empty_cuda_cache() -> int:
    try:
        import torch

        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        return 0
    except Exception:
        return 1


def _flush_logs() -> None:
    for handler in logging.getLogger().handlers:
        with contextlib.suppress(Exception):
            handler.flush()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


def maybe_pause_for_test() -> None:
    """Honour ``TRAINER_TEST_SHRED_HOOK=pause`` (see the module docstring)."""
    if os.environ.get(TEST_HOOK_ENV) != "pause":
        return
    _flush_logs()
    os.write(1, f"SHRED-DONE {os.getpid()}\n".encode())
    while True:
        signal.pause()


def install_signal_handlers(shredder: Shredder) -> None:
    """Shred ``shredder`` and exit ``128 + N`` on the first stop signal N.

    Starts the signal thread if the entry point has not (a library caller); then only the
    threads created after this call are sure to have the signals blocked, which is why the
    entry points call :func:`trainer.signals.start` first thing.
    """

    def stop(signum: int) -> None:
        name = signal.Signals(signum).name
        log.warning("received %s: shredding and exiting", name)
        shredder.shred_and_exit(f"signal {name}", signal_exit_code(signum))

    signals.start()
    signals.on_signal(stop)
