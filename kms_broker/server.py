"""The gRPC server: mTLS required, the request layer (decode, authenticate, rate-limit:
``kms_broker.interceptors``), size limits, per-node stream caps, health service.

A message over ``MAX_MESSAGE_BYTES`` ends RESOURCE_EXHAUSTED in gRPC itself. The handler pool
(``kms_broker.limits.HANDLER_THREADS``) is larger than twice the stream cap, so open
``WatchRevocations`` streams can never take every handler thread.

Why grpcio's thread-pool server and not ``grpc.aio``: measured side by side with mTLS
(``python -m benchmarks grpc_server``), an aio server with the handler on its event loop took
about as much CPU per unary call as this one (0.81-1.57x of its 0.23-0.44 ms, never 0.2 ms
less), and one handing the work to a thread more: gRPC core's polling, HTTP/2 and TLS, about
0.3 ms a call, are the same under both. The handlers block (HSM calls, fsyncs), which a pool serves
without further design.

TLS: ``grpc.ssl_server_credentials`` with ``require_client_auth=True``; gRPC core negotiates
TLS 1.3 with current peers (Python's grpc exposes no switch to forbid 1.2).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from kms_broker._proto.kmsbroker.v1 import broker_pb2_grpc as pb_grpc
from kms_broker.domain.admin import Admin
from kms_broker.domain.enrolment import NodeEnrolment
from kms_broker.domain.node_flow import NodeFlow
from kms_broker.interceptors import AuthInterceptor
from kms_broker.limits import HANDLER_THREADS, Limits, RateLimiter, StreamSlots, check_pool
from kms_broker.metrics import BrokerMetrics
from kms_broker.protocol import MAX_MESSAGE_BYTES
from kms_broker.servicers import NodeServicer, OperatorServicer, TenantServicer

__all__ = ["MAX_MESSAGE_BYTES", "BrokerServer", "TlsMaterial"]


@dataclass(frozen=True, slots=True, kw_only=True)
class TlsMaterial:
    """PEM bytes: the CA that issued client certificates, and this server's cert and key."""

    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes


class BrokerServer:
    def __init__(
        self,
        *,
        flow: NodeFlow,
        admin: Admin,
        tls: TlsMaterial,
        address: str,
        metrics: BrokerMetrics | None = None,
        max_workers: int = HANDLER_THREADS,
        enrolment: NodeEnrolment | None = None,
        worker: int | None = None,
        limits: Limits | None = None,
    ) -> None:
        """``worker``: this process is worker N of several on one port (kms_broker.workers):
        listen with SO_REUSEPORT and answer health checks for ``kmsbroker.worker/N``, which
        tells a client (or a test) which worker its connection reached."""
        self.metrics = metrics or BrokerMetrics()
        self.on_stop: list[Callable[[], None]] = []
        limits = limits or Limits()
        check_pool(limits, max_workers)
        flow.d.on_denial = lambda reason: self.metrics.denials.labels(reason=reason).inc()
        self.deps = flow.d
        self._auth = AuthInterceptor(
            RateLimiter(limits.rate_per_s, limits.burst),
            StreamSlots(per_key=limits.inflight_per_identity, total=max_workers * 4))
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="broker"),
            interceptors=[self._auth],
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_concurrent_streams", 256),
                ("grpc.so_reuseport", int(worker is not None)),
            ],
            maximum_concurrent_rpcs=max_workers * 4,
        )
        streams = StreamSlots(per_key=limits.streams_per_node, total=limits.max_streams)
        pb_grpc.add_NodeServiceServicer_to_server(NodeServicer(flow, self.metrics, streams),
                                                  self._server)
        pb_grpc.add_TenantServiceServicer_to_server(
            TenantServicer(admin, self.metrics), self._server
        )
        pb_grpc.add_OperatorServiceServicer_to_server(
            OperatorServicer(admin, enrolment or NodeEnrolment(admin.d, None), self.metrics),
            self._server,
        )
        self._services = ["", "kmsbroker.v1.NodeService", "kmsbroker.v1.TenantService"]
        if worker is not None:
            self._services.append(f"kmsbroker.worker/{worker}")
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        credentials = grpc.ssl_server_credentials(
            [(tls.key_pem, tls.cert_pem)], root_certificates=tls.ca_pem, require_client_auth=True
        )
        self.port = self._server.add_secure_port(address, credentials)
        if self.port == 0:
            raise OSError(f"cannot listen on {address}")

    def add_service(self, name: str, register: Callable[[grpc.Server], None], *,
                    role: str, id_field: str | None = None) -> None:
        """Serve one more gRPC service (before :meth:`start`), for callers with ``role``
        certificates; ``id_field`` of each request must then equal the certificate's id.
        Only a composition root calls this (the test composition adds its test-only service
        here); no configuration reaches it."""
        self._auth.roles[name] = (role, id_field)
        register(self._server)

    def start(self) -> None:
        self._server.start()
        for service in self._services:
            self.health.set(service, health_pb2.HealthCheckResponse.SERVING)

    def wait(self) -> None:
        self._server.wait_for_termination()

    def stop(self, grace: float | None = 1.0) -> None:
        self.health.enter_graceful_shutdown()
        self._server.stop(grace).wait()
        for hook in self.on_stop:
            hook()
