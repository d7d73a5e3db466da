"""Authentication interceptor: binds the mTLS peer identity to each request.

For every RPC: the peer certificate must name an identity (``kms_broker.identity``); the
service decides the role it needs (NodeService: node, TenantService: tenant, OperatorService:
operator, health: any); and the request's ``node_id`` / ``tenant_id`` field must equal the
certificate's id. Otherwise the call ends UNAUTHENTICATED before any domain code runs.
The bound identity is available to servicers through :data:`CURRENT_IDENTITY`.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from typing import Any

import grpc

from kms_broker.domain.memo import BoundedCache
from kms_broker.identity import Identity, identity_from_certificate

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


class AuthInterceptor(grpc.ServerInterceptor):
    def __init__(self) -> None:
        self.roles = dict(SERVICE_ROLES)  # BrokerServer.add_service may add to it

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        service = handler_call_details.method.lstrip("/").split("/")[0]
        role, field = self.roles.get(service, ("__none__", None))

        def check(request: Any, context: grpc.ServicerContext) -> Identity:
            ident = _peer_identity(context)
            if ident is None:
                context.abort(grpc.StatusCode.UNAUTHENTICATED,
                              "client certificate names no broker identity")
            assert ident is not None
            if role is not None and ident.role != role:
                context.abort(grpc.StatusCode.UNAUTHENTICATED,
                              f"{ident.role} certificates may not call {service}")
            if field is not None and getattr(request, field) != ident.id:
                context.abort(grpc.StatusCode.UNAUTHENTICATED,
                              f"request {field} does not match the client certificate")
            return ident

        if handler.unary_unary is not None:
            inner_uu = handler.unary_unary

            def unary(request: Any, context: grpc.ServicerContext) -> Any:
                token = CURRENT_IDENTITY.set(check(request, context))
                try:
                    return inner_uu(request, context)
                finally:
                    CURRENT_IDENTITY.reset(token)

            return grpc.unary_unary_rpc_method_handler(
                unary, handler.request_deserializer, handler.response_serializer
            )
        if handler.unary_stream is not None:
            inner_us = handler.unary_stream

            def stream(request: Any, context: grpc.ServicerContext) -> Any:
                ident = check(request, context)
                token = CURRENT_IDENTITY.set(ident)
                try:
                    yield from inner_us(request, context)
                finally:
                    CURRENT_IDENTITY.reset(token)

            return grpc.unary_stream_rpc_method_handler(
                stream, handler.request_deserializer, handler.response_serializer
            )
        return handler  # stream-request methods: none in this API
