"""Node key client: the library the trainer imports to obtain a dataset key.

For each broker that holds a share: Challenge -> build evidence over
``expected_report_data(nonce, session_id, node_public_key)`` with the caller's
``evidence_for`` callback -> Attest -> Release -> open the sealed share with the one-time
private key (:mod:`kms_broker.sealing`). With every share in hand (n-of-n, ordered by share
index) it derives the DEK (:func:`sealed.derive_dek`), zeroes the shares and drops the
one-time keys. The DEK is returned as a :class:`~sealed.SecretBuffer` the caller must zeroize.

Errors are typed (:mod:`kms_broker.rpc`): ``PermissionDeniedError`` (with ``rules``),
``UnavailableError``, ``UnauthenticatedError``, ``NotFoundError``, ``InvalidRequest``,
``DataLoss``; a share that does not open raises :class:`ShareOpenError`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc
from cryptography.hazmat.primitives.asymmetric import ec

from attest.interface import expected_report_data
from kms_broker import sealing
from kms_broker._proto.kmsbroker.v1 import broker_pb2 as pb
from kms_broker._proto.kmsbroker.v1 import broker_pb2_grpc as pb_grpc
from kms_broker.rpc import (
    BrokerEndpoint,
    BrokerRpcError,
    PermissionDeniedError,
    UnavailableError,
    error_from_rpc,
    open_channel,
)
from sealed.keys import derive_dek, validate_identifier
from sealed.secrets import SecretBuffer

__all__ = [
    "BrokerEndpoint",
    "EvidenceFor",
    "KeyClient",
    "Lease",
    "ReleasedKey",
    "RevocationNotice",
    "ShareOpenError",
]

EvidenceFor = Callable[[bytes], tuple[str, bytes]]


class ShareOpenError(BrokerRpcError):
    """A released share did not open under this node's key and transcript."""


@dataclass(frozen=True, slots=True)
class Lease:
    broker: str
    lease_id: str
    expires_unix_ms: int


@dataclass(frozen=True, slots=True)
class RevocationNotice:
    broker: str
    lease_id: str
    tenant_id: str
    dataset_id: str
    reason: str


@dataclass(slots=True)
class ReleasedKey:
    """The DEK (caller zeroizes, e.g. ``with released.dek:``) and the leases behind it."""

    dek: SecretBuffer
    tenant_id: str
    dataset_id: str
    key_version: int
    leases: tuple[Lease, ...]


@dataclass(slots=True)
class _Broker:
    endpoint: BrokerEndpoint
    channel: grpc.Channel
    stub: pb_grpc.NodeServiceStub


class KeyClient:
    def __init__(
        self,
        brokers: Sequence[BrokerEndpoint],
        *,
        node_id: str,
        job_id: str,
        evidence_for: EvidenceFor,
        timeout_s: float = 10.0,
    ) -> None:
        if not brokers:
            raise ValueError("need at least one broker")
        self.node_id = validate_identifier("node", node_id)
        self.job_id = validate_identifier("job", job_id)
        self._evidence_for = evidence_for
        self._timeout = timeout_s
        self._brokers = []
        for endpoint in brokers:
            channel = open_channel(endpoint)
            self._brokers.append(_Broker(endpoint, channel, pb_grpc.NodeServiceStub(channel)))
        self._leases: list[Lease] = []
        self._watchers: list[_Watcher] = []

    def close(self) -> None:
        for w in self._watchers:
            w.stop()
        for b in self._brokers:
            b.channel.close()

    def __enter__(self) -> KeyClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ calls
    def _call(self, broker: _Broker, method: str, request: object, *,
              wait_for_ready: bool = False) -> object:
        # wait_for_ready: a call made while the broker restarts waits (up to the deadline) for
        # the channel to reconnect instead of failing at once with UNAVAILABLE
        try:
            return getattr(broker.stub, method)(request, timeout=self._timeout,
                                                wait_for_ready=wait_for_ready)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, broker.endpoint.address) from None

    def _attest(self, broker: _Broker, *, wait_for_ready: bool = False
                ) -> tuple[ec.EllipticCurvePrivateKey, bytes, object, bytes]:
        """One fresh attestation: (private key, public key, challenge, token)."""
        challenge = self._call(broker, "Challenge",
                               pb.ChallengeRequest(node_id=self.node_id, job_id=self.job_id),
                               wait_for_ready=wait_for_ready)
        private_key, public_key = sealing.generate_node_key()
        report_data = expected_report_data(
            challenge.nonce, challenge.session_id, public_key  # type: ignore[attr-defined]
        )
        kind, payload = self._evidence_for(report_data)
        reply = self._call(broker, "Attest", pb.AttestRequest(
            node_id=self.node_id, session_id=challenge.session_id,  # type: ignore[attr-defined]
            evidence=pb.Evidence(kind=kind, payload=payload), node_public_key=public_key,
        ))
        return private_key, public_key, challenge, reply.token  # type: ignore[attr-defined]

    def fetch_dek(self, *, tenant_id: str, dataset_id: str, key_version: int) -> ReleasedKey:
        """Attest to every broker, release and open every share, derive the DEK."""
        shares: dict[int, SecretBuffer] = {}
        leases: list[Lease] = []
        try:
            counts = set()
            # Attest to every broker before releasing from any: each broker then judges (and
            # audits) this node on its own, so a refusal shows in every broker's log, and no
            # share is released to a node that another share holder refuses.
            attested, denials = [], []
            for broker in self._brokers:
                try:
                    attested.append((broker, *self._attest(broker)))
                except PermissionDeniedError as exc:
                    denials.append(exc)
            if denials:
                raise denials[0]
            for broker, private_key, public_key, challenge, token in attested:
                reply = self._call(broker, "Release", pb.ReleaseRequest(
                    node_id=self.node_id, token=token, tenant_id=tenant_id,
                    dataset_id=dataset_id, key_version=key_version,
                ))
                transcript = sealing.release_transcript(
                    session_id=challenge.session_id, nonce=challenge.nonce,  # type: ignore[attr-defined]
                    tenant_id=tenant_id, dataset_id=dataset_id, key_version=key_version,
                    broker_id=challenge.broker_id,  # type: ignore[attr-defined]
                    node_public_key=public_key,
                )
                try:
                    share = sealing.open_sealed_share(
                        private_key, reply.sealed_share, transcript  # type: ignore[attr-defined]
                    )
                except (sealing.SealingError, ValueError):
                    raise ShareOpenError("released share did not open", code="DATA_LOSS",
                                         broker=broker.endpoint.address) from None
                finally:
                    del private_key
                index = reply.share_index  # type: ignore[attr-defined]
                if index in shares:
                    share.zeroize()
                    raise ShareOpenError(f"two brokers returned share index {index}",
                                         code="FAILED_PRECONDITION")
                shares[index] = share
                counts.add(reply.share_count)  # type: ignore[attr-defined]
                leases.append(Lease(broker.endpoint.address, reply.lease_id,  # type: ignore[attr-defined]
                                    reply.lease_expires_unix_ms))  # type: ignore[attr-defined]
            if len(counts) != 1 or sorted(shares) != list(range(counts.pop())):
                raise ShareOpenError(
                    f"brokers returned shares {sorted(shares)} of a different split; "
                    f"configure every broker that holds a share", code="FAILED_PRECONDITION")
            dek = derive_dek([shares[i] for i in sorted(shares)], tenant_id=tenant_id,
                             dataset_id=dataset_id, key_version=key_version)
        finally:
            for share in shares.values():
                share.zeroize()
        self._leases = leases
        return ReleasedKey(dek, tenant_id, dataset_id, key_version, tuple(leases))

    def renew(self) -> int:
        """Re-attest to each broker and renew its lease; returns the earliest new expiry."""
        if not self._leases:
            raise ValueError("no leases to renew; call fetch_dek first")
        expiries = []
        renewed = []
        for broker, lease in zip(self._brokers, self._leases, strict=True):
            # a renewal rides out a broker restart: wait for the channel (up to the deadline)
            private_key, _, _, token = self._attest(broker, wait_for_ready=True)
            del private_key
            reply = self._call(broker, "RenewLease", pb.RenewLeaseRequest(
                node_id=self.node_id, lease_id=lease.lease_id, token=token),
                wait_for_ready=True)
            expiries.append(reply.lease_expires_unix_ms)  # type: ignore[attr-defined]
            renewed.append(Lease(lease.broker, lease.lease_id,
                                 reply.lease_expires_unix_ms))  # type: ignore[attr-defined]
        self._leases = renewed
        return min(expiries)

    @property
    def leases(self) -> tuple[Lease, ...]:
        return tuple(self._leases)

    def watch_revocations(
        self, on_revoked: Callable[[RevocationNotice], None],
        on_error: Callable[[BrokerRpcError], None] | None = None,
    ) -> None:
        """Start one background stream per broker; ``on_revoked`` runs on its thread.

        A stream lost to an outage or a broker restart is opened again (backing off up to
        ``RESUBSCRIBE_MAX_S``) until :meth:`close`; ``on_error`` hears of each loss. A refusal
        (the node was revoked, its certificate no longer fits) ends that broker's watch.
        Revocations made while a stream is down are not replayed: the next renewal fails."""
        for broker in self._brokers:
            watcher = _Watcher(broker, self.node_id, on_revoked, on_error)
            watcher.start()
            self._watchers.append(watcher)

    def watching(self) -> bool:
        """True while at least one broker's stream is subscribed."""
        return any(w.connected.is_set() for w in self._watchers)

    def watching_all(self) -> bool:
        """True while every broker's stream is subscribed."""
        return bool(self._watchers) and all(w.connected.is_set() for w in self._watchers)


RESUBSCRIBE_FIRST_S = 0.2
RESUBSCRIBE_MAX_S = 5.0
# a lost stream is worth reopening after these; anything else is a refusal
_TRANSIENT = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED,
                        grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.INTERNAL,
                        grpc.StatusCode.UNKNOWN, grpc.StatusCode.ABORTED})


class _Watcher:
    def __init__(self, broker: _Broker, node_id: str,
                 on_revoked: Callable[[RevocationNotice], None],
                 on_error: Callable[[BrokerRpcError], None] | None) -> None:
        self._broker = broker
        self._node_id = node_id
        self._on_revoked = on_revoked
        self._on_error = on_error
        self._call: grpc.Future | None = None  # type: ignore[name-defined]
        self._stop = threading.Event()
        self.connected = threading.Event()
        self.subscriptions = 0  # how many times the stream has been (re)opened and confirmed
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"revocations-{broker.endpoint.address}")

    def start(self) -> None:
        self._thread.start()

    def _stream(self, wait_for_ready: bool) -> None:
        """One subscription, until the stream ends; raises grpc.RpcError if it fails."""
        address = self._broker.endpoint.address
        self._call = self._broker.stub.WatchRevocations(
            pb.WatchRevocationsRequest(node_id=self._node_id), wait_for_ready=wait_for_ready)
        try:
            for event in self._call:
                if not event.lease_id:  # the broker's first message: subscription is live
                    self.subscriptions += 1
                    self.connected.set()
                    continue
                self._on_revoked(RevocationNotice(address, event.lease_id, event.tenant_id,
                                                  event.dataset_id, event.reason))
        finally:
            self.connected.clear()

    def _run(self) -> None:
        address = self._broker.endpoint.address
        delay, reported = RESUBSCRIBE_FIRST_S, False
        while not self._stop.is_set():
            before = self.subscriptions
            try:
                self._stream(wait_for_ready=before > 0)
                error = UnavailableError("the broker ended the revocation stream",
                                         code="UNAVAILABLE", broker=address)
                transient = True
            except grpc.RpcError as exc:
                error = error_from_rpc(exc, address)
                transient = exc.code() in _TRANSIENT  # type: ignore[attr-defined]
            if self._stop.is_set():
                return
            if self.subscriptions > before:  # the stream was live: a new loss
                delay, reported = RESUBSCRIBE_FIRST_S, False
            if not reported and self._on_error is not None:
                self._on_error(error)  # once per loss, not once per retry
            reported = True
            if not transient:
                return
            self._stop.wait(delay)
            delay = min(delay * 2, RESUBSCRIBE_MAX_S)

    def stop(self) -> None:
        self._stop.set()
        if self._call is not None:
            self._call.cancel()
        self._thread.join(timeout=5)


__all__ += ["PermissionDeniedError", "UnavailableError"]
