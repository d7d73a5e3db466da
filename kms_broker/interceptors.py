"""The request layer in front of every handler: decode, authenticate, rate-limit.

For every RPC, before any servicer or domain code runs:

1. Decode. The request bytes are parsed here, not by gRPC: bytes that are not a valid message
   of the method's type (truncated or malformed protobuf, invalid UTF-8 in a string field)
   end INVALID_ARGUMENT, never INTERNAL. A message over ``grpc.max_receive_message_length``
   never gets this far: gRPC ends it RESOURCE_EXHAUSTED (``kms_broker.server``).
2. Authenticate. The peer certificate must name an identity (``kms_broker.identity``); the
   service decides the role it needs (NodeService: node, TenantService: tenant,
   OperatorService: operator, health: any); and the request's ``node_id`` / ``tenant_id``
   field must equal the certificate's id. Otherwise the call ends UNAUTHENTICATED.
3. Rate-limit. One token from the identity's bucket (:class:`kms_broker.limits.RateLimiter`),
   and for a unary call one of the identity's in-flight slots, or RESOURCE_EXHAUSTED. Health
   checks are not limited.

Refusals here are domain errors mapped by the one table (``kms_broker.errors``). The bound
identity is available to servicers through :data:`CURRENT_IDENTITY`.

4. Log the outcome. When the call ends, one line on logger ``kms_broker.request`` with the
   structured fields (``kms_broker.logs``): ``method``, ``identity`` (``role:id`` from the
   certificate, or ``-``), ``status`` (the gRPC code name), ``decision`` (``allowed``: OK;
   ``denied``: PERMISSION_DENIED or UNAUTHENTICATED; ``refused``: any other code),
   ``reasons`` (the failed policy rules of a denial, ``name: reason``, as sent to the
   client), ``detail`` (the status message; empty for a denial, whose message repeats its
   reasons) and ``latency_ms``. INFO when allowed, WARNING
   otherwise, DEBUG for health checks. Only these fields: never request or response bodies,
   which carry evidence, sealed shares and tokens.
"""

from __future__ import annotations

import contextvars
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import grpc

from kms_broker.domain.errors import (
    BrokerError,
    InvalidArgument,
    ResourceExhausted,
    Unauthenticated,
)
from kms_broker.domain.memo import BoundedCache
from kms_broker.errors import status_for
from kms_broker.identity import Identity, identity_from_certificate
from kms_broker.limits import RateLimiter, StreamSlots
from kms_broker.logs import fields
from kms_broker.protocol import RULES_METADATA_KEY

__all__ = ["CURRENT_IDENTITY", "AuthInterceptor"]

CURRENT_IDENTITY: contextvars.ContextVar[Identity | None] = contextvars.ContextVar(
    "kms_broker_identity", default=None
)

SERVICE_ROLES = {
    "kmsbroker.v1.NodeService": ("node", "node_id"),
    "kmsbroker.v1.TenantService": ("tenant", "tenant_id"),
    "kmsbroker.v1.OperatorService": ("operator", None),
    "grpc.health.v1.Health": (None, None),
}


_identities = BoundedCache()  # PEM -> Identity | None


def _peer_identity(context: grpc.ServicerContext) -> Identity | None:
    certs = context.auth_context().get("x509_pem_cert")
    if not certs:
        return None
    # The identity is a pure function of the certificate bytes, which gRPC core has already
    # verified against the CA in this connection's handshake; memoise the parse per PEM.
    pem = certs[0]
    try:
        return _identities[pem]
    except KeyError:
        pass
    ident = identity_from_certificate(pem)
    _identities.put(pem, ident)
    return ident


class _Undecodable:
    """What the request deserializer returns for bytes that are not a valid message."""

    __slots__ = ("problem",)

    def __init__(self, problem: str) -> None:
        self.problem = problem


def _lenient(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserialize is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as exc:  # DecodeError, invalid UTF-8: whatever the bytes were
            return _Undecodable(type(exc).__name__)

    return parse


_request_log = logging.getLogger("kms_broker.request")
_HEALTH = "grpc.health.v1.Health"
_DENIED = frozenset({"PERMISSION_DENIED", "UNAUTHENTICATED"})


def _rule_line(name: str, reason: str) -> str:
    return reason if reason.startswith(f"{name}:") else f"{name}: {reason}"


def _denial_reasons(context: grpc.ServicerContext) -> list[str]:
    for key, value in context.trailing_metadata() or ():
        if key == RULES_METADATA_KEY:
            try:
                rules = json.loads(value)
                return [_rule_line(r["name"], r["reason"]) for r in rules if not r.get("passed")]
            except (ValueError, TypeError, KeyError):
                return ["(unreadable rule list)"]
    return []


def _quiet_identity(context: grpc.ServicerContext) -> Identity | None:
    """The peer's identity for a log line when the call was refused before it was bound."""
    try:
        return _peer_identity(context)
    except Exception:  # an unparseable certificate: the refusal says so, the line says "-"
        return None


def _log_outcome(method: str, service: str, ident: Identity | None,
                 context: grpc.ServicerContext, started: float, raised: bool) -> None:
    """One line per finished call (module doc, step 4)."""
    code = context.code()
    if code is None:
        if not raised:
            code = grpc.StatusCode.OK
        else:  # a stream the client went away from, or an exception gRPC turns into UNKNOWN
            code = (grpc.StatusCode.UNKNOWN if context.is_active()
                    else grpc.StatusCode.CANCELLED)
    status = code.name
    decision = ("allowed" if status == "OK" else "denied" if status in _DENIED
                else "refused")
    if service == _HEALTH:
        level = logging.DEBUG
    else:
        level = logging.INFO if decision == "allowed" else logging.WARNING
    if not _request_log.isEnabledFor(level):
        return
    details = context.details()
    detail = (details.decode("utf-8", "replace") if isinstance(details, bytes)
              else (details or ""))
    reasons = _denial_reasons(context) if status == "PERMISSION_DENIED" else []
    if reasons:
        detail = ""  # the status message of a denial repeats its reasons: said once, above
    latency_ms = round((time.perf_counter() - started) * 1000, 2)
    who = str(ident) if ident is not None else "-"
    # the record made and handled directly: Logger.log would also walk the stack for the
    # caller's file and line on every call, which no format shows
    _request_log.handle(_request_log.makeRecord(
        _request_log.name, level, __file__, 0, "%s %s %s (%s)",
        (method, who, decision, status), None, extra=fields(
            method=method, identity=who, status=status, decision=decision, reasons=reasons,
            detail=detail, latency_ms=latency_ms)))


def _abort(context: grpc.ServicerContext, error: BrokerError) -> None:
    code, message = status_for(error)
    context.abort(code, message)


class AuthInterceptor(grpc.ServerInterceptor):
    def __init__(self, limiter: RateLimiter | None = None,
                 inflight: StreamSlots | None = None) -> None:
        self._limiter = limiter
        self._inflight = inflight
        self.roles = dict(SERVICE_ROLES)  # BrokerServer.add_service may add to it

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        service = method.lstrip("/").split("/")[0]
        role, field = self.roles.get(service, ("__none__", None))

        limiter = self._limiter if role is not None else None

        def check(request: Any, context: grpc.ServicerContext) -> Identity:
            ident = _peer_identity(context)
            if ident is None:
                _abort(context, Unauthenticated("client certificate names no broker identity"))
            assert ident is not None
            if isinstance(request, _Undecodable):
                _abort(context, InvalidArgument(
                    f"request is not a valid {handler_call_details.method} message "
                    f"({request.problem}: malformed protobuf or invalid UTF-8)"))
            if role is not None and ident.role != role:
                _abort(context, Unauthenticated(
                    f"{ident.role} certificates may not call {service}"))
            if field is not None and getattr(request, field) != ident.id:
                _abort(context, Unauthenticated(
                    f"request {field} does not match the client certificate"))
            if limiter is not None and not limiter.allow(str(ident)):
                _abort(context, ResourceExhausted(
                    f"{ident} is over its request rate; slow down and retry"))
            return ident

        if handler.unary_unary is not None:
            inner_uu = handler.unary_unary

            inflight = self._inflight if limiter is not None else None

            def unary(request: Any, context: grpc.ServicerContext) -> Any:
                started = time.perf_counter()
                ident = None
                raised = True
                try:
                    ident = check(request, context)
                    key = str(ident)
                    if inflight is not None and not inflight.acquire(key):
                        _abort(context, ResourceExhausted(
                            f"{ident} has too many calls in flight; wait for one to finish"))
                    token = CURRENT_IDENTITY.set(ident)
                    try:
                        result = inner_uu(request, context)
                    finally:
                        CURRENT_IDENTITY.reset(token)
                        if inflight is not None:
                            inflight.release(key)
                    raised = False
                    return result
                finally:
                    _log_outcome(method, service, ident or _quiet_identity(context), context,
                                 started, raised)

            return grpc.unary_unary_rpc_method_handler(
                unary, _lenient(handler.request_deserializer), handler.response_serializer
            )
        if handler.unary_stream is not None:
            inner_us = handler.unary_stream

            def stream(request: Any, context: grpc.ServicerContext) -> Any:
                started = time.perf_counter()
                ident = None
                raised = True
                try:
                    ident = check(request, context)
                    token = CURRENT_IDENTITY.set(ident)
                    try:
                        yield from inner_us(request, context)
                    finally:
                        CURRENT_IDENTITY.reset(token)
                    raised = False
                finally:
                    _log_outcome(method, service, ident or _quiet_identity(context), context,
                                 started, raised)

            return grpc.unary_stream_rpc_method_handler(
                stream, _lenient(handler.request_deserializer), handler.response_serializer
            )
        return handler  # stream-request methods: none in this API
