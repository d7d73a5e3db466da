"""Where the dataset key comes from.

A :class:`KeySource` yields a :class:`KeyHandle`: the DEK in a :class:`SecretBuffer`, the lease
expiry and a ``revoked`` event that the source sets when the broker revokes the lease (the
trainer then shreds and exits with code 3). Sources:

* :class:`trainer.attested.AttestedKeySource`: the production path, ``trainer --attest``.
  Each process proves itself to every broker holding a share and derives the DEK in memory.
* :class:`StaticKeySource`: holds a DEK given in memory. For unit tests and the benchmark
  only; the CLI never constructs it.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from sealed.secrets import SecretBuffer

if TYPE_CHECKING:
    from trainer.config import JobConfig

__all__ = [
    "AttestationDenied",
    "BrokersUnreachable",
    "KeyHandle",
    "KeySource",
    "KeySourceUnavailable",
    "StaticKeySource",
]


class AttestationDenied(Exception):
    """A broker refused to release a share; ``reasons`` are readable, never secret."""

    def __init__(self, message: str, reasons: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.reasons = reasons


class KeySourceUnavailable(Exception):
    """The key could not be obtained for a reason other than a denial (network, config)."""


class BrokersUnreachable(KeySourceUnavailable):
    """A broker could not be reached (down, network, deadline): an outage, not a refusal.
    The trainer exits 7 for it (``trainer --help``), never 3 (revoked) or 4 (denied)."""


@dataclass(slots=True)
class KeyHandle:
    """The dataset key of one process, with its lease.

    ``lease_expiry`` is a ``time.time()`` value or ``None`` for no expiry. ``revoked`` is set
    by the source (revocation pushed or found while renewing); ``revoke_reason`` says why.
    ``renewal_problem`` is set while renewals fail because a broker cannot be reached (and
    cleared by the next successful renewal): a lease that runs out then is an outage, not a
    revocation. ``config``: the job with its dataset as the brokers have it on record (key
    version and manifest filled in), when the source learned it; None: the job as given.
    ``held``: other copies of key material the source keeps for a while (local rank 0's key
    frame for its local peers, :mod:`trainer.local_keys`), shredded with the DEK.
    """

    dek: SecretBuffer
    lease_expiry: float | None = None
    revoked: threading.Event = field(default_factory=threading.Event)
    revoke_reason: str = ""
    renewal_problem: str = ""
    config: JobConfig | None = None
    held: tuple[SecretBuffer, ...] = ()

    def revoke(self, reason: str) -> None:
        self.revoke_reason = reason
        self.revoked.set()


class KeySource(Protocol):
    def acquire(self) -> KeyHandle:
        """Obtain the DEK (attesting as needed); raises AttestationDenied on a denial."""
        ...

    def close(self) -> None:
        """Stop renewals and watchers; the handle's DEK is zeroed by the shredder."""
        ...


class StaticKeySource:
    """A DEK already in memory: unit tests and the benchmark only, never the CLI.

    The source keeps its own copy and hands out a fresh copy per :meth:`acquire`, so the
    trainer may zeroize what it received.
    """

    def __init__(self, dek: SecretBuffer, *, lease_seconds: float | None = None) -> None:
        self._dek = dek.copy()
        self._lease = lease_seconds
        self._handles: list[KeyHandle] = []

    def acquire(self) -> KeyHandle:
        expiry = time.time() + self._lease if self._lease is not None else None
        handle = KeyHandle(dek=self._dek.copy(), lease_expiry=expiry)
        self._handles.append(handle)
        return handle

    def revoke_all(self, reason: str = "revoked by test") -> None:
        for handle in self._handles:
            handle.revoke(reason)

    def close(self) -> None:
        self._dek.zeroize()
