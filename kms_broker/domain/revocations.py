"""Pushes lease revocations to connected nodes (WatchRevocations streams).

Pure Python and thread-safe: each subscriber gets a queue; publishing puts one event per
revoked lease into the queues of that lease's node. A subscriber that never reads holds at
most ``MAX_PENDING`` events; older ones are dropped (the node also learns of revocation when
its next renewal fails).

Several broker worker processes share one state store, and a node's WatchRevocations stream
may be held by another worker than the one that revoked its lease. :class:`RevocationRelay`
carries events between them through the store: the hub's ``forward`` hook records every event
it publishes (tagged with this process's origin id), and each worker's relay polls for events
from other origins and delivers them to its own subscribers. Within one process delivery is
immediate; across processes it takes at most one poll interval. A store that offers
``wait_revocations(timeout_s)`` (PostgreSQL: ``LISTEN``, woken by the ``NOTIFY`` committed
with the events) wakes the relay as soon as another replica commits events; it still polls
after every wake-up and at least every ``WAKE_TIMEOUT_S``.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from kms_broker.domain.model import Lease

__all__ = ["RevocationEvent", "RevocationHub", "RevocationRelay"]

MAX_PENDING = 1024
RELAY_INTERVAL_S = 0.2
RELAY_KEEP_MS = 600_000  # events older than this are dropped from the store
WAKE_TIMEOUT_S = 1.0  # a store with wait_revocations (LISTEN) is polled at least this often
log = logging.getLogger("kms_broker.revocations")


@dataclass(frozen=True, slots=True)
class RevocationEvent:
    lease_id: str
    tenant_id: str
    dataset_id: str
    reason: str


class RevocationHub:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subscribers: dict[str, set[queue.Queue[RevocationEvent]]] = {}
        # set by RevocationRelay: records published events for the other worker processes
        self.forward: Callable[[list[tuple[str, RevocationEvent]]], None] | None = None

    def subscribe(self, node_id: str) -> queue.Queue[RevocationEvent]:
        q: queue.Queue[RevocationEvent] = queue.Queue(MAX_PENDING)
        with self._lock:
            self._subscribers.setdefault(node_id, set()).add(q)
        return q

    def unsubscribe(self, node_id: str, q: queue.Queue[RevocationEvent]) -> None:
        with self._lock:
            subs = self._subscribers.get(node_id)
            if subs is not None:
                subs.discard(q)
                if not subs:
                    del self._subscribers[node_id]

    def subscriber_count(self, node_id: str) -> int:
        with self._lock:
            return len(self._subscribers.get(node_id, ()))

    def publish(self, leases: Iterable[Lease], reason: str) -> int:
        """Deliver one event per lease to its node's subscribers here, and forward the events
        to the other worker processes when a relay is attached. Returns local deliveries."""
        events = [(lease.node_id,
                   RevocationEvent(lease.lease_id, lease.tenant_id, lease.dataset_id, reason))
                  for lease in leases]
        sent = self.deliver(events)
        forward = self.forward
        if forward is not None and events:
            try:
                forward(events)
            except Exception as exc:  # the revocation itself is already stored
                log.warning("revocations not forwarded to other workers (their nodes learn "
                            "at the next renewal): %s", exc)
        return sent

    def deliver(self, events: Iterable[tuple[str, RevocationEvent]]) -> int:
        """Put each (node_id, event) into that node's subscriber queues in this process."""
        sent = 0
        with self._lock:
            for node_id, event in events:
                for q in self._subscribers.get(node_id, ()):
                    try:
                        q.put_nowait(event)
                    except queue.Full:
                        try:
                            q.get_nowait()
                            q.put_nowait(event)
                        except (queue.Empty, queue.Full):
                            continue
                    sent += 1
        return sent


class RevocationStore(Protocol):
    """What the relay needs from the state store (``SqliteRepository`` implements it)."""

    def add_revocation_events(self, origin: str, events: list[tuple[str, RevocationEvent]],
                              now_ms: int, keep_ms: int) -> None: ...
    def revocation_events_after(
        self, after_id: int, origin: str
    ) -> tuple[int, list[tuple[str, RevocationEvent]]]: ...  # (last id seen, others' events)


class RevocationRelay:
    """Carries revocation events between broker processes that share one state store."""

    def __init__(self, hub: RevocationHub, store: RevocationStore, *, origin: str,
                 now_ms: Callable[[], int], interval_s: float = RELAY_INTERVAL_S) -> None:
        self.hub, self.store, self.origin = hub, store, origin
        self._now_ms = now_ms
        self._interval = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_id, _ = store.revocation_events_after(-1, origin)  # only what comes next

    def _forward(self, events: list[tuple[str, RevocationEvent]]) -> None:
        self.store.add_revocation_events(self.origin, events, self._now_ms(), RELAY_KEEP_MS)

    def poll(self) -> int:
        """Deliver events that other processes recorded since the last poll; returns how many
        subscriber queues received one."""
        self._last_id, events = self.store.revocation_events_after(self._last_id, self.origin)
        return self.hub.deliver(events) if events else 0

    def _loop(self) -> None:
        # a store that can wake the relay (PostgreSQL LISTEN/NOTIFY) is waited on; a poll
        # follows every wake-up or timeout, so a lost notification costs one interval at most
        wait = getattr(self.store, "wait_revocations", None)
        while not self._stop.is_set():
            if wait is None:
                if self._stop.wait(self._interval):
                    return
            else:
                try:
                    wait(WAKE_TIMEOUT_S)
                except Exception as exc:  # the store is down: fall back to the interval
                    log.warning("revocation relay wait failed: %s", exc)
                    if self._stop.wait(self._interval):
                        return
            try:
                self.poll()
            except Exception as exc:  # the store is down: retry next round
                log.warning("revocation relay poll failed: %s", exc)

    def start(self) -> None:
        self.hub.forward = self._forward
        self._thread = threading.Thread(target=self._loop, daemon=True, name="revocation-relay")
        self._thread.start()

    def stop(self) -> None:
        self.hub.forward = None
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
