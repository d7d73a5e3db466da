"""Tenant-side library: talk to brokers as a tenant, sign grants, upload datasets n-of-n.

:func:`upload_dataset` gives each broker exactly one fresh random share, sealed on this
machine to that broker's HSM import key (:func:`kms_broker.sealing.seal_share_to`), derives
the DEK from all of them, encrypts the dataset into the store (:func:`sealed.write_dataset`)
while the shares are committed, and registers it at every broker. On any failure it rolls
back: the dataset is deleted at every broker that had begun, and any objects it wrote are
removed from the store.
"""

from __future__ import annotations

import contextlib
import os
import stat
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from kms_broker import sealing
from kms_broker._proto.kmsbroker.v1 import broker_pb2 as pb
from kms_broker._proto.kmsbroker.v1 import broker_pb2_grpc as pb_grpc
from kms_broker.grants import GrantDocument, sign_grant
from kms_broker.replicas import FAILOVER_S, REPLICA_CONNECT_S, SEPARATOR, on_any_replica
from kms_broker.rpc import (
    BrokerEndpoint,
    BrokerRpcError,
    ReadyOnce,
    error_from_rpc,
    open_channel,
)
from sealed import DatasetReader, ObjectStore, derive_dek, write_dataset
from sealed.secrets import SecretBuffer

__all__ = [
    "TenantClient",
    "UploadResult",
    "create_tenant_key",
    "load_tenant_key",
    "upload_dataset",
]


def create_tenant_key(path: Path) -> bytes:
    """Write a new Ed25519 key (PKCS#8 PEM, mode 0600, refuses to overwrite); returns the raw
    public key."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    return key.public_key().public_bytes(serialization.Encoding.Raw,
                                         serialization.PublicFormat.Raw)


def load_tenant_key(path: Path) -> Ed25519PrivateKey:
    st = os.stat(path)
    if st.st_mode & 0o077 or not stat.S_ISREG(st.st_mode):
        raise ValueError(f"tenant key file {path} must be a regular file with mode 0600")
    key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} does not hold an Ed25519 private key")
    return key


class TenantClient:
    """One broker, as one tenant (the client certificate must name ``tenant:<id>``).

    ``endpoint`` may be a replica set (a sequence of endpoints): each call goes to the
    replica that answered last, and on UNAVAILABLE to the next one (:mod:`kms_broker.replicas`);
    ``address`` is then the set's label (its addresses joined by ``|``)."""

    def __init__(self, endpoint: BrokerEndpoint | Sequence[BrokerEndpoint], *, tenant_id: str,
                 signing_key: Ed25519PrivateKey | None = None, timeout_s: float = 30.0,
                 failover_s: float = FAILOVER_S) -> None:
        replicas = [endpoint] if isinstance(endpoint, BrokerEndpoint) else list(endpoint)
        if not replicas:
            raise ValueError("a replica set needs at least one address")
        self.endpoint = replicas[0]
        self.tenant_id = tenant_id
        self._key = signing_key
        self._timeout = timeout_s
        self._failover_s = failover_s
        # a replica of a set that does not connect is left for the next one sooner
        connect_s = timeout_s if len(replicas) == 1 else min(timeout_s, REPLICA_CONNECT_S)
        self._replicas = []
        for e in replicas:
            channel = open_channel(e)
            self._replicas.append((e, channel, ReadyOnce(channel, e.address, connect_s),
                                   pb_grpc.TenantServiceStub(channel)))
        self._current = 0

    @property
    def address(self) -> str:
        return SEPARATOR.join(e.address for e, *_ in self._replicas)

    def close(self) -> None:
        for _, channel, _, _ in self._replicas:
            channel.close()

    def __enter__(self) -> TenantClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, **fields: Any) -> Any:
        request = getattr(pb, f"{method}Request")(tenant_id=self.tenant_id, **fields)
        start = self._current
        order = [(start + i) % len(self._replicas) for i in range(len(self._replicas))]

        def on(index: int) -> Any:
            endpoint, _, ready, stub = self._replicas[index]
            ready()  # the first call waits (up to the deadline) for the connection
            try:
                reply = getattr(stub, method)(request, timeout=self._timeout)
            except grpc.RpcError as exc:
                raise error_from_rpc(exc, endpoint.address) from None
            self._current = index
            return reply

        return on_any_replica(order, on, failover_s=self._failover_s)

    def public_key(self) -> bytes:
        if self._key is None:
            raise ValueError("this client has no tenant signing key")
        return self._key.public_key().public_bytes(serialization.Encoding.Raw,
                                                   serialization.PublicFormat.Raw)

    def register(self) -> int:
        return self._call("RegisterTenant", signing_public_key=self.public_key()).kek_version

    def open_upload(self, dataset_id: str, key_version: int, share_index: int,
                    share_count: int) -> Any:
        return self._call("OpenUpload", dataset_id=dataset_id, key_version=key_version,
                          share_index=share_index, share_count=share_count)

    def commit_share(self, upload_id: str, sealed_share: bytes) -> None:
        self._call("CommitShare", upload_id=upload_id, sealed_share=sealed_share)

    def register_dataset(self, dataset_id: str, key_version: int, manifest_name: str,
                         store_uri: str, holders: Sequence[str]) -> None:
        self._call("RegisterDataset", dataset_id=dataset_id, key_version=key_version,
                   manifest_name=manifest_name, store_uri=store_uri, holders=list(holders))

    def list_datasets(self) -> list[Any]:
        return list(self._call("ListDatasets").datasets)

    def delete_dataset(self, dataset_id: str) -> None:
        self._call("DeleteDataset", dataset_id=dataset_id)

    def put_policy(self, policy_yaml: str) -> str:
        """Store a policy; returns its digest, computed here: the tenant signs grants over
        this digest, so it must not take the broker's word for it."""
        from attest.policy import Policy  # the tenant side only; the broker never imports this

        digest = Policy.from_yaml(policy_yaml).digest
        reported = self._call("PutPolicy", policy_yaml=policy_yaml).digest
        if reported != digest:
            raise BrokerRpcError(
                f"broker {self.address} reported policy digest {reported[:16]}..., "
                f"the policy's own digest is {digest[:16]}...: not signing grants for it",
                code="DATA_LOSS")
        return digest

    def create_grant(self, grant: GrantDocument) -> str:
        if self._key is None:
            raise ValueError("signing a grant needs the tenant key")
        document, signature = sign_grant(grant, self._key)
        return self.submit_grant(document, signature)

    def submit_grant(self, document: bytes, signature: bytes) -> str:
        return self._call("CreateGrant", grant=document, signature=signature).grant_id

    def revoke_grant(self, grant_id: str) -> int:
        return self._call("RevokeGrant", grant_id=grant_id).leases_revoked

    def rotate_kek(self) -> tuple[int, int]:
        r = self._call("RotateKek")
        return r.kek_version, r.shares_rewrapped

    def shred(self) -> int:
        return self._call("ShredTenant").keys_destroyed

    def tail_audit(self, limit: int = 50) -> list[Any]:
        return list(self._call("TailAudit", limit=limit).records)

    def verify_audit(self) -> Any:
        return self._call("VerifyAudit")


@dataclass(frozen=True, slots=True)
class UploadResult:
    manifest_name: str
    num_shards: int
    num_records: int
    plaintext_bytes: int
    holders: tuple[str, ...]


def upload_dataset(
    brokers: Sequence[TenantClient],
    source: Path | Sequence[Any],
    store: ObjectStore,
    *,
    dataset_id: str,
    key_version: int = 1,
    store_uri: str = "",
    progress: Callable[[int, int], None] | None = None,
    make_share: Callable[[], SecretBuffer] = lambda: SecretBuffer.random(32),
) -> UploadResult:
    """``make_share`` exists for tests that must know the shares (a memory scan).

    The shares are made here, so the DEK is known before any broker answers: the dataset is
    encrypted while a thread opens the upload and commits each sealed share at each broker
    (TLS handshakes, HSM work), and it is registered only once both are done. A broker that
    refuses stops the encryption at the next record, and everything is rolled back.
    """
    if not brokers:
        raise ValueError("need at least one broker")
    tenant_id = brokers[0].tenant_id
    holders = tuple(b.address for b in brokers)
    shares: list[SecretBuffer] = []
    started: list[TenantClient] = []
    failed: list[BaseException] = []
    committer: threading.Thread | None = None
    ref = None
    dek: SecretBuffer | None = None

    def commit_shares() -> None:
        try:
            for index, broker in enumerate(brokers):
                opened = broker.open_upload(dataset_id, key_version, index, len(brokers))
                started.append(broker)
                transcript = sealing.import_transcript(
                    import_id=opened.upload_id, tenant_id=tenant_id, dataset_id=dataset_id,
                    key_version=key_version, share_index=index, broker_id=opened.broker_id,
                    import_public_key=opened.import_public_key,
                )
                if transcript != opened.transcript:
                    raise BrokerRpcError("broker's upload transcript differs from ours",
                                         code="FAILED_PRECONDITION", broker=broker.address)
                broker.commit_share(opened.upload_id, sealing.seal_share_to(
                    opened.import_public_key, shares[index], transcript))
        except BaseException as exc:  # raised in the caller's thread
            failed.append(exc)

    def progress_unless_refused(done: int, total: int) -> None:
        if failed:
            raise _SharesRefused
        if progress is not None:
            progress(done, total)

    try:
        shares.extend(make_share() for _ in brokers)
        dek = derive_dek(shares, tenant_id=tenant_id, dataset_id=dataset_id,
                         key_version=key_version)
        committer = threading.Thread(target=commit_shares, name="upload-shares", daemon=True)
        committer.start()
        try:
            ref = write_dataset(store, source, dek=dek, tenant_id=tenant_id,
                                dataset_id=dataset_id, key_version=key_version,
                                share_holders=holders, progress=progress_unless_refused)
        except _SharesRefused:
            pass  # the writer removed what it wrote; the broker's error is raised below
        finally:
            committer.join()  # each RPC has its deadline
        if failed:
            raise failed[0]
        for share in shares:
            share.zeroize()
        assert ref is not None
        for broker in brokers:
            broker.register_dataset(dataset_id, key_version, ref.manifest_name, store_uri,
                                    holders)
        return UploadResult(ref.manifest_name, ref.num_shards, ref.num_records,
                            ref.plaintext_bytes, holders)
    except BaseException:
        if committer is not None:
            committer.join(timeout=120.0)  # interrupted above: let it finish its RPC first
        # Roll back only what this upload created: deleting the dataset drops every key
        # version's shares, so a failed upload of version n > 1 must not touch the dataset
        # (its half-committed shares are unusable: no manifest is ever registered for them).
        if key_version == 1:
            for broker in list(started):
                with contextlib.suppress(BrokerRpcError):
                    broker.delete_dataset(dataset_id)
        if ref is not None and dek is not None:
            _delete_objects(store, ref.manifest_name, dek, tenant_id, dataset_id, key_version)
        raise
    finally:
        for share in shares:
            share.zeroize()
        if dek is not None:
            dek.zeroize()


class _SharesRefused(Exception):
    """Stops the writer when a broker refused the upload (its error is the one raised)."""


def _delete_objects(store: ObjectStore, manifest_name: str, dek: SecretBuffer, tenant_id: str,
                    dataset_id: str, key_version: int) -> None:
    with contextlib.suppress(Exception):
        reader = DatasetReader.open(store, manifest_name, dek=dek, tenant_id=tenant_id,
                                    dataset_id=dataset_id, key_version=key_version)
        for shard in reader.manifest.shards:
            with contextlib.suppress(Exception):
                store.delete(shard.object_name)
    with contextlib.suppress(Exception):
        store.delete(manifest_name)
