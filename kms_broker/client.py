"""Node key client: the library the trainer imports to obtain a dataset key.

For every broker that holds a share, **in parallel** (one thread per broker): Challenge ->
one-time P-256 key -> ``expected_report_data(nonce, session_id, node_public_key)``. Then **one**
piece of evidence covers every broker's session: its report data is
:func:`attest.interface.combined_report_data` over the list of per-broker report data, and each
Attest carries that list (``report_data_set``) so each broker checks that its own session is in
it (a TPM quotes one command at a time, so one quote for n brokers instead of n in a row; with
one broker the evidence is over that session's report data alone, as before). Then each
broker, in parallel, gets one Attest that also names the dataset key
(``AttestRequest.release``): it judges the evidence and, when it passes, releases its share in
the same call (no token; :meth:`kms_broker.domain.node_flow.NodeFlow.attest_release`); a
broker from before that field answers with a token only, and gets a Release call. With
``one_call_release=False`` the client attests to every broker before releasing from any and
then calls Release with each token (DESIGN.md's three calls; two round trips after the
challenge instead of one). Open each sealed
share with its one-time private key (:mod:`kms_broker.sealing`), and with every share in hand
(n-of-n, ordered by share index) derive the DEK (:func:`sealed.derive_dek`), zero the shares and
drop the one-time keys. The DEK is returned as a :class:`~sealed.SecretBuffer` the caller must
zeroize.

Evidence comes from the caller: ``evidence_for(report_data) -> (kind, payload)``, or
``evidence_for_set(items) -> SharedEvidence`` for a caller that batches several requesters'
sessions into one quote (local ranks sharing a TPM: ``trainer.quote_batch``); the set it
returns must contain every item asked for.

Replica sets: each share holder may be given as several addresses (a sequence of endpoints:
replicas of one broker on one PostgreSQL database and one HSM token, see
:mod:`kms_broker.state.postgres`). A call that fails with UNAVAILABLE (or a replica that does
not connect within ``REPLICA_CONNECT_S``) moves that holder to its next replica, and the
whole round (fresh challenges, one new evidence, attest, release or renew) starts over, until
``failover_s`` has passed; a round is never resumed on another replica, since a replica that
died mid-call may already have consumed the session's nonce. Leases name their holder by
``label`` (the set's addresses joined by commas), so a renewal may go to any replica. A
revocation stream lost to a dead replica is reopened on the next one.

Manifest from the brokers: :meth:`KeyClient.fetch_dek` names the dataset in every Challenge;
each broker answers with the manifest it has on record (``manifest_name``, and the key version
it belongs to; nothing when the node may not read the dataset). Every broker must answer the
same; a manifest the caller names must equal the one on record for that key version;
``key_version`` 0 takes the broker's. The caller's ``check_dataset`` then runs with the
result (:class:`DatasetRef`, whose ``manifest_name`` is empty when neither the caller nor the
brokers know it), after the challenges and before any evidence, attestation or release, so a
manifest missing from the node's store costs no key release and no lease. Disagreements
raise :class:`DatasetRefError`.

Each broker's channel waits on its first call until it is connected, up to ``timeout_s``
(:func:`kms_broker.rpc.wait_until_ready`), so a client started before its broker listens, or
many clients starting at once, connect rather than fail.

Errors are typed (:mod:`kms_broker.rpc`): ``PermissionDeniedError`` (with ``rules``),
``UnavailableError``, ``UnauthenticatedError``, ``NotFoundError``, ``InvalidRequest``,
``DataLoss``; a share that does not open raises :class:`ShareOpenError`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from cryptography.hazmat.primitives.asymmetric import ec

from attest.interface import combined_report_data, expected_report_data
from kms_broker import sealing
from kms_broker._proto.kmsbroker.v1 import broker_pb2 as pb
from kms_broker._proto.kmsbroker.v1 import broker_pb2_grpc as pb_grpc
from kms_broker.rpc import (
    BrokerEndpoint,
    BrokerRpcError,
    PermissionDeniedError,
    ReadyOnce,
    UnavailableError,
    error_from_rpc,
    open_channel,
)
from sealed.keys import derive_dek, validate_identifier
from sealed.secrets import SecretBuffer

__all__ = [
    "BrokerEndpoint",
    "DatasetRef",
    "DatasetRefError",
    "EvidenceFor",
    "EvidenceForSet",
    "KeyClient",
    "Lease",
    "ReleasedKey",
    "RevocationNotice",
    "ShareOpenError",
    "SharedEvidence",
]

EvidenceFor = Callable[[bytes], tuple[str, bytes]]
T = TypeVar("T")
REPLICA_CONNECT_S = 3.0  # how long a replica of a set may take to connect before the next


@dataclass(frozen=True, slots=True)
class SharedEvidence:
    """Evidence over ``combined_report_data(report_data_set)``; an empty set means the
    evidence's report data is the one item asked for itself."""

    kind: str
    payload: bytes
    report_data_set: tuple[bytes, ...] = ()


EvidenceForSet = Callable[[Sequence[bytes]], SharedEvidence]


class ShareOpenError(BrokerRpcError):
    """A released share did not open under this node's key and transcript."""


class DatasetRefError(BrokerRpcError):
    """The dataset the caller names does not match what the brokers have on record (another
    manifest, a key version whose manifest the brokers do not know, or brokers that disagree);
    raised before any evidence is made or key released. ``code`` is FAILED_PRECONDITION."""


@dataclass(frozen=True, slots=True)
class DatasetRef:
    """The dataset a release is for, as the brokers have it on record."""

    tenant_id: str
    dataset_id: str
    key_version: int
    manifest_name: str


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
    """The DEK (caller zeroizes, e.g. ``with released.dek:``) and the leases behind it.

    ``timings``: where the time went, as (phase, seconds) in order: ``challenge`` (every
    broker at once), ``evidence``, ``attest+release BROKER`` (the one call that attests and
    releases) and ``open BROKER`` (opening its share), or with ``one_call_release=False``
    ``attest BROKER`` and ``release BROKER`` (each broker's calls as its thread saw them; the
    brokers run in parallel), ``derive``. For logs."""

    dek: SecretBuffer
    tenant_id: str
    dataset_id: str
    key_version: int
    leases: tuple[Lease, ...]
    timings: tuple[tuple[str, float], ...] = ()
    manifest_name: str = ""  # the dataset's manifest, as the brokers have it on record


@dataclass(slots=True)
class _Replica:
    endpoint: BrokerEndpoint
    channel: grpc.Channel
    stub: pb_grpc.NodeServiceStub
    ready: ReadyOnce


class _Broker:
    """One share holder: a broker, or a replica set of it (its addresses, tried in turn).
    ``endpoint``, ``channel``, ``stub`` and ``ready`` are the current replica's; ``label``
    (the addresses joined by commas) names the holder in leases whichever replica served."""

    def __init__(self, replicas: list[_Replica]) -> None:
        self.replicas = replicas
        self.label = ",".join(r.endpoint.address for r in replicas)
        self._current = 0
        self._lock = threading.Lock()

    @property
    def replica(self) -> _Replica:
        return self.replicas[self._current]

    @property
    def endpoint(self) -> BrokerEndpoint:
        return self.replica.endpoint

    @property
    def channel(self) -> grpc.Channel:
        return self.replica.channel

    @property
    def stub(self) -> pb_grpc.NodeServiceStub:
        return self.replica.stub

    @property
    def ready(self) -> ReadyOnce:
        return self.replica.ready

    def fail_over(self, failed: _Replica) -> bool:
        """Move to the next replica if ``failed`` is still the current one; False when there
        is no other replica."""
        if len(self.replicas) < 2:
            return False
        with self._lock:
            if self.replicas[self._current] is failed:
                self._current = (self._current + 1) % len(self.replicas)
        return True


@dataclass(slots=True)
class _Attested:
    broker: _Broker
    private_key: ec.EllipticCurvePrivateKey | None
    public_key: bytes
    challenge: Any
    token: bytes = b""
    attest_s: float = 0.0
    released: Any = None  # the ReleaseResponse of an Attest that released


def _single(evidence_for: EvidenceFor) -> EvidenceForSet:
    def for_set(items: Sequence[bytes]) -> SharedEvidence:
        if len(items) == 1:
            return SharedEvidence(*evidence_for(items[0]))
        kind, payload = evidence_for(combined_report_data(items))
        return SharedEvidence(kind, payload, tuple(items))

    return for_set


class KeyClient:
    def __init__(
        self,
        brokers: Sequence[BrokerEndpoint | Sequence[BrokerEndpoint]],
        *,
        node_id: str,
        job_id: str,
        evidence_for: EvidenceFor | None = None,
        evidence_for_set: EvidenceForSet | None = None,
        timeout_s: float = 10.0,
        failover_s: float = 60.0,
        one_call_release: bool = True,
    ) -> None:
        if not brokers:
            raise ValueError("need at least one broker")
        if (evidence_for is None) == (evidence_for_set is None):
            raise ValueError("give exactly one of evidence_for and evidence_for_set")
        self.node_id = validate_identifier("node", node_id)
        self.job_id = validate_identifier("job", job_id)
        self._evidence = evidence_for_set or _single(evidence_for)  # type: ignore[arg-type]
        self._timeout = timeout_s
        self._failover_s = failover_s
        self._one_call = one_call_release
        self._brokers = []
        for holder in brokers:
            replicas = [holder] if isinstance(holder, BrokerEndpoint) else list(holder)
            if not replicas:
                raise ValueError("a replica set needs at least one address")
            # a replica that does not connect is left for the next one sooner
            connect_s = timeout_s if len(replicas) == 1 else min(timeout_s, REPLICA_CONNECT_S)
            channels = [(e, open_channel(e)) for e in replicas]
            self._brokers.append(_Broker([
                _Replica(e, ch, pb_grpc.NodeServiceStub(ch), ReadyOnce(ch, e.address, connect_s))
                for e, ch in channels]))
        self._leases: list[Lease] = []
        self._watchers: list[_Watcher] = []
        # one thread per broker, made once and reused by every phase (challenge, attest,
        # release, renewals) instead of a pool per phase
        self._pool = (ThreadPoolExecutor(max_workers=len(self._brokers),
                                         thread_name_prefix="key-client")
                      if len(self._brokers) > 1 else None)

    def close(self) -> None:
        for w in self._watchers:
            w.stop()
        if self._pool is not None:
            self._pool.shutdown(wait=False)
        for b in self._brokers:
            for replica in b.replicas:
                replica.channel.close()

    def __enter__(self) -> KeyClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ calls
    def _call(self, broker: _Broker, method: str, request: object, *,
              wait_for_ready: bool = False) -> Any:
        # the first call on a channel waits (up to the deadline) until it is connected;
        # wait_for_ready: a later call made while the broker restarts waits too, instead of
        # failing at once with UNAVAILABLE
        # with a replica set, an unavailable replica is left for the next one (the caller
        # starts the attestation over, see _failing_over) instead of being waited for
        replica = broker.replica
        try:
            replica.ready()
            return getattr(replica.stub, method)(
                request, timeout=self._timeout,
                wait_for_ready=wait_for_ready and len(broker.replicas) == 1)
        except grpc.RpcError as exc:
            error = error_from_rpc(exc, replica.endpoint.address)
        except UnavailableError as exc:
            error = exc
        if isinstance(error, UnavailableError):
            broker.fail_over(replica)
        raise error

    def _failing_over(self, attempt: Callable[[], T]) -> T:
        """Run ``attempt`` (a whole attestation round: fresh challenges, evidence, ...);
        when it fails with UNAVAILABLE and a share holder has another replica, run it again
        on the next replicas until ``failover_s`` has passed. A round is never resumed on
        another replica: a replica that died mid-call may have consumed the nonce."""
        deadline = time.monotonic() + self._failover_s
        while True:
            try:
                return attempt()
            except UnavailableError:
                if not any(len(b.replicas) > 1 for b in self._brokers) or \
                        time.monotonic() >= deadline:
                    raise

    def _each(self, brokers: Sequence[T], fn: Callable[[T], Any]) -> list[Any]:
        """``fn`` over every item at once (one thread each); results, or the exceptions
        raised, in order."""
        def guarded(item: T) -> Any:
            try:
                return fn(item)
            except Exception as exc:
                return _Failed(exc)

        if len(brokers) == 1 or self._pool is None:
            return [guarded(b) for b in brokers]
        return list(self._pool.map(guarded, brokers))

    def _attest_all(self, *, wait_for_ready: bool = False,
                    timings: list[tuple[str, float]] | None = None,
                    dataset: _DatasetAsk | None = None,
                    release: bool = False) -> list[_Attested]:
        """One fresh attestation at every broker with one evidence; raises the first
        permission denial (after every broker has judged), else the first other error.
        ``timings`` gets the challenge and evidence phases (seconds). ``dataset``: name it
        in every challenge, resolve it (``dataset.resolved``) and run its check before the
        evidence is made. ``release`` (with ``dataset``): each Attest also releases the
        resolved key (``_Attested.released``) and no token is issued."""
        started = time.perf_counter()
        named = {} if dataset is None else {
            "tenant_id": dataset.tenant_id, "dataset_id": dataset.dataset_id}

        def challenge(broker: _Broker) -> _Attested:
            reply = self._call(broker, "Challenge", pb.ChallengeRequest(
                node_id=self.node_id, job_id=self.job_id, **named),
                wait_for_ready=wait_for_ready)
            private_key, public_key = sealing.generate_node_key()
            return _Attested(broker, private_key, public_key, reply)

        sessions = _raise_first(self._each(self._brokers, challenge))
        target = None
        if dataset is not None:
            dataset.resolve([(a.broker.endpoint.address, a.challenge) for a in sessions])
            assert dataset.resolved is not None
            if release:
                target = pb.ReleaseTarget(tenant_id=dataset.tenant_id,
                                          dataset_id=dataset.dataset_id,
                                          key_version=dataset.resolved.key_version)
        challenged = time.perf_counter()
        items = [expected_report_data(a.challenge.nonce, a.challenge.session_id, a.public_key)
                 for a in sessions]
        evidence = self._evidence(items)
        if timings is not None:
            timings += [("challenge", challenged - started),
                        ("evidence", time.perf_counter() - challenged)]
        if evidence.report_data_set and not set(items) <= set(evidence.report_data_set):
            raise ValueError("evidence_for_set returned a set without this client's sessions")

        def attest(a: _Attested) -> _Attested:
            began = time.perf_counter()
            reply = self._call(a.broker, "Attest", pb.AttestRequest(
                node_id=self.node_id, session_id=a.challenge.session_id,
                evidence=pb.Evidence(kind=evidence.kind, payload=evidence.payload),
                node_public_key=a.public_key, report_data_set=evidence.report_data_set,
                release=target,
            ), wait_for_ready=wait_for_ready)
            a.token = reply.token
            # a broker from before the releasing Attest ignores the field and answers with a
            # token: the release then takes its own call (Release with that token)
            a.released = reply.release if target is not None and reply.HasField(
                "release") else None
            a.attest_s = time.perf_counter() - began
            return a

        # every broker judges (and audits) this node on its own, so a refusal shows in every
        # broker's log, and no share is released to a node another share holder refuses
        results = self._each(sessions, attest)
        denials = [r.error for r in results
                   if isinstance(r, _Failed) and isinstance(r.error, PermissionDeniedError)]
        if denials:
            raise denials[0]
        return _raise_first(results)

    def fetch_dek(self, *, tenant_id: str, dataset_id: str, key_version: int = 0,
                  manifest_name: str = "",
                  check_dataset: Callable[[DatasetRef], None] | None = None) -> ReleasedKey:
        """Attest to every broker, release and open every share, derive the DEK (failing
        over to another replica of a share holder that is unavailable).

        ``key_version`` 0 and ``manifest_name`` empty: those the brokers have on record;
        given, they must match it (see the module docstring). ``check_dataset`` runs with the
        resolved :class:`DatasetRef` before any evidence or release; what it raises ends the
        call."""
        return self._failing_over(lambda: self._fetch_dek_once(_DatasetAsk(
            tenant_id, dataset_id, key_version, manifest_name, check_dataset)))

    def _fetch_dek_once(self, ask: _DatasetAsk) -> ReleasedKey:
        shares: dict[int, SecretBuffer] = {}
        leases: list[Lease] = []
        timings: list[tuple[str, float]] = []
        tenant_id, dataset_id = ask.tenant_id, ask.dataset_id
        try:
            attested = self._attest_all(timings=timings, dataset=ask, release=self._one_call)
            assert ask.resolved is not None
            key_version = ask.resolved.key_version
            timings += [(f"{'attest' if a.released is None else 'attest+release'} "
                         f"{a.broker.endpoint.address}", a.attest_s) for a in attested]

            def release(a: _Attested) -> tuple[Any, SecretBuffer, float]:
                began = time.perf_counter()
                reply = a.released if a.released is not None else self._call(
                    a.broker, "Release", pb.ReleaseRequest(
                        node_id=self.node_id, token=a.token, tenant_id=tenant_id,
                        dataset_id=dataset_id, key_version=key_version))
                transcript = sealing.release_transcript(
                    session_id=a.challenge.session_id, nonce=a.challenge.nonce,
                    tenant_id=tenant_id, dataset_id=dataset_id, key_version=key_version,
                    broker_id=a.challenge.broker_id, node_public_key=a.public_key,
                )
                private_key, a.private_key = a.private_key, None
                try:
                    share = sealing.open_sealed_share(private_key, reply.sealed_share,
                                                      transcript)
                except (sealing.SealingError, ValueError):
                    raise ShareOpenError("released share did not open", code="DATA_LOSS",
                                         broker=a.broker.endpoint.address) from None
                finally:
                    del private_key
                return reply, share, time.perf_counter() - began

            results = self._each(attested, release)
            counts = set()
            failure: Exception | None = next(
                (r.error for r in results if isinstance(r, _Failed)), None)
            for a, result in zip(attested, results, strict=True):
                if isinstance(result, _Failed):
                    continue
                reply, share, seconds = result
                timings.append((f"{'release' if a.released is None else 'open'} "
                                f"{a.broker.endpoint.address}", seconds))
                index = reply.share_index
                if index in shares:
                    share.zeroize()
                    failure = failure or ShareOpenError(
                        f"two brokers returned share index {index}", code="FAILED_PRECONDITION")
                    continue
                shares[index] = share
                counts.add(reply.share_count)
                leases.append(Lease(a.broker.label, reply.lease_id,
                                    reply.lease_expires_unix_ms))
            if failure is not None:
                raise failure
            if len(counts) != 1 or sorted(shares) != list(range(counts.pop())):
                raise ShareOpenError(
                    f"brokers returned shares {sorted(shares)} of a different split; "
                    f"configure every broker that holds a share", code="FAILED_PRECONDITION")
            began = time.perf_counter()
            dek = derive_dek([shares[i] for i in sorted(shares)], tenant_id=tenant_id,
                             dataset_id=dataset_id, key_version=key_version)
            timings.append(("derive", time.perf_counter() - began))
        finally:
            for share in shares.values():
                share.zeroize()
        self._leases = leases
        return ReleasedKey(dek, tenant_id, dataset_id, key_version, tuple(leases),
                           tuple(timings), ask.resolved.manifest_name)

    def renew(self) -> int:
        """Re-attest to each broker (in parallel, one evidence) and renew its lease; returns
        the earliest new expiry."""
        if not self._leases:
            raise ValueError("no leases to renew; call fetch_dek first")
        return self._failing_over(self._renew_once)

    def _renew_once(self) -> int:
        by_broker = {lease.broker: lease for lease in self._leases}
        # a renewal rides out a broker restart: wait for the channel (up to the deadline)
        attested = self._attest_all(wait_for_ready=True)

        def renew_one(a: _Attested) -> Lease:
            a.private_key = None
            lease = by_broker[a.broker.label]
            reply = self._call(a.broker, "RenewLease", pb.RenewLeaseRequest(
                node_id=self.node_id, lease_id=lease.lease_id, token=a.token),
                wait_for_ready=True)
            return Lease(lease.broker, lease.lease_id, reply.lease_expires_unix_ms)

        renewed = _raise_first(self._each(attested, renew_one))
        self._leases = renewed
        return min(lease.expires_unix_ms for lease in renewed)

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


@dataclass(frozen=True, slots=True)
class _Failed:
    error: Exception


@dataclass(slots=True)
class _DatasetAsk:
    """What the caller named (0 / empty: not named) and, once the brokers answered, what
    the release is for."""

    tenant_id: str
    dataset_id: str
    key_version: int
    manifest_name: str
    check: Callable[[DatasetRef], None] | None
    resolved: DatasetRef | None = None

    def resolve(self, answers: Sequence[tuple[str, Any]]) -> None:
        """From each broker's (address, ChallengeResponse): one record, or
        DatasetRefError; then the caller's check. A broker that answers no record abstains
        (the upload may be registered at one share holder only, or it may not say); the
        brokers that answer one must agree. Taking one broker's word is safe: the manifest
        authenticates under the DEK, so a wrong name fails closed."""
        where = f"{self.tenant_id}/{self.dataset_id}"
        records = {(r.manifest_name, r.manifest_key_version) for _, r in answers
                   if r.manifest_name or r.manifest_key_version} or {("", 0)}
        if len(records) > 1:
            said = "; ".join(f"{a}: {r.manifest_name or 'none'} (key version "
                             f"{r.manifest_key_version})" for a, r in answers)
            raise DatasetRefError(
                f"the brokers disagree on the manifest of dataset {where} ({said}); register "
                f"the upload at every broker that holds a share", code="FAILED_PRECONDITION")
        name, version = records.pop()
        key_version = self.key_version or version
        if not key_version:
            raise DatasetRefError(
                f"the brokers have no manifest on record for dataset {where} that this job may "
                f"read (a grant must name the job and the dataset), so its key version is not "
                f"known; name dataset.key_version in the job file", code="FAILED_PRECONDITION")
        on_record = name if version == key_version else ""
        if self.manifest_name and on_record and self.manifest_name != on_record:
            raise DatasetRefError(
                f"dataset.manifest {self.manifest_name} does not match the manifest the brokers "
                f"have on record for {where} key version {key_version} ({on_record}); remove "
                f"dataset.manifest from the job file or correct it", code="FAILED_PRECONDITION")
        manifest = self.manifest_name or on_record  # "" when nobody knows it (the check says)
        self.resolved = DatasetRef(self.tenant_id, self.dataset_id, key_version, manifest)
        if self.check is not None:
            self.check(self.resolved)


def _raise_first(results: list[Any]) -> list[Any]:
    for r in results:
        if isinstance(r, _Failed):
            raise r.error
    return results


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
        self._replica = broker.replica  # the replica of the current subscription
        self._stop = threading.Event()
        self.connected = threading.Event()
        self.subscriptions = 0  # how many times the stream has been (re)opened and confirmed
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"revocations-{broker.endpoint.address}")

    def start(self) -> None:
        self._thread.start()

    def _stream(self, wait_for_ready: bool) -> None:
        """One subscription, until the stream ends; raises grpc.RpcError if it fails."""
        replica = self._broker.replica
        address = replica.endpoint.address
        self._replica = replica
        self._call = replica.stub.WatchRevocations(
            pb.WatchRevocationsRequest(node_id=self._node_id),
            wait_for_ready=wait_for_ready and len(self._broker.replicas) == 1)
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
            if self._broker.fail_over(self._replica):  # the next replica of a set, at once
                delay = RESUBSCRIBE_FIRST_S
            self._stop.wait(delay)
            delay = min(delay * 2, RESUBSCRIBE_MAX_S)

    def stop(self) -> None:
        self._stop.set()
        if self._call is not None:
            self._call.cancel()
        self._thread.join(timeout=5)


__all__ += ["PermissionDeniedError", "UnavailableError"]
