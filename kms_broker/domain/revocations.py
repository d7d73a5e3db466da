"""Pushes lease revocations to connected nodes (WatchRevocations streams).

Pure Python and thread-safe: each subscriber gets a queue; publishing puts one event per
revoked lease into the queues of that lease's node. A subscriber that never reads holds at
most ``MAX_PENDING`` events; older ones are dropped (the node also learns of revocation when
its next renewal fails).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable
from dataclasses import dataclass

from kms_broker.domain.model import Lease

__all__ = ["RevocationEvent", "RevocationHub"]

MAX_PENDING = 1024


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
        sent = 0
        with self._lock:
            for lease in leases:
                event = RevocationEvent(lease.lease_id, lease.tenant_id, lease.dataset_id, reason)
                for q in self._subscribers.get(lease.node_id, ()):
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
