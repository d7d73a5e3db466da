"""Injected time and randomness, so tests can move the clock and pin ids."""

from __future__ import annotations

import os
import secrets
import time
from typing import Protocol

__all__ = ["Clock", "ManualClock", "Random", "SystemClock", "SystemRandom"]


class Clock(Protocol):
    def now_ms(self) -> int: ...


class Random(Protocol):
    def bytes(self, n: int) -> bytes: ...
    def token_id(self) -> str: ...


class SystemClock:
    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000


class ManualClock:
    """A clock that moves only when told (unit tests)."""

    def __init__(self, start_ms: int = 1_800_000_000_000) -> None:
        self._now = start_ms

    def now_ms(self) -> int:
        return self._now

    def advance(self, ms: int) -> None:
        self._now += ms


class SystemRandom:
    def bytes(self, n: int) -> bytes:
        return os.urandom(n)

    def token_id(self) -> str:
        return secrets.token_hex(16)
