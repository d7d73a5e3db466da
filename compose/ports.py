"""Loopback ports for services that must be told their port number before they start.

A service that can bind port 0 and report what it got (``kms-broker serve`` with
``listen: 127.0.0.1:0``) needs nothing from here. A swtpm, a torch rendezvous, or a
deployment whose services find each other by port number must be given a number first, and
a number that was merely free a moment ago races: the kernel hands the same number to the
next ``bind(("", 0))`` or outgoing connection of any process on the machine, and another
test choosing ports the same way may pick it too. On a busy machine that happens.

So a port chosen here is

- outside the kernel's ephemeral range (``/proc/sys/net/ipv4/ip_local_port_range``): no
  ``bind`` to port 0 and no outgoing connection of any process can be given it;
- reserved across processes: an exclusive ``flock`` on ``<tmp>/ct-port-reservations/<port>``
  held by the choosing process until it exits (or calls :func:`release`), so two test runs,
  demos or benchmarks using this module on one machine never pick the same port;
- free when chosen (both ``P`` and ``P + 1`` for a pair, as a swtpm listens on ``P`` for
  commands and ``P + 1`` for control).

What remains is a program outside this project binding that very number by hand.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import random
import socket
import tempfile
import threading
from pathlib import Path

__all__ = ["free_port", "free_port_pairs", "release"]

_FALLBACK_RANGE = (32768, 60999)
_LOWEST = 10000
_lock = threading.Lock()
_held: dict[int, int] = {}  # port -> fd of its reservation file (open while reserved)


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return _FALLBACK_RANGE


def _candidates() -> range:
    """Ports the kernel never hands out by itself: below (or above) the ephemeral range."""
    low, high = _ephemeral_range()
    if low - _LOWEST >= 2000:
        return range(_LOWEST, low - 1)
    return range(high + 1, 65534)


def _reservation_dir() -> Path:
    path = Path(tempfile.gettempdir()) / "ct-port-reservations"
    path.mkdir(mode=0o1777, exist_ok=True)
    return path


def _reserve(port: int) -> bool:
    """Take the cross-process reservation of ``port`` (False if another process holds it)."""
    path = _reservation_dir() / str(port)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return False
    _held[port] = fd
    return True


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def _choose(width: int) -> int:
    span = _candidates()
    for _ in range(2000):
        port = random.randrange(span.start, span.stop - width + 1)  # noqa: S311 - not secret
        ports = range(port, port + width)
        if any(p in _held for p in ports):
            continue
        taken: list[int] = []
        for p in ports:
            if not _reserve(p):
                break
            taken.append(p)
        if len(taken) == width and all(_bindable(p) for p in ports):
            return port
        for p in taken:
            release(p)
    raise OSError(errno.EADDRINUSE, "no free loopback port outside the ephemeral range")


def free_port() -> int:
    """One free, reserved loopback port (see the module docstring)."""
    with _lock:
        return _choose(1)


def free_port_pairs(count: int) -> list[int]:
    """``count`` ports P, each with P and P + 1 free and reserved (a swtpm listens on such a
    pair). The reservations last until this process exits or :func:`release` is called."""
    with _lock:
        return [_choose(2) for _ in range(count)]


def release(port: int) -> None:
    """Give up the reservation of ``port`` (a no-op for a port not reserved here)."""
    fd = _held.pop(port, None)
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)
