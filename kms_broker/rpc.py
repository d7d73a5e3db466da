"""Client-side plumbing shared by the node key client, the tenant library and the CLI:
mTLS channels with deadlines and size limits, and gRPC status -> typed exception mapping."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from kms_broker.domain.errors import RuleOutcome
from kms_broker.server import MAX_MESSAGE_BYTES

__all__ = [
    "BrokerEndpoint",
    "BrokerRpcError",
    "DataLoss",
    "InvalidRequest",
    "NotFoundError",
    "PermissionDeniedError",
    "UnauthenticatedError",
    "UnavailableError",
    "error_from_rpc",
    "open_channel",
]


@dataclass(frozen=True, kw_only=True)
class BrokerEndpoint:
    """Where a broker listens and the TLS material to reach it (PEM bytes)."""

    address: str
    ca_pem: bytes = field(repr=False)
    cert_pem: bytes = field(repr=False)
    key_pem: bytes = field(repr=False)
    server_name: str | None = None  # TLS name to expect, when it differs from the address

    @classmethod
    def from_files(cls, address: str, *, ca: Path, cert: Path, key: Path,
                   server_name: str | None = None) -> BrokerEndpoint:
        return cls(address=address, ca_pem=Path(ca).read_bytes(),
                   cert_pem=Path(cert).read_bytes(), key_pem=Path(key).read_bytes(),
                   server_name=server_name)


# gRPC's default reconnect backoff starts at 1 s and grows to 120 s: after a broker restart a
# client kept failing with "connection refused" for minutes, past its lease. Brokers are few
# and local, so retry the connection quickly and never wait more than 2 s between attempts.
RECONNECT_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
)


def open_channel(endpoint: BrokerEndpoint) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=endpoint.ca_pem,
        private_key=endpoint.key_pem,
        certificate_chain=endpoint.cert_pem,
    )
    options: list[tuple[str, int | str]] = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        *RECONNECT_OPTIONS,
    ]
    if endpoint.server_name:
        options.append(("grpc.ssl_target_name_override", endpoint.server_name))
    return grpc.secure_channel(endpoint.address, credentials, options=options)


class BrokerRpcError(Exception):
    """A broker call failed; ``code`` is the gRPC status name."""

    def __init__(self, message: str, *, code: str, broker: str = "") -> None:
        super().__init__(f"{broker}: {message}" if broker else message)
        self.code = code
        self.broker = broker


class PermissionDeniedError(BrokerRpcError):
    """Denied by evidence, policy or grant. ``rules`` lists each check and why it failed."""

    def __init__(self, message: str, *, code: str, broker: str = "",
                 rules: tuple[RuleOutcome, ...] = ()) -> None:
        super().__init__(message, code=code, broker=broker)
        self.rules = rules

    @property
    def failed_rules(self) -> tuple[RuleOutcome, ...]:
        return tuple(r for r in self.rules if not r.passed)


class UnavailableError(BrokerRpcError):
    """The broker, its HSM, state store or audit log is down; retry later."""


class UnauthenticatedError(BrokerRpcError):
    """Credentials rejected (certificate identity, token)."""


class InvalidRequest(BrokerRpcError):
    """The broker rejected the request as malformed or oversized."""


class NotFoundError(BrokerRpcError):
    """The broker does not know the named tenant, dataset, version, lease or session."""


class DataLoss(BrokerRpcError):
    """Stored key material did not authenticate at the broker."""


_CLASSES: dict[grpc.StatusCode, type[BrokerRpcError]] = {
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: UnavailableError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest,
    grpc.StatusCode.RESOURCE_EXHAUSTED: InvalidRequest,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.DATA_LOSS: DataLoss,
}


def _rules(error: grpc.RpcError) -> tuple[RuleOutcome, ...]:
    try:
        metadata = error.trailing_metadata() or ()  # type: ignore[attr-defined]
    except Exception:
        return ()
    for key, value in metadata:
        if key == "kmsbroker-rules":
            try:
                return tuple(RuleOutcome(r["name"], bool(r["passed"]), r["reason"])
                             for r in json.loads(value))
            except (ValueError, KeyError, TypeError):
                return ()
    return ()


def error_from_rpc(error: grpc.RpcError, broker: str = "") -> BrokerRpcError:
    code = error.code()  # type: ignore[attr-defined]
    message = error.details() or code.name  # type: ignore[attr-defined]
    cls = _CLASSES.get(code, BrokerRpcError)
    if cls is PermissionDeniedError:
        return PermissionDeniedError(message, code=code.name, broker=broker, rules=_rules(error))
    return cls(message, code=code.name, broker=broker)
