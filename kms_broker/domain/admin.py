"""Tenant- and operator-facing actions: tenants, uploads, datasets, policies, grants, keys,
node revocation and reinstatement (enrolment is :mod:`kms_broker.domain.enrolment`).

Each action validates everything first, so bad input changes nothing; then it is audited
before it acts with outcome "allowed" (fail closed: no record, no action), as a release is.
An action that fails after its record (the HSM refuses, the store is down) gets a second
record with outcome "error" naming the failure (:meth:`Admin._acting`); input found bad
after the action was identified (a sealed share of the wrong length) gets an "error" record
only. No record ever says "ok" for an action that failed. Every refusal (policy, a shredded
tenant, an expired upload) is audited as "denied".
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from kms_broker.domain.deps import BrokerDeps, check_id, check_size, hsm_errors
from kms_broker.domain.errors import (
    AlreadyExists,
    BrokerError,
    IntegrityFailure,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from kms_broker.domain.model import Dataset, DatasetShare, Grant, Node, Tenant, Upload
from kms_broker.grants import MAX_GRANT_SIZE, SIGNATURE_SIZE, InvalidGrantSignature, verify_grant
from kms_broker.hsm.interface import ShareBinding
from kms_broker.sealing import import_transcript, parse_sealed_blob
from sealed.keys import MAX_SHARES

__all__ = ["Admin", "OpenedUpload"]

MAX_KEY_VERSION = 2**32 - 1
MAX_TEXT = 1024


@dataclass(frozen=True, slots=True)
class OpenedUpload:
    upload_id: str
    import_public_key: bytes
    transcript: bytes
    expires_ms: int


class Admin:
    def __init__(self, deps: BrokerDeps, *, trusted_tenant_keys: Mapping[str, bytes] = {}) -> None:
        self.d = deps
        self._trusted = dict(trusted_tenant_keys)

    # ------------------------------------------------------------ helpers
    def _tenant(self, tenant_id: str, event: str) -> Tenant:
        check_id("tenant", tenant_id)
        tenant = self.d.repo.get_tenant(tenant_id)
        if tenant is None:
            raise NotFound(f"tenant {tenant_id} is not registered")
        if tenant.status != "active":
            raise self.d.deny(event, actor=f"tenant:{tenant_id}", subject=f"tenant:{tenant_id}",
                              reason=f"tenant.shredded: tenant {tenant_id} has been shredded")
        return tenant

    def _share_binding(self, share: DatasetShare) -> ShareBinding:
        """Where a stored share belongs (its wrapping is bound to this inside the HSM)."""
        dataset = self.d.repo.get_dataset(share.tenant_id, share.dataset_id)
        if dataset is None:
            raise IntegrityFailure(
                f"share of {share.tenant_id}/{share.dataset_id} has no dataset row"
            )
        return ShareBinding(tenant_id=share.tenant_id, dataset_id=share.dataset_id,
                            key_version=share.key_version, share_index=dataset.share_index)

    def _audit(self, event: str, actor: str, subject: str, reason: str = "") -> None:
        self.d.audit.append(event, actor=actor, subject=subject, outcome="allowed", reason=reason)

    @contextlib.contextmanager
    def _acting(self, event: str, actor: str, subject: str, reason: str = "", *,
                atomic: bool = True) -> Iterator[None]:
        """Audit the action (fail closed), run it, and if it fails, audit the failure. The
        record is written first (write-before-act). ``atomic``: the record and the action's
        state changes are one unit of work (PostgreSQL: one transaction, so a failed action
        leaves no "allowed" record and a failed append no change)."""
        audited = False
        try:
            with self.d.unit_of_work() if atomic else contextlib.nullcontext():
                self._audit(event, actor, subject, reason)
                audited = True
                yield
        except BaseException as exc:
            if audited:  # after the rollback, if any: a record of its own
                self._audit_error(event, actor, subject,
                                  f"failed: {type(exc).__name__}: {exc}")
            raise

    def _audit_error(self, event: str, actor: str, subject: str, reason: str) -> None:
        with contextlib.suppress(BrokerError):
            self.d.audit.append(event, actor=actor, subject=subject, outcome="error",
                                reason=reason)

    # ------------------------------------------------------------ tenants
    def register_tenant(self, tenant_id: str, signing_public_key: bytes) -> int:
        check_id("tenant", tenant_id)
        if len(signing_public_key) != 32:
            raise InvalidArgument("signing_public_key must be a raw 32-byte Ed25519 key")
        actor = f"tenant:{tenant_id}"
        trusted = self._trusted.get(tenant_id)
        if self._trusted and trusted != signing_public_key:
            raise self.d.deny("register_tenant", actor=actor, subject=f"tenant:{tenant_id}",
                              reason="tenant.untrusted: key not in the broker's trusted list")
        existing = self.d.repo.get_tenant(tenant_id)
        if existing is not None:
            if existing.signing_public_key == signing_public_key and existing.status == "active":
                return existing.kek_version  # idempotent re-registration
            raise AlreadyExists(f"tenant {tenant_id} is already registered with another key")
        with self._acting("register_tenant", actor, f"tenant:{tenant_id}"):
            with hsm_errors("creating the tenant KEK"):
                if not self.d.hsm.has_tenant_kek(tenant_id, 1):
                    self.d.hsm.create_tenant_kek(tenant_id, 1)
            self.d.repo.add_tenant(Tenant(
                tenant_id=tenant_id, signing_public_key=signing_public_key, kek_version=1,
                created_ms=self.d.clock.now_ms(),
                binding_sig=self.d.sign_tenant(tenant_id, signing_public_key)))
        return 1

    # ------------------------------------------------------------ uploads
    def open_upload(
        self, *, tenant_id: str, dataset_id: str, key_version: int, share_index: int,
        share_count: int,
    ) -> OpenedUpload:
        self._tenant(tenant_id, "open_upload")
        check_id("dataset", dataset_id)
        if not 1 <= key_version <= MAX_KEY_VERSION:
            raise InvalidArgument("key_version must be from 1 to 2**32-1")
        if not 1 <= share_count <= MAX_SHARES or not 0 <= share_index < share_count:
            raise InvalidArgument(f"need 1 <= share_count <= {MAX_SHARES} and "
                                  f"0 <= share_index < share_count")
        dataset = self.d.repo.get_dataset(tenant_id, dataset_id)
        if dataset is not None and (dataset.share_index, dataset.share_count) != (
            share_index, share_count
        ):
            raise InvalidArgument("dataset exists with another share index or count")
        if self.d.repo.get_share(tenant_id, dataset_id, key_version) is not None:
            raise AlreadyExists(f"{tenant_id}/{dataset_id} already has key version {key_version}")
        now = self.d.clock.now_ms()
        limit = self.d.settings.max_pending_uploads_per_tenant
        if self.d.repo.pending_uploads(tenant_id, now, limit) >= limit:
            error = ResourceExhausted(f"tenant {tenant_id} has {limit} uploads open; commit "
                                      f"them or wait for them to expire")
            self.d.refused("open_upload", actor=f"tenant:{tenant_id}",
                           subject=f"dataset:{tenant_id}/{dataset_id}", error=error)
            raise error
        upload_id = self.d.random.token_id()
        expires = now + self.d.settings.upload_ttl_ms
        # not atomic: the upload row must commit before the HSM makes its import key
        with self._acting("open_upload", f"tenant:{tenant_id}",
                          f"dataset:{tenant_id}/{dataset_id}",
                          f"upload {upload_id}, key version {key_version}", atomic=False):
            # the row first: the janitor finds every import key through its upload row, so
            # a key pair the HSM made is never left on the token with nothing naming it
            if dataset is None:
                self.d.repo.put_dataset(Dataset(
                    tenant_id=tenant_id, dataset_id=dataset_id, share_index=share_index,
                    share_count=share_count, created_ms=now,
                ))
            self.d.repo.add_upload(Upload(
                upload_id=upload_id, tenant_id=tenant_id, dataset_id=dataset_id,
                key_version=key_version, share_index=share_index, share_count=share_count,
                expires_ms=expires, import_public_key=b"",
            ))
            with hsm_errors("creating an import key"):
                public_key = self.d.hsm.create_import_key(upload_id)
            self.d.repo.set_upload_public_key(upload_id, public_key)
        transcript = import_transcript(
            import_id=upload_id, tenant_id=tenant_id, dataset_id=dataset_id,
            key_version=key_version, share_index=share_index,
            broker_id=self.d.settings.broker_id, import_public_key=public_key,
        )
        return OpenedUpload(upload_id, public_key, transcript, expires)

    def commit_share(self, *, tenant_id: str, upload_id: str, sealed_share: bytes) -> None:
        tenant = self._tenant(tenant_id, "commit_share")
        actor = f"tenant:{tenant_id}"
        check_id("upload", upload_id)
        check_size("sealed_share", sealed_share, self.d.settings.max_sealed_share_bytes)
        upload = self.d.repo.get_upload(upload_id)
        if upload is None or upload.tenant_id != tenant_id or not upload.import_public_key:
            raise NotFound("unknown upload id for this tenant")
        subject = f"dataset:{tenant_id}/{upload.dataset_id}@v{upload.key_version}"
        if upload.committed:
            raise AlreadyExists("this upload was already committed")
        if self.d.clock.now_ms() >= upload.expires_ms:
            raise self.d.deny("commit_share", actor=actor, subject=subject,
                              reason="upload.expired: the upload session has expired")
        try:
            parse_sealed_blob(sealed_share)  # the wire format, before anything is recorded
        except ValueError as exc:
            self._audit_error("commit_share", actor, subject, f"upload {upload_id}: {exc}")
            raise InvalidArgument(f"sealed_share: {exc}") from None
        transcript = import_transcript(
            import_id=upload_id, tenant_id=tenant_id, dataset_id=upload.dataset_id,
            key_version=upload.key_version, share_index=upload.share_index,
            broker_id=self.d.settings.broker_id, import_public_key=upload.import_public_key,
        )
        with self._acting("commit_share", actor, subject, f"upload {upload_id}"):
            try:
                with hsm_errors("importing the share"):
                    wrapped = self.d.hsm.import_share(
                        upload_id, sealed_share, transcript,
                        ShareBinding(tenant_id=tenant_id, dataset_id=upload.dataset_id,
                                     key_version=upload.key_version,
                                     share_index=upload.share_index),
                        tenant.kek_version,
                    )
            except IntegrityFailure:
                raise InvalidArgument(
                    "sealed share did not open under this upload's import key and transcript"
                ) from None
            except (ValueError, TypeError) as exc:  # malformed whatever the key
                raise InvalidArgument(f"sealed_share: {exc}") from None
            if not self.d.repo.mark_upload_committed(upload_id):
                raise AlreadyExists("this upload was already committed")
            self.d.repo.put_share(DatasetShare(
                tenant_id=tenant_id, dataset_id=upload.dataset_id,
                key_version=upload.key_version, kek_version=tenant.kek_version,
                wrapped_share=wrapped,
            ))
        with contextlib.suppress(BrokerError), hsm_errors("destroying the import key"):
            self.d.hsm.destroy_import_key(upload_id)

    def register_dataset(
        self, *, tenant_id: str, dataset_id: str, key_version: int, manifest_name: str,
        store_uri: str, holders: tuple[str, ...],
    ) -> None:
        self._tenant(tenant_id, "register_dataset")
        check_id("dataset", dataset_id)
        for what, text in (("manifest_name", manifest_name), ("store_uri", store_uri),
                           *(("holder", h) for h in holders)):
            check_size(what, text, MAX_TEXT)
        dataset = self.d.repo.get_dataset(tenant_id, dataset_id)
        if dataset is None or self.d.repo.get_share(tenant_id, dataset_id, key_version) is None:
            raise NotFound(f"{tenant_id}/{dataset_id} has no committed share for key version "
                           f"{key_version}")
        if holders and len(holders) != dataset.share_count:
            raise InvalidArgument(f"holders lists {len(holders)} brokers, the dataset has "
                                  f"{dataset.share_count} shares")
        with self._acting("register_dataset", f"tenant:{tenant_id}",
                          f"dataset:{tenant_id}/{dataset_id}", f"key version {key_version}"):
            self.d.repo.put_dataset(Dataset(
                tenant_id=tenant_id, dataset_id=dataset_id, share_index=dataset.share_index,
                share_count=dataset.share_count, manifest_name=manifest_name,
                manifest_key_version=key_version, store_uri=store_uri, holders=tuple(holders),
                status="active",
                created_ms=dataset.created_ms,
            ))

    def list_datasets(self, tenant_id: str) -> list[tuple[Dataset, list[DatasetShare]]]:
        check_id("tenant", tenant_id)
        if self.d.repo.get_tenant(tenant_id) is None:
            raise NotFound(f"tenant {tenant_id} is not registered")
        return [(ds, self.d.repo.list_shares(tenant_id, ds.dataset_id))
                for ds in self.d.repo.list_datasets(tenant_id)]

    def delete_dataset(self, *, tenant_id: str, dataset_id: str) -> int:
        self._tenant(tenant_id, "delete_dataset")
        check_id("dataset", dataset_id)
        if self.d.repo.get_dataset(tenant_id, dataset_id) is None:
            raise NotFound(f"dataset {tenant_id}/{dataset_id} does not exist")
        with self._acting("delete_dataset", f"tenant:{tenant_id}",
                          f"dataset:{tenant_id}/{dataset_id}"):
            leases = self.d.repo.revoke_leases(now_ms=self.d.clock.now_ms(),
                                               tenant_id=tenant_id, dataset_id=dataset_id)
            self.d.repo.delete_dataset(tenant_id, dataset_id)
        self.d.revocations.publish(leases, "dataset deleted")
        return len(leases)

    # ------------------------------------------------------ policies, grants
    def put_policy(self, *, tenant_id: str, text: str) -> str:
        self._tenant(tenant_id, "put_policy")
        check_size("policy", text.encode(), self.d.settings.max_policy_bytes)
        try:
            policy = self.d.load_policy(text)
        except (ValueError, TypeError) as exc:
            raise InvalidArgument(f"policy rejected: {exc}") from None
        with self._acting("put_policy", f"tenant:{tenant_id}", f"policy:{policy.digest}"):
            self.d.repo.put_policy(tenant_id, policy.digest, text)
        return policy.digest

    def create_grant(self, *, tenant_id: str, document: bytes, signature: bytes) -> str:
        tenant = self._tenant(tenant_id, "create_grant")
        actor = f"tenant:{tenant_id}"
        check_size("grant", document, MAX_GRANT_SIZE)
        if len(signature) != SIGNATURE_SIZE:
            raise InvalidArgument(f"grant signature must be {SIGNATURE_SIZE} bytes")
        self.d.require_bound(tenant, event="create_grant", actor=actor,
                             subject=f"tenant:{tenant_id}")
        try:
            doc = verify_grant(document, signature, tenant.signing_public_key)
        except InvalidGrantSignature:
            raise self.d.deny("create_grant", actor=actor, subject=f"tenant:{tenant_id}",
                              reason="grant.signature: grant is not signed by this tenant's key"
                              ) from None
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        if doc.tenant_id != tenant_id:
            raise self.d.deny("create_grant", actor=actor, subject=f"grant:{doc.grant_id}",
                              reason=f"grant.tenant: grant names tenant {doc.tenant_id}")
        if self.d.repo.get_dataset(tenant_id, doc.dataset_id) is None:
            raise NotFound(f"dataset {tenant_id}/{doc.dataset_id} does not exist")
        if self.d.repo.get_policy(tenant_id, doc.policy_digest) is None:
            raise NotFound(f"policy {doc.policy_digest[:12]} is not stored; put it first")
        if doc.expires_unix_ms <= self.d.clock.now_ms():
            raise InvalidArgument("grant has already expired")
        if self.d.repo.get_grant(tenant_id, doc.grant_id) is not None:  # ids are per tenant
            raise AlreadyExists(f"grant {doc.grant_id} exists")
        with self._acting("create_grant", actor, f"grant:{doc.grant_id}",
                          f"dataset {doc.dataset_id}, job {doc.job_id}, "
                          f"max {doc.max_nodes} nodes"):
            self.d.repo.add_grant(Grant(
                grant_id=doc.grant_id, tenant_id=tenant_id, dataset_id=doc.dataset_id,
                job_id=doc.job_id, policy_digest=doc.policy_digest, max_nodes=doc.max_nodes,
                expires_ms=doc.expires_unix_ms,
            ), document, signature)
        return doc.grant_id

    def revoke_grant(self, *, tenant_id: str, grant_id: str) -> int:
        check_id("tenant", tenant_id)
        check_id("grant", grant_id)
        grant = self.d.repo.get_grant(tenant_id, grant_id)
        if grant is None:
            raise NotFound(f"grant {grant_id} does not exist for tenant {tenant_id}")
        with self._acting("revoke_grant", f"tenant:{tenant_id}", f"grant:{grant_id}"):
            self.d.repo.revoke_grant(tenant_id, grant_id)
            leases = self.d.repo.revoke_leases(now_ms=self.d.clock.now_ms(), grant_id=grant_id,
                                               tenant_id=tenant_id)
        self.d.revocations.publish(leases, f"grant {grant_id} revoked")
        return len(leases)

    # ------------------------------------------------------------ keys
    def rotate_kek(self, tenant_id: str) -> tuple[int, int]:
        tenant = self._tenant(tenant_id, "rotate_kek")
        new = tenant.kek_version + 1
        with self._acting("rotate_kek", f"tenant:{tenant_id}", f"tenant:{tenant_id}",
                          f"to v{new}"):
            return self._rotate(tenant_id, new)

    def _rotate(self, tenant_id: str, new: int) -> tuple[int, int]:
        with hsm_errors("KEK rotation"):
            if not self.d.hsm.has_tenant_kek(tenant_id, new):
                self.d.hsm.create_tenant_kek(tenant_id, new)
            rewrapped = []
            for share in self.d.repo.list_shares(tenant_id):
                if share.kek_version == new:
                    continue
                blob = self.d.hsm.rewrap_share(share.wrapped_share,
                                               self._share_binding(share),
                                               share.kek_version, new)
                rewrapped.append(DatasetShare(
                    tenant_id=tenant_id, dataset_id=share.dataset_id,
                    key_version=share.key_version, kek_version=new, wrapped_share=blob,
                ))
        for share in rewrapped:  # only after every rewrap succeeded
            self.d.repo.replace_share(share)
        self.d.repo.set_tenant_kek_version(tenant_id, new)
        return new, len(rewrapped)

    def shred_tenant(self, tenant_id: str) -> int:
        self._tenant(tenant_id, "shred_tenant")
        with self._acting("shred_tenant", f"tenant:{tenant_id}", f"tenant:{tenant_id}"):
            self.d.repo.set_tenant_status(tenant_id, "shredded")
            leases = self.d.repo.revoke_leases(now_ms=self.d.clock.now_ms(),
                                               tenant_id=tenant_id)
        # the HSM's destruction cannot be rolled back: only after the record and the
        # status committed (a tenant marked shredded gets no release even if this fails)
        try:
            with hsm_errors("shredding"):
                destroyed = self.d.hsm.destroy_tenant_keks(tenant_id)
        except BaseException as exc:
            self._audit_error("shred_tenant", f"tenant:{tenant_id}", f"tenant:{tenant_id}",
                              f"failed: {type(exc).__name__}: {exc}")
            self.d.revocations.publish(leases, f"tenant {tenant_id} shredded")
            raise
        self.d.revocations.publish(leases, f"tenant {tenant_id} shredded")
        return destroyed

    # ------------------------------------------------------------ nodes
    def revoke_node(self, *, actor: str, node_id: str) -> int:
        check_id("node", node_id)
        if self.d.repo.get_node(node_id) is None:
            raise NotFound(f"node {node_id} is not enrolled")
        with self._acting("revoke_node", actor, f"node:{node_id}"):
            self.d.repo.revoke_node(node_id)
            leases = self.d.repo.revoke_leases(now_ms=self.d.clock.now_ms(), node_id=node_id)
        self.d.revocations.publish(leases, f"node {node_id} revoked")
        return len(leases)

    def list_nodes(self) -> list[Node]:
        """Every enrolled node with its revoked state (operator; read-only, not audited)."""
        return self.d.repo.list_nodes()

    def reinstate_node(self, *, actor: str, node_id: str) -> None:
        """Allow a revoked node to be enrolled again. Revocation is sticky: without this,
        audited, step every enrolment of a revoked node id is refused. The node stays
        refused until it is enrolled again (with fresh TPM evidence)."""
        check_id("node", node_id)
        node = self.d.repo.get_node(node_id)
        if node is None:
            raise NotFound(f"node {node_id} is not enrolled")
        if not node.revoked or node.reinstated:
            raise InvalidArgument(f"node {node_id} is not revoked; nothing to reinstate")
        with self._acting("reinstate_node", actor, f"node:{node_id}",
                          "re-enrolment allowed"):
            self.d.repo.reinstate_node(node_id)
