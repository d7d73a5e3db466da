"""Prometheus metrics: release latency, denials by reason, HSM operation latency.

:class:`TimedHsm` wraps any ``Hsm`` and records each call's latency by operation.
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

__all__ = ["BrokerMetrics", "TimedHsm"]

_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class BrokerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.release_seconds = Histogram(
            "kmsbroker_release_seconds",
            "Release latency (a Release call, or an Attest call that releases)", buckets=_BUCKETS,
            registry=self.registry,
        )
        self.denials = Counter(
            "kmsbroker_denials", "Denied requests by reason", ["reason"], registry=self.registry
        )
        self.hsm_seconds = Histogram(
            "kmsbroker_hsm_op_seconds", "HSM operation latency", ["op"], buckets=_BUCKETS,
            registry=self.registry,
        )
        self.rpcs = Counter(
            "kmsbroker_rpcs", "RPCs by method and status code", ["method", "code"],
            registry=self.registry,
        )
        self._rpc_children: dict[tuple[str, str], Any] = {}

    def rpc_counter(self, method: str, code: str) -> Any:
        """The ``rpcs`` child for (method, code), looked up once and kept (same counter)."""
        key = (method, code)
        child = self._rpc_children.get(key)
        if child is None:
            child = self._rpc_children[key] = self.rpcs.labels(method=method, code=code)
        return child

    def serve(self, port: int, addr: str = "127.0.0.1") -> None:
        start_http_server(port, addr=addr, registry=self.registry)


class TimedHsm:
    """Delegates to an HSM, timing each operation."""

    _TIMED = frozenset({
        "sign", "create_tenant_kek", "destroy_tenant_keks", "create_import_key",
        "destroy_import_key", "import_share", "rewrap_share", "seal_share", "health",
    })

    def __init__(self, hsm: Any, metrics: BrokerMetrics) -> None:
        self._hsm = hsm
        self._metrics = metrics
        self._histograms: dict[str, Any] = {}

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._hsm, name)
        if name not in self._TIMED:
            return attr
        histogram = self._histograms.get(name)
        if histogram is None:  # the labelled child is fixed per op: look it up once
            histogram = self._histograms[name] = self._metrics.hsm_seconds.labels(op=name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return attr(*args, **kwargs)
            finally:
                histogram.observe(time.perf_counter() - start)

        return timed
