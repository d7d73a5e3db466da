"""What the broker's domain services are built from (wired by the CLI, the composition root).

Also the shared helpers: identifier and size checks, HSM error translation, and the
"audit the denial, then raise" step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from attest.interface import EvidenceVerifier
from kms_broker.audit import AuditLog
from kms_broker.domain.bindings import BindingVerifier, node_binding, tenant_binding
from kms_broker.domain.clock import Clock, Random
from kms_broker.domain.errors import (
    IntegrityFailure,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    RuleOutcome,
    Unavailable,
)
from kms_broker.domain.model import Node, Tenant
from kms_broker.domain.revocations import RevocationHub
from kms_broker.hsm.interface import Hsm, HsmError, HsmUnavailable, KeyNotFound, UnwrapFailed
from kms_broker.state.repository import Repository
from sealed.keys import validate_identifier

__all__ = [
    "BrokerDeps",
    "PolicyLike",
    "Settings",
    "check_id",
    "check_size",
    "hsm_errors",
]


class RuleLike(Protocol):
    name: str
    passed: bool
    reason: str


class DecisionLike(Protocol):
    allowed: bool
    rules: Sequence[RuleLike]


class PolicyLike(Protocol):
    """What ``attest.policy.Policy`` offers: a digest and an evaluation over claims."""

    digest: str

    def evaluate(self, claims: Mapping[str, Any]) -> DecisionLike: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    broker_id: str = "broker"  # bound into every sealing transcript
    session_ttl_ms: int = 30_000
    token_ttl_ms: int = 60_000
    lease_ttl_ms: int = 300_000
    upload_ttl_ms: int = 600_000
    enrolment_ttl_ms: int = 120_000  # between BeginEnrolNode and CompleteEnrolNode
    max_evidence_bytes: int = 1 << 20
    max_policy_bytes: int = 64 << 10
    max_sealed_share_bytes: int = 512
    # per identity, so one node or tenant cannot grow the state without bound
    max_pending_sessions_per_node: int = 64
    max_pending_uploads_per_tenant: int = 64

    def __post_init__(self) -> None:
        for name in ("session_ttl_ms", "token_ttl_ms", "lease_ttl_ms", "upload_ttl_ms",
                     "enrolment_ttl_ms"):
            if not 0 < getattr(self, name) <= 7 * 86_400_000:
                raise ValueError(f"{name} must be between 1 ms and 7 days")
        for name in ("max_pending_sessions_per_node", "max_pending_uploads_per_tenant"):
            if not 1 <= getattr(self, name) <= 1 << 20:
                raise ValueError(f"{name} must be from 1 to 2**20")


@dataclass(slots=True, kw_only=True)
class BrokerDeps:
    repo: Repository
    hsm: Hsm
    audit: AuditLog
    clock: Clock
    random: Random
    verifiers: Mapping[str, EvidenceVerifier]
    load_policy: Callable[[str], PolicyLike]
    revocations: RevocationHub = field(default_factory=RevocationHub)
    settings: Settings = field(default_factory=Settings)
    reference_values: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    on_denial: Callable[[str], None] = lambda reason: None  # metrics hook
    binding_checks: BindingVerifier | None = None  # made on first use from the HSM key
    # One transaction for an action's state change and its audit record, where the state
    # store and the audit log share one (PostgreSQL: PostgresRepository.unit_of_work): both
    # commit or neither does. The default (SQLite state, file log) is no transaction: each
    # call commits alone and the domain keeps write-before-act. No denial is audited inside
    # one (a denial's record must stand when the action is rolled back).
    unit_of_work: Callable[[], contextlib.AbstractContextManager[None]] = contextlib.nullcontext

    def sign_tenant(self, tenant_id: str, signing_public_key: bytes) -> bytes:
        """The broker's signature binding a tenant id to its grant-signing key."""
        with hsm_errors("signing the tenant record"):
            return self.hsm.sign(tenant_binding(tenant_id, signing_public_key))

    def sign_node(self, node_id: str, tenant_scope: str, ak_public: bytes,
                  ek_certificate: bytes) -> bytes:
        """The broker's signature binding a node id to its AK, EK certificate and scope."""
        with hsm_errors("signing the node record"):
            return self.hsm.sign(node_binding(node_id, tenant_scope, ak_public, ek_certificate))

    def require_bound(self, row: Tenant | Node, *, event: str, actor: str,
                      subject: str) -> None:
        """Deny (audited) unless the stored row carries this broker's binding signature."""
        if self.binding_checks is None:
            with hsm_errors("loading the signing key"):
                self.binding_checks = BindingVerifier(self.hsm.signing_public_key())
        if isinstance(row, Tenant):
            if self.binding_checks.tenant_ok(row):
                return
            what = f"tenant {row.tenant_id}"
        else:
            if self.binding_checks.node_ok(row):
                return
            what = f"node {row.node_id}"
        raise self.deny(event, actor=actor, subject=subject,
                        reason=f"state.tampered: the stored record of {what} does not carry "
                               f"this broker's signature (edited or copied in the database)")

    def refused(self, event: str, *, actor: str, subject: str, error: BaseException) -> None:
        """Audit a refusal that is not a policy denial (an unknown id, a bad token, a limit),
        best effort like :meth:`deny`: the refusal stands even if the log is down."""
        self.on_denial(type(error).__name__)
        with contextlib.suppress(Unavailable):
            self.audit.append(event, actor=actor, subject=subject, outcome="denied",
                              reason=f"{type(error).__name__}: {error}")

    def deny(
        self,
        event: str,
        *,
        actor: str,
        subject: str,
        reason: str,
        rules: tuple[RuleOutcome, ...] = (),
    ) -> PermissionDenied:
        """Audit a denial (best effort: a denial stands even if the log is down)."""
        error = PermissionDenied(reason, rules)
        self.on_denial(reason.split(":")[0])
        with contextlib.suppress(Unavailable):
            self.audit.append(event, actor=actor, subject=subject, outcome="denied",
                              reason=str(error))
        return error


def check_id(kind: str, value: str) -> str:
    try:
        return validate_identifier(kind, value)
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from None


def check_size(what: str, data: bytes | str, maximum: int) -> None:
    if len(data) > maximum:
        raise ResourceExhausted(f"{what} is {len(data)} bytes, at most {maximum} allowed")


@contextlib.contextmanager
def hsm_errors(what: str) -> Iterator[None]:
    """Translate HSM errors into domain errors (fail closed)."""
    try:
        yield
    except HsmUnavailable as exc:
        raise Unavailable(f"HSM unavailable during {what}: {exc}") from None
    except KeyNotFound as exc:
        raise NotFound(f"key needed for {what} does not exist: {exc}") from None
    except UnwrapFailed:
        raise IntegrityFailure(f"stored key material failed to authenticate in {what}") from None
    except HsmError as exc:
        raise Unavailable(f"HSM error during {what}: {exc}") from None
