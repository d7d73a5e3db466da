"""The production key source: attested release from every broker holding a share.

One process per node attests: a process started alone, or local rank 0 under torchrun, which
then hands the DEK, and every lease renewal and revocation after it, to the other local ranks
of its torchrun agent (:mod:`trainer.local_keys`: a peer-checked Unix socket, never disk, env
or argv; ``share_local_key=False`` makes every rank attest for itself as before). For the
attesting process: ``kms_broker.client.KeyClient`` makes a one-time P-256 key per broker and gets a
challenge from every broker at once; one piece of evidence covers every broker's
``expected_report_data(nonce, session_id, node_public_key)``; it attests, releases, opens the
sealed shares and derives the DEK (shares zeroed). Evidence is a TPM 2.0 quote: the node's
hardening facts, the code identity (``trainer.guard``: the digest of the measured code set,
checked against every mapped library before the first broker is contacted and before every
renewal) and the job identity (``trainer.job_identity``: ``job.digest``, ``job.model``, ...)
are measured into the application PCR (``attest.tpm2.agent``) and quoted with the enrolled
AK (or, with ``attestation.evidence: composite``, a CPU TEE report and one report per GPU).
When every rank attests (``share_local_key=False``), the local ranks of a job share one quote
(:mod:`trainer.quote_batch`: whichever rank holds the batch lock quotes once over every
waiting rank's sessions), because the TPM runs one command at a time and measuring resets and
extends one PCR; a direct call of
:meth:`AttestedKeySource.evidence_for` takes turns at the TPM under an ``flock``.

Lease: a background thread renews every lease (re-attesting) once half of it has run out; a
refusal (permission denied, lease or grant gone) revokes the handle, so the trainer shreds
and exits with code 3. Revocations pushed by the brokers (``WatchRevocations``) do the same.
Local rank 0 forwards each to its local peers before it acts on it itself; a peer whose
channel to rank 0 ends without goodbye is revoked too. A peer runs its own code-identity
check before it takes the key and at every lease update it receives.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kms_broker.logs import fields
from trainer.dataset_check import DatasetMismatch, require_manifest, resolved
from trainer.guard import CodeIdentityRefused
from trainer.job_identity import job_claims
from trainer.keysource import (
    AttestationDenied,
    BrokersUnreachable,
    KeyHandle,
    KeySourceUnavailable,
)

if TYPE_CHECKING:
    from trainer.config import JobConfig

__all__ = ["AttestedKeySource"]

log = logging.getLogger("trainer.attest")

EvidenceFor = Callable[[bytes], tuple[str, bytes]]


def _local_ranks() -> tuple[int, int]:
    """(LOCAL_RANK, LOCAL_WORLD_SIZE) under torchrun; (0, 1) for a process started alone."""
    try:
        rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
        world = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    except ValueError:
        raise KeySourceUnavailable("torchrun's LOCAL_RANK and LOCAL_WORLD_SIZE must be "
                                   "integers") from None
    if "LOCAL_RANK" not in os.environ or world < 2 or not 0 <= rank < world:
        return 0, 1
    return rank, world


def _failure_kinds() -> tuple[tuple[type[Exception], str], ...]:
    """Local rank 0's failures and the kind it tells its peers (trainer.local_keys, frame E);
    a peer raises the same class again. Any other failure is kind "x"."""
    from trainer.dataset_check import DatasetMissing

    return ((AttestationDenied, "d"), (BrokersUnreachable, "u"), (DatasetMismatch, "m"),
            (DatasetMissing, "s"))


def _failure_kind(exc: BaseException) -> str:
    """What local rank 0 tells its peers it met."""
    return next((kind for cls, kind in _failure_kinds() if isinstance(exc, cls)), "x")


def _tpm_lock_path(tcti: str) -> Path:
    tag = hashlib.sha256(tcti.encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"trainer-tpm-{tag}.lock"


def tpm_evidence(tcti: str, report_data: bytes, claims: dict[str, Any]) -> tuple[str, bytes]:
    """``("tpm2", evidence)`` of ``claims`` over ``report_data``; every process using this TPM
    takes turns (measuring resets and extends one PCR), on a lock file named by the TCTI."""
    from attest.tpm2.agent import collect_evidence

    with open(_tpm_lock_path(tcti), "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return "tpm2", collect_evidence(tcti, report_data, claims)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class AttestedKeySource:
    """Attest to every broker in ``config.brokers`` and derive the DEK (see module doc)."""

    attested = True  # trainer.sealed_comm_ddp refuses plaintext collectives for this source

    def __init__(
        self,
        config: JobConfig,
        *,
        node_id: str | None = None,
        evidence_for: EvidenceFor | None = None,
        share_local_key: bool = True,
    ) -> None:
        """``share_local_key``: under torchrun with several local ranks, only local rank 0
        attests and the others take the key from it (:mod:`trainer.local_keys`)."""
        if not config.brokers:
            raise KeySourceUnavailable(
                "the job lists no brokers: --attest needs every broker that holds a share"
            )
        if config.attestation is None and (node_id is None or evidence_for is None):
            raise KeySourceUnavailable(
                "the job has no attestation section: add `attestation: {node_id: ..., "
                "tcti: device:/dev/tpmrm0}`"
            )
        self._config = config
        self._job = config  # with the dataset's key version and manifest once resolved
        self._node_id = node_id or (config.attestation.node_id if config.attestation else "")
        self._evidence_for = evidence_for
        self._client: Any = None
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self._code: dict[str, str] | None = None
        self._local_rank, local_world = _local_ranks() if share_local_key else (0, 1)
        self._local_peers = local_world - 1  # > 0: rank 0 holds the key for its local peers
        self._holder: Any = None
        self._peer_watch: Any = None

    # evidence -------------------------------------------------------------------------------
    def evidence_for(self, report_data: bytes) -> tuple[str, bytes]:
        """Evidence over ``report_data``: a TPM 2.0 quote (facts + code digest measured and
        quoted), or with ``attestation.evidence: composite`` the CPU TEE report and one
        report per GPU (``attest.tee_collect.collect_composite``)."""
        if self._evidence_for is not None:
            return self._evidence_for(report_data)
        assert self._config.attestation is not None
        if self._config.attestation.evidence == "composite":
            self._code_claims()  # the guard's checks again, though TEE reports carry no claims
            from attest.nvidia.nvml import NvmlUnavailable
            from attest.tee_collect import TeeUnavailable, collect_composite

            try:
                return "composite", collect_composite(report_data)
            except (NvmlUnavailable, TeeUnavailable) as exc:
                raise KeySourceUnavailable(f"no composite evidence on this node: {exc}") \
                    from None
        from attest.tpm2.agent import node_claims

        # the job as the brokers resolved it (key version, manifest): what is trained
        claims = node_claims(code=self._code_claims(), extra=job_claims(self._job))
        return tpm_evidence(self._config.attestation.tcti, report_data, claims)

    def _shared_quotes(self) -> Any:
        """One quote for every local rank of this job waiting at this TPM."""
        from trainer.quote_batch import QuoteBatcher, batch_directory

        assert self._config.attestation is not None
        # ranks that attest for themselves meet at the TPM; with the key shared, one attests
        expected = 1 if self._local_peers else int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
        batcher = QuoteBatcher(batch_directory(self._config.attestation.tcti,
                                               self._config.job_id),
                               self.evidence_for, expected=expected)

        def evidence_for_set(items: Any) -> Any:
            # every rank runs its own code-identity check (the guard), even when another
            # rank's quote serves it
            self._code_claims()
            return batcher(items)

        return evidence_for_set

    def _code_claims(self) -> dict[str, str]:
        """Code identity (trainer/guard.py): under the guard, every mapped library is
        checked again on each call (renewals too); without it, measured once in full."""
        from trainer import guard

        if guard.active() or self._code is None:
            self._code = guard.code_claims()
        return self._code

    # key -----------------------------------------------------------------------------------
    def acquire(self) -> KeyHandle:
        if self._local_rank > 0:
            return self._acquire_from_local_rank_0()
        if not self._local_peers:
            return self._acquire_from_brokers()
        from trainer.local_keys import LocalKeyHolder, channel_name

        # listening before attesting: the peers wait on the channel, not in a retry loop
        self._holder = LocalKeyHolder(channel_name(self._config.job_id),
                                      peers=self._local_peers)
        try:
            handle = self._acquire_from_brokers()
        except BaseException as exc:
            self._holder.publish_error(_failure_kind(exc), str(exc),
                                       tuple(getattr(exc, "reasons", ())))
            raise
        self._holder.publish_key(handle.dek, lease_expiry=handle.lease_expiry,
                                 key_version=self._job.dataset.key_version or 0,
                                 manifest=self._job.dataset.manifest or "")
        handle.held = self._holder.held  # a signal before every peer has it shreds it too
        return handle

    def _acquire_from_local_rank_0(self) -> KeyHandle:
        """A local peer: the key from local rank 0 (which attested for the node), then every
        lease update and revocation it forwards."""
        from trainer.local_keys import HolderFailed, PeerWatcher, channel_name, receive_key

        if self._evidence_for is None:
            self._code_claims()  # this process's own code identity, before it holds a key
        started = time.perf_counter()
        try:
            got = receive_key(channel_name(self._config.job_id), local_rank=self._local_rank)
        except HolderFailed as exc:
            if exc.kind == "d":  # the denial as rank 0 met it, with the failed rules
                raise AttestationDenied(str(exc), exc.reasons) from None
            cls = next((c for c, kind in _failure_kinds() if kind == exc.kind),
                       KeySourceUnavailable)
            raise cls(f"local rank 0: {exc}") from None
        job = self._config
        if got.key_version != (job.dataset.key_version or 0) or (
                got.manifest and got.manifest != job.dataset.manifest):
            job = resolved(job, key_version=got.key_version, manifest=got.manifest or None)
        self._job = job
        handle = KeyHandle(dek=got.dek, lease_expiry=got.lease_expiry, config=job)
        log.info("dataset key from local rank 0 in %.0f ms (it attested for this node)",
                 (time.perf_counter() - started) * 1e3, extra=fields(
                     job_id=job.job_id, node_id=self._node_id, local_rank=self._local_rank))

        def on_lease(expiry: float, problem: str) -> None:
            if self._evidence_for is None:
                try:
                    self._code_claims()
                except CodeIdentityRefused as exc:
                    handle.revoke(f"code identity refused: {exc}")
                    return
            handle.renewal_problem = problem
            handle.lease_expiry = expiry

        def on_gone(reason: str) -> None:
            if handle.renewal_problem:  # rank 0 ran out of lease in a broker outage: the same
                handle.lease_expiry = time.time()  # outage here (exit 7, not "revoked")
            else:
                handle.revoke(reason)

        self._peer_watch = PeerWatcher(got.channel, on_lease=on_lease,
                                       on_revoked=handle.revoke, on_gone=on_gone)
        return handle

    def _revoke(self, handle: KeyHandle, reason: str) -> None:
        """Local peers first: this process shreds and exits right after."""
        if self._holder is not None:
            self._holder.revoke(reason)
        handle.revoke(reason)

    def _acquire_from_brokers(self) -> KeyHandle:
        from kms_broker.client import DatasetRefError, KeyClient
        from kms_broker.rpc import (
            BrokerEndpoint,
            BrokerRpcError,
            PermissionDeniedError,
            UnavailableError,
        )

        config = self._config
        started = time.perf_counter()
        if self._evidence_for is None:
            self._code_claims()  # refuses (CodeIdentityRefused) before any broker is asked
        checked = time.perf_counter()
        try:
            # a share holder with replicas is a list of endpoints (KeyClient fails over)
            endpoints: list[Any] = []
            for b in config.brokers:
                replicas = [BrokerEndpoint.from_files(a, ca=Path(b.ca), cert=Path(b.cert),
                                                      key=Path(b.key), server_name=b.server_name)
                            for a in b.replicas]
                endpoints.append(replicas[0] if len(replicas) == 1 else replicas)
        except OSError as exc:
            raise KeySourceUnavailable(
                f"cannot read broker TLS material {exc.filename}: {exc.strerror}"
            ) from None
        if self._evidence_for is not None:  # injected evidence (tests): one call per fetch
            client = KeyClient(endpoints, node_id=self._node_id, job_id=config.job_id,
                               evidence_for=self._evidence_for)
        else:
            client = KeyClient(endpoints, node_id=self._node_id, job_id=config.job_id,
                               evidence_for_set=self._shared_quotes())
        self._client = client
        try:
            released = client.fetch_dek(tenant_id=config.tenant_id,
                                        dataset_id=config.dataset.id,
                                        key_version=config.dataset.key_version or 0,
                                        manifest_name=config.dataset.manifest or "",
                                        check_dataset=self._check_dataset)
        except DatasetRefError as exc:
            raise DatasetMismatch(str(exc)) from None
        except PermissionDeniedError as exc:
            reasons = tuple(f"{r.name}: {r.reason}" for r in exc.failed_rules)
            # the failed rules by name: their explanations are said once, in the error the
            # command ends with (trainer.cli.denial_lines)
            log.warning("attestation denied by broker %s", exc.broker, extra=fields(
                broker=exc.broker, job_id=config.job_id, node_id=self._node_id,
                decision="denied", rules=[r.name for r in exc.failed_rules]))
            raise AttestationDenied(f"release denied by {exc}", reasons) from None
        except UnavailableError as exc:  # UNAVAILABLE or DEADLINE_EXCEEDED: an outage
            raise BrokersUnreachable(f"a broker could not be reached ({exc.code}): {exc}") \
                from None
        except BrokerRpcError as exc:
            raise KeySourceUnavailable(f"key release failed ({exc.code}): {exc}") from None
        for lease in released.leases:
            log.info("attested to broker %s and received its share (lease %s)", lease.broker,
                     lease.lease_id, extra=fields(
                         broker=lease.broker, job_id=config.job_id, node_id=self._node_id,
                         decision="released", lease_id=lease.lease_id,
                         lease_expires_unix_ms=lease.expires_unix_ms))
        log.info("dataset key %s/%s v%d (manifest %s) derived from %d share(s)",
                 config.tenant_id, config.dataset.id, released.key_version,
                 self._job.dataset.manifest, len(released.leases),
                 extra=fields(job_id=config.job_id, brokers=[x.broker for x in released.leases]))
        phases = [("code identity", checked - started), *released.timings]
        total_ms = (time.perf_counter() - started) * 1e3
        # where the start-up time went (benchmarks/bench_first_step.py reads this line)
        log.info("dataset key from %d broker(s) in %.0f ms: %s", len(endpoints), total_ms,
                 ", ".join(f"{name} {seconds * 1e3:.0f} ms" for name, seconds in phases))
        expiry = min(lease.expires_unix_ms for lease in released.leases) / 1000.0
        handle = KeyHandle(dek=released.dek, lease_expiry=expiry, config=self._job)

        def on_revoked(notice: Any) -> None:
            self._revoke(handle, f"broker {notice.broker} revoked the lease: {notice.reason}")

        def on_error(exc: BrokerRpcError) -> None:
            log.warning("revocation stream from %s lost (%s); resubscribing when it is back, "
                        "lease renewal still applies", exc.broker, exc.code)

        client.watch_revocations(on_revoked, on_error)
        self._renewer = threading.Thread(target=self._renew_loop, args=(handle, expiry),
                                         name="trainer-renew", daemon=True)
        self._renewer.start()
        return handle

    def _check_dataset(self, ref: Any) -> None:
        """Between the challenges and the evidence (kms_broker.client): take the dataset's key
        version and manifest as the brokers have them on record and check the manifest is in
        the store, before any key is released."""
        job = resolved(self._config, key_version=ref.key_version, manifest=ref.manifest_name
                       or None)
        if job.dataset != self._config.dataset:
            log.info("dataset %s/%s: key version %d, manifest %s (as the brokers have it on "
                     "record)", job.tenant_id, job.dataset.id, job.dataset.key_version,
                     job.dataset.manifest or "unknown")
        require_manifest(job)
        self._job = job

    def _renew_loop(self, handle: KeyHandle, expiry: float) -> None:
        from kms_broker.rpc import NotFoundError, PermissionDeniedError, UnavailableError

        span = max(1.0, expiry - time.time())
        poll = self._config.lease_poll_interval
        while not self._stop.wait(poll):
            if handle.revoked.is_set():
                return
            if time.time() < handle.lease_expiry - span / 2:  # type: ignore[operator]
                continue
            try:
                new_expiry = self._client.renew() / 1000.0
            except (PermissionDeniedError, NotFoundError) as exc:
                self._revoke(handle, f"lease renewal refused: {exc}")
                return
            except CodeIdentityRefused as exc:  # unmeasured code mapped since the last check
                self._revoke(handle, f"code identity refused: {exc}")
                return
            except UnavailableError as exc:
                handle.renewal_problem = f"{exc.code}: {exc}"
                if self._holder is not None:
                    self._holder.lease(handle.lease_expiry or 0.0, handle.renewal_problem)
                log.warning("lease renewal failed (%s); retrying until the lease expires", exc,
                            extra=fields(broker=exc.broker, status=exc.code))
                continue
            if handle.renewal_problem:
                log.info("lease renewed again after a broker outage")
            handle.renewal_problem = ""
            span = max(1.0, new_expiry - time.time())
            handle.lease_expiry = new_expiry
            if self._holder is not None:
                self._holder.lease(new_expiry)

    def close(self) -> None:
        self._stop.set()
        if self._holder is not None:
            with contextlib.suppress(Exception):
                self._holder.close()  # goodbye: the peers keep their lease expiry
        if self._peer_watch is not None:
            self._peer_watch.close()
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.close()
