"""Replica sets on the client side: one share holder reached at any of several addresses.

A share holder may run as several replicas (``kms-broker serve`` processes on one PostgreSQL
database and one HSM token, :mod:`kms_broker.state.postgres`). Clients name it as a replica
set: on the command line and in ``KMS_BROKER_ADDRESSES`` as addresses joined by ``|``
(``--broker 'a.example:7001|b.example:7001'``), in a profile file or job file as a list.

:func:`on_any_replica` runs one unit of work (a call, or a pair of calls that must reach the
same process, such as an enrolment) on the first replica, and on UNAVAILABLE (the replica is
down, unreachable, or did not connect within :data:`REPLICA_CONNECT_S`) on the next: each
replica once, then round robin until ``failover_s`` has passed; any other error (a refusal,
a bad request) is the answer and is raised at once. A unit of work that failed with
UNAVAILABLE mid-call may have taken effect on the replica that died; repeating it on the
next one then answers as a repeat does (already exists, already committed), never twice
silently. The node's
:class:`kms_broker.client.KeyClient` has its own failover, which starts an attestation round
over instead (a nonce is single use).

``SEPARATOR`` joins a set's addresses into its label (the share holder's name in output and
in a dataset's registered holders).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TypeVar

from kms_broker.rpc import UnavailableError

__all__ = ["FAILOVER_S", "REPLICA_CONNECT_S", "SEPARATOR", "on_any_replica", "split_set"]

T = TypeVar("T")
E = TypeVar("E")
SEPARATOR = "|"
FAILOVER_S = 30.0  # how long a command keeps trying the replicas of one share holder
REPLICA_CONNECT_S = 3.0  # how long one replica of a set may take to connect


def split_set(spec: str) -> tuple[str, ...]:
    """``"a:1|b:2"`` -> ("a:1", "b:2"); surrounding spaces dropped, empty parts refused by
    the caller's address check."""
    return tuple(part.strip() for part in spec.split(SEPARATOR))


def on_any_replica(replicas: Sequence[E], work: Callable[[E], T], *,
                   failover_s: float = FAILOVER_S,
                   on_failover: Callable[[E, UnavailableError], None] | None = None) -> T:
    """``work(replica)`` on the first replica that answers (see the module docstring)."""
    if not replicas:
        raise ValueError("a replica set needs at least one address")
    deadline = time.monotonic() + failover_s
    index = 0
    while True:
        replica = replicas[index % len(replicas)]
        try:
            return work(replica)
        except UnavailableError as exc:
            # every replica is tried once, then round robin until the deadline
            if len(replicas) < 2 or (index + 1 >= len(replicas)
                                     and time.monotonic() >= deadline):
                raise
            if on_failover is not None:
                on_failover(replica, exc)
            index += 1
            if index % len(replicas) == 0:  # every replica failed once: do not spin
                time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
