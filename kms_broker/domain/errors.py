"""Typed domain errors. They know nothing of gRPC; ``kms_broker.errors`` maps them to codes.

Messages are readable and never carry key material, shares or evidence bytes.
"""

from __future__ import annotations

__all__ = [
    "AlreadyExists",
    "BrokerError",
    "IntegrityFailure",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "RuleOutcome",
    "Unauthenticated",
    "Unavailable",
]

from kms_broker.protocol import RuleOutcome  # shared with the clients, which read denials


class BrokerError(Exception):
    """Base of every error the broker domain raises on purpose."""


class InvalidArgument(BrokerError):
    """The request is malformed (bad id, bad length, bad encoding)."""


class ResourceExhausted(BrokerError):
    """A field or request is larger than its documented maximum."""


class NotFound(BrokerError):
    """An id that names nothing (tenant, dataset, key version, lease, upload)."""


class AlreadyExists(BrokerError):
    """Creating something whose id is taken."""


class Unauthenticated(BrokerError):
    """Credentials do not hold: wrong peer identity, bad token signature."""


class Unavailable(BrokerError):
    """A dependency is down (HSM, state store, audit log): fail closed, retry later."""


class AuthorizationChanged(BrokerError):
    """What a release was checked against changed before its lease was taken (the grant or
    the node revoked, the tenant shredded, in another transaction meanwhile); the message
    starts with the rule (``grant.revoked: ...``), as a denial's reason does."""


class IntegrityFailure(BrokerError):
    """Stored key material did not authenticate (a wrapped share under the wrong KEK)."""


class PermissionDenied(BrokerError):
    """Denied by evidence, policy or grant; ``rules`` says which checks failed and why."""

    def __init__(self, reason: str, rules: tuple[RuleOutcome, ...] = ()) -> None:
        super().__init__(reason)
        self.reason = reason
        self.rules = rules or (RuleOutcome(name=reason.split(":")[0], passed=False, reason=reason),)

    def __str__(self) -> str:
        failed = [r for r in self.rules if not r.passed]
        detail = "; ".join(f"{r.name}: {r.reason}" for r in failed)
        return self.reason if detail in ("", f"{self.reason}") else f"{self.reason} ({detail})"
