"""Per-identity limits on the request path (config key ``limits`` in broker.yaml).

- ``rate_per_s`` / ``burst``: a token bucket per authenticated identity (``node:n1``,
  ``tenant:acme``, ``operator:ops``): each call takes one token, the bucket holds at most
  ``burst`` and refills at ``rate_per_s``. A call over the limit ends RESOURCE_EXHAUSTED
  before any handler runs. Buckets live per broker process, so with ``--workers N`` an
  identity may reach up to N times the rate.
- ``inflight_per_identity``: unary calls of one identity being handled at once (each holds a
  handler thread); more end RESOURCE_EXHAUSTED, so one identity takes at most this share of
  the pool however fast it sends.
- ``streams_per_node``: open ``WatchRevocations`` streams per node; ``max_streams``: all
  streams of one process. Each stream holds one handler thread while it is open, so
  ``max_streams`` must stay below the handler pool (:data:`HANDLER_THREADS`): the rest of the
  pool always serves unary calls, and no identity can take it (see :func:`check_pool`).
- ``pending_sessions_per_node`` / ``pending_uploads_per_tenant``: unused challenges and open
  uploads per identity (enforced by the domain, ``kms_broker.domain.deps.Settings``).

Pure Python, no gRPC: the interceptor and the servicer use these.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["HANDLER_THREADS", "Limits", "RateLimiter", "StreamSlots", "check_pool"]

HANDLER_THREADS = 64  # the broker's gRPC handler pool per process
MAX_TRACKED_IDENTITIES = 65_536


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    rate_per_s: float = 100.0
    burst: int = 500
    inflight_per_identity: int = 16
    streams_per_node: int = 8
    max_streams: int = 32
    pending_sessions_per_node: int = 64
    pending_uploads_per_tenant: int = 64

    def __post_init__(self) -> None:
        if isinstance(self.rate_per_s, bool) or not 0 < self.rate_per_s <= 1e6:
            raise ValueError("limits.rate_per_s must be a number above 0 (per second)")
        for name in ("burst", "inflight_per_identity", "streams_per_node", "max_streams",
                     "pending_sessions_per_node", "pending_uploads_per_tenant"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1 << 20:
                raise ValueError(f"limits.{name} must be a whole number from 1 to 2**20")
        if self.streams_per_node > self.max_streams:
            raise ValueError("limits.streams_per_node must not exceed limits.max_streams")
        check_pool(self, HANDLER_THREADS)


def check_pool(limits: Limits, handler_threads: int) -> None:
    """Streams may take at most half the handler pool, so unary calls always have threads,
    and one identity's unary calls at most a quarter."""
    if limits.max_streams > handler_threads // 2:
        raise ValueError(f"limits.max_streams must be at most {handler_threads // 2} (half "
                         f"of the {handler_threads} handler threads)")
    if limits.inflight_per_identity > handler_threads // 4:
        raise ValueError(f"limits.inflight_per_identity must be at most {handler_threads // 4}"
                         f" (a quarter of the {handler_threads} handler threads)")


class RateLimiter:
    """Token buckets keyed by identity; thread-safe; the least recently seen identities are
    forgotten beyond :data:`MAX_TRACKED_IDENTITIES` (a forgotten bucket starts full)."""

    def __init__(self, rate_per_s: float, burst: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._rate = float(rate_per_s)
        self._burst = float(burst)
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # tokens, at
        self._lock = threading.Lock()

    def allow(self, identity: str) -> bool:
        now = self._clock()
        with self._lock:
            tokens, at = self._buckets.pop(identity, (self._burst, now))
            tokens = min(self._burst, tokens + (now - at) * self._rate)
            allowed = tokens >= 1.0
            self._buckets[identity] = (tokens - 1.0 if allowed else tokens, now)
            if len(self._buckets) > MAX_TRACKED_IDENTITIES:
                self._buckets.popitem(last=False)
            return allowed


class StreamSlots:
    """Counts what is open per key and in all (streams, calls in flight); :meth:`acquire`
    fails past either cap."""

    def __init__(self, per_key: int, total: int) -> None:
        self._per_key = per_key
        self._total = total
        self._open: dict[str, int] = {}
        self._count = 0
        self._lock = threading.Lock()

    def acquire(self, key: str) -> bool:
        with self._lock:
            held = self._open.get(key, 0)
            if held >= self._per_key or self._count >= self._total:
                return False
            self._open[key] = held + 1
            self._count += 1
            return True

    def release(self, key: str) -> None:
        with self._lock:
            held = self._open.get(key, 0)
            if held <= 1:
                self._open.pop(key, None)
            else:
                self._open[key] = held - 1
            self._count = max(0, self._count - 1)

    def held(self, key: str) -> int:
        with self._lock:
            return self._open.get(key, 0)
