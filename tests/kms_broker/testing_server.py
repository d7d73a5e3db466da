"""The test composition of the broker: the production server plus the test-only API.

    python -m tests.kms_broker.testing_server serve --config broker.yaml [--workers N]

It builds exactly what ``kms-broker serve`` builds (:func:`kms_broker.app.build_server`) and
adds one service, ``kmsbroker.testing.v1.TestEnrolmentService`` (tests/kms_broker/protos), for
operator certificates: ``EnrolTestNode`` enrols a node *without* an AK, for the trusting
``test-json`` evidence kind (:mod:`tests.kms_broker.verifiers`). The production proto, package
and ``kms-broker serve`` contain none of it (tests/kms_broker/test_server_surface.py), so no
production configuration can reach it. Even here it is refused unless the broker loads the
``test-json`` verifier, and a node enrolled this way can never pass tpm2 attestation
(``tpm2.ak_not_enrolled``).
"""

from __future__ import annotations

import sys
from typing import Any

import grpc

from kms_broker.app import build_server
from kms_broker.domain.deps import BrokerDeps, check_id
from kms_broker.domain.enrolment import NodeEnrolment
from kms_broker.domain.model import Node
from kms_broker.interceptors import CURRENT_IDENTITY
from kms_broker.server import BrokerServer
from kms_broker.servicers import run
from tests.kms_broker._proto.kmsbroker.testing.v1 import testing_pb2 as tpb
from tests.kms_broker._proto.kmsbroker.testing.v1 import testing_pb2_grpc as tpb_grpc
from tests.kms_broker.verifiers import KIND as TEST_EVIDENCE_KIND

__all__ = ["TEST_SERVICE", "build_test_server", "enrol_test_node", "main"]

TEST_SERVICE = "kmsbroker.testing.v1.TestEnrolmentService"


def enrol_test_node(deps: BrokerDeps, *, actor: str, node_id: str, tenant_scope: str) -> None:
    """Store a node with no AK (audited); refused unless the test-json verifier is loaded, and
    (like real enrolment) for a revoked node until an operator reinstates it."""
    check_id("node", node_id)
    if tenant_scope:
        check_id("tenant", tenant_scope)
    if TEST_EVIDENCE_KIND not in deps.verifiers:
        raise deps.deny("enrol_test_node", actor=actor, subject=f"node:{node_id}",
                        reason="enrolment.unattested: direct enrolment without a TPM is only "
                               "for test brokers that load the test-json verifier; use "
                               "BeginEnrolNode/CompleteEnrolNode")
    enrolment = NodeEnrolment(deps, None)  # its revocation checks, shared with real enrolment
    enrolment._not_revoked("enrol_test_node", actor, node_id)
    deps.audit.append("enrol_test_node", actor=actor, subject=f"node:{node_id}",
                      outcome="allowed", reason=f"test node, scope {tenant_scope or 'any'}")
    enrolment._store("enrol_test_node", actor, Node(
        node_id=node_id, tenant_scope=tenant_scope, ak_public=b"", ek_certificate=b"",
        enrolled_ms=deps.clock.now_ms(),
        binding_sig=deps.sign_node(node_id, tenant_scope, b"", b"")))


class TestEnrolmentServicer(tpb_grpc.TestEnrolmentServiceServicer):
    def __init__(self, deps: BrokerDeps) -> None:
        self.deps = deps

    def EnrolTestNode(self, request: Any, context: grpc.ServicerContext) -> Any:
        actor = str(CURRENT_IDENTITY.get())
        run(context, lambda: enrol_test_node(self.deps, actor=actor, node_id=request.node_id,
                                             tenant_scope=request.tenant_scope),
            "EnrolTestNode")
        return tpb.EnrolTestNodeResponse()


def build_test_server(config: Any, **kwargs: Any) -> BrokerServer:
    """The production composition plus the test enrolment service."""
    server = build_server(config, **kwargs)
    servicer = TestEnrolmentServicer(server.deps)
    server.add_service(
        TEST_SERVICE,
        lambda grpc_server: tpb_grpc.add_TestEnrolmentServiceServicer_to_server(servicer,
                                                                               grpc_server),
        role="operator")
    return server


def main(argv: list[str] | None = None) -> int:
    from kms_broker.cli import CliError, build_parser, serve
    from kms_broker.config import ConfigError

    args = build_parser().parse_args(argv)
    if args.command != "serve":
        print("testing_server: only `serve` is supported", file=sys.stderr)
        return 2
    try:
        return serve(args, build=build_test_server, entry_module="tests.kms_broker.testing_server")
    except (CliError, ConfigError, OSError) as exc:
        print(f"testing_server: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
