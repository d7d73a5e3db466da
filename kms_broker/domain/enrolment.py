"""Operator-driven node enrolment: a node's AK is enrolled only once its TPM proves, by
TPM2_ActivateCredential, that it holds the EK a configured manufacturer CA certified and that
the AK lives on that same TPM (DESIGN.md section 6, :mod:`attest.tpm2.enrolment`).

1. :meth:`NodeEnrolment.begin` validates the request, checks the EK certificate chain, that it
   certifies the EK presented and the AK's attributes, and answers a credential for the AK's
   Name encrypted to the EK. The expected answer stays in this process's memory only (never in
   the database or on disk), under a random enrolment id, for ``enrolment_ttl_ms``.
2. :meth:`NodeEnrolment.complete` takes the pending enrolment out (single use: a wrong answer
   consumes it too, so the secret cannot be guessed by retrying), compares the answer in
   constant time and stores the node with its AK (TPMT_PUBLIC) and EK certificate.

Revocation is sticky: a revoked node id is refused at both steps (``node.revoked``) until an
operator reinstates it (:meth:`kms_broker.domain.admin.Admin.reinstate_node`, audited); the
store re-checks this in the same statement that writes the node, so a revocation that lands
between the steps still wins.

Every enrolment and every refusal is in the audit log; the enrolment itself is audited before
the node is stored, so an audit failure enrols nothing (fail closed). Refusals are
``PermissionDenied`` whose rules are the verifier's failures (ids ``tpm2.*``) or
``enrolment.unknown`` for an unknown, expired or already used enrolment id.

There is no other way to enrol a node in the production broker. The direct enrolment of a
node without a TPM (for the trusting ``test-json`` verifier) lives only in the test composition
of the server (``tests/kms_broker/testing_server.py``), which ``kms-broker serve`` never loads.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime

from attest.interface import Failure
from attest.tpm2.enrolment import (
    EkTrustStore,
    EnrolmentRefused,
    PendingEnrolment,
    begin_enrolment,
    complete_enrolment,
)
from kms_broker.domain.deps import BrokerDeps, check_id, check_size
from kms_broker.domain.errors import PermissionDenied, ResourceExhausted, RuleOutcome
from kms_broker.domain.model import Node

__all__ = [
    "MAX_PENDING",
    "BegunEnrolment",
    "CompletedEnrolment",
    "NodeEnrolment",
]

MAX_PENDING = 1024
MAX_CERT_BYTES = 4096
MAX_PUBLIC_BYTES = 1024
MAX_ANSWER_BYTES = 64


@dataclass(frozen=True, slots=True)
class BegunEnrolment:
    enrolment_id: str
    credential_blob: bytes
    encrypted_secret: bytes
    expires_ms: int


@dataclass(frozen=True, slots=True)
class CompletedEnrolment:
    node_id: str
    ak_name: bytes
    ek_certificate_sha256: str


@dataclass(frozen=True, slots=True, repr=False)
class _Pending:
    node_id: str
    tenant_scope: str
    actor: str
    expires_ms: int
    state: PendingEnrolment = field(repr=False)


def _rules(failures: tuple[Failure, ...]) -> tuple[RuleOutcome, ...]:
    return tuple(RuleOutcome(f.id, False, f.message) for f in failures)


class NodeEnrolment:
    def __init__(self, deps: BrokerDeps, trust: EkTrustStore | None) -> None:
        self.d = deps
        self._trust = trust
        self._pending: dict[str, _Pending] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------ helpers
    def _refuse(self, event: str, actor: str, subject: str,
                failures: tuple[Failure, ...]) -> PermissionDenied:
        ids = ", ".join(dict.fromkeys(f.id for f in failures))
        return self.d.deny(event, actor=actor, subject=subject,
                           reason=f"enrolment.refused: {ids}", rules=_rules(failures))

    def _not_revoked(self, event: str, actor: str, node_id: str) -> None:
        node = self.d.repo.get_node(node_id)
        if node is not None and node.revoked and not node.reinstated:
            raise self._revoked(event, actor, node_id)

    def _revoked(self, event: str, actor: str, node_id: str) -> PermissionDenied:
        return self.d.deny(event, actor=actor, subject=f"node:{node_id}",
                           reason=f"node.revoked: node {node_id} was revoked; an operator must "
                                  f"reinstate it (kms-broker node reinstate) before it is "
                                  f"enrolled again")

    def _store(self, event: str, actor: str, node: Node) -> None:
        if not self.d.repo.put_node(node):
            raise self._revoked(event, actor, node.node_id)

    def _purge_expired(self, now_ms: int) -> None:
        for key in [k for k, p in self._pending.items() if p.expires_ms <= now_ms]:
            del self._pending[key]

    # ------------------------------------------------------------ step 1
    def begin(self, *, actor: str, node_id: str, tenant_scope: str, ek_certificate: bytes,
              ek_public: bytes, ak_public: bytes) -> BegunEnrolment:
        check_id("node", node_id)
        if tenant_scope:
            check_id("tenant", tenant_scope)
        check_size("ek_certificate", ek_certificate, MAX_CERT_BYTES)
        check_size("ek_public", ek_public, MAX_PUBLIC_BYTES)
        check_size("ak_public", ak_public, MAX_PUBLIC_BYTES)
        subject = f"node:{node_id}"
        self._not_revoked("enrol_node_begin", actor, node_id)
        if self._trust is None:
            raise self._refuse("enrol_node_begin", actor, subject, (Failure(
                "tpm2.ek_cert_untrusted",
                "this broker has no manufacturer CA configured (config key ek_roots)"),))
        now = self.d.clock.now_ms()
        try:
            challenge, state = begin_enrolment(
                ek_certificate, ek_public, ak_public, self._trust,
                now=datetime.fromtimestamp(now / 1000, UTC),
            )
        except EnrolmentRefused as exc:
            raise self._refuse("enrol_node_begin", actor, subject, exc.failures) from None
        enrolment_id = self.d.random.token_id()
        expires = now + self.d.settings.enrolment_ttl_ms
        with self._lock:
            self._purge_expired(now)
            if len(self._pending) >= MAX_PENDING:
                raise ResourceExhausted(f"{MAX_PENDING} enrolments are pending; retry later")
            self.d.audit.append("enrol_node_begin", actor=actor, subject=subject, outcome="allowed",
                                reason=f"enrolment {enrolment_id}, scope {tenant_scope or 'any'}")
            self._pending[enrolment_id] = _Pending(node_id, tenant_scope, actor, expires, state)
        return BegunEnrolment(enrolment_id, challenge.credential_blob, challenge.encrypted_secret,
                              expires)

    # ------------------------------------------------------------ step 2
    def complete(self, *, actor: str, enrolment_id: str,
                 activated_secret: bytes) -> CompletedEnrolment:
        check_id("enrolment", enrolment_id)
        check_size("activated_secret", activated_secret, MAX_ANSWER_BYTES)
        now = self.d.clock.now_ms()
        with self._lock:
            pending = self._pending.pop(enrolment_id, None)  # single use, whatever the answer
        if pending is None or pending.actor != actor or now >= pending.expires_ms:
            raise self.d.deny("enrol_node", actor=actor, subject=f"enrolment:{enrolment_id}",
                              reason="enrolment.unknown: no pending enrolment with this id (it "
                                     "expired, was already used, was begun by another "
                                     "operator, or reached another worker process of this "
                                     "broker: begin again on one channel)")
        subject = f"node:{pending.node_id}"
        try:
            enrolled = complete_enrolment(pending.state, activated_secret)
        except EnrolmentRefused as exc:
            raise self._refuse("enrol_node", actor, subject, exc.failures) from None
        self._not_revoked("enrol_node", actor, pending.node_id)
        self.d.audit.append(
            "enrol_node", actor=actor, subject=subject, outcome="allowed",
            reason=f"AK {enrolled.ak_name.hex()} bound to EK certificate sha256 "
                   f"{enrolled.ek_certificate_sha256}, scope {pending.tenant_scope or 'any'}")
        self._store("enrol_node", actor, Node(
            node_id=pending.node_id, tenant_scope=pending.tenant_scope,
            ak_public=enrolled.ak_public, ek_certificate=pending.state.ek_certificate,
            enrolled_ms=now, binding_sig=self.d.sign_node(
                pending.node_id, pending.tenant_scope, enrolled.ak_public,
                pending.state.ek_certificate)))
        return CompletedEnrolment(pending.node_id, enrolled.ak_name,
                                  enrolled.ek_certificate_sha256)
