"""Client-side plumbing shared by the node key client, the tenant library and the CLI:
mTLS channels with deadlines and size limits, and gRPC status -> typed exception mapping.

It imports no server code (only :mod:`kms_broker.protocol`, which the server shares).

Connecting. A channel retries a refused connection quickly (first retry after 100 ms, never
more than 2 s apart), and gives each connection attempt (TCP and TLS handshake) up to
:data:`CONNECT_ATTEMPT_TIMEOUT_MS`: gRPC core takes ``grpc.min_reconnect_backoff_ms`` as that
minimum connect timeout, so the 100 ms this used to be aborted handshakes on a busy broker
(17-62 UNAVAILABLE errors at the start of a 64-client run). The first call on a channel waits
for the channel to be ready (:func:`wait_until_ready`) up to a deadline, so a client started
before its broker listens, or many clients starting at once, connect instead of failing; a
broker still unreachable at the deadline is an :class:`UnavailableError` that says so.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from kms_broker.protocol import MAX_MESSAGE_BYTES, RULES_METADATA_KEY, RuleOutcome

__all__ = [
    "BrokerEndpoint",
    "BrokerRpcError",
    "DataLoss",
    "InvalidRequest",
    "NotFoundError",
    "PermissionDeniedError",
    "ReadyOnce",
    "UnauthenticatedError",
    "UnavailableError",
    "error_from_rpc",
    "open_channel",
    "wait_until_ready",
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


CONNECT_ATTEMPT_TIMEOUT_MS = 20_000

# gRPC's default reconnect backoff starts at 1 s and grows to 120 s: after a broker restart a
# client kept failing with "connection refused" for minutes, past its lease. Brokers are few
# and local, so retry the connection quickly and never wait more than 2 s between attempts.
# grpc.min_reconnect_backoff_ms is not a backoff floor but the least time one connection
# attempt may take (gRPC core's min_connect_timeout): keep it at gRPC's default of 20 s.
RECONNECT_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", CONNECT_ATTEMPT_TIMEOUT_MS),
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


def wait_until_ready(channel: grpc.Channel, address: str, timeout_s: float) -> None:
    """Block until ``channel`` is connected (retrying refused connections), at most
    ``timeout_s``; then :class:`UnavailableError` naming the broker and the deadline."""
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout_s)
    except grpc.FutureTimeoutError:
        raise UnavailableError(
            f"could not connect within {timeout_s:g} s (the broker is not listening there, "
            f"or the TLS handshake failed: check the address, CA and certificates)",
            code="UNAVAILABLE", broker=address) from None


class ReadyOnce:
    """Waits for a channel once, on its first call (thread-safe); later calls go straight on."""

    def __init__(self, channel: grpc.Channel, address: str, timeout_s: float) -> None:
        self._channel, self._address, self._timeout = channel, address, timeout_s
        self._lock = threading.Lock()
        self._ready = False

    def __call__(self) -> None:
        if self._ready:
            return
        with self._lock:
            if not self._ready:
                wait_until_ready(self._channel, self._address, self._timeout)
                self._ready = True


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
        if key == RULES_METADATA_KEY:
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
