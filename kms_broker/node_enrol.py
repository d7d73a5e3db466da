"""Operator-side TPM enrolment at one or more brokers (``kms-broker node enrol``).

Runs on the node machine with the operator's client certificate. For each broker:

1. ``BeginEnrolNode`` with the TPM's EK certificate (DER), EK public and AK public
   (TPMT_PUBLIC each, read from the TPM); the broker checks the EK certificate against its
   manufacturer CAs and answers a credential for the AK's Name encrypted to the EK.
2. The TPM runs ActivateCredential on it. Only the TPM that holds that EK *and* that AK can.
3. ``CompleteEnrolNode`` with the recovered secret. When the TPM refuses to activate (the AK
   is not on the TPM that owns the EK), the enrolment is still completed with an empty answer
   so the broker consumes it and records the refusal (``tpm2.credential_activation``) in its
   audit log; the caller gets :class:`~kms_broker.rpc.PermissionDeniedError` with that id.

The TPM is anything with the four methods of :class:`EnrollingTpm`
(:class:`attest.tpm2.node.TpmNode` in production), so this module needs no TSS.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import grpc

from kms_broker._proto.kmsbroker.v1 import broker_pb2 as pb
from kms_broker._proto.kmsbroker.v1 import broker_pb2_grpc as pb_grpc
from kms_broker.replicas import REPLICA_CONNECT_S, on_any_replica
from kms_broker.rpc import BrokerEndpoint, error_from_rpc, open_channel, wait_until_ready

__all__ = ["EnrolledAt", "EnrollingTpm", "enrol_node"]


class EnrollingTpm(Protocol):
    def ek_certificate(self) -> bytes: ...
    def ek_public(self) -> bytes: ...
    def ak_public(self) -> bytes: ...
    def activate_credential(self, credential_blob: bytes, encrypted_secret: bytes) -> bytes: ...


@dataclass(frozen=True, slots=True)
class EnrolledAt:
    broker: str
    node_id: str
    ak_name: bytes
    ek_certificate_sha256: str


def enrol_node(
    brokers: Sequence[BrokerEndpoint | Sequence[BrokerEndpoint]], *, node_id: str,
    tenant_scope: str, tpm: EnrollingTpm, timeout_s: float = 30.0,
) -> list[EnrolledAt]:
    """Enrol this TPM's AK as ``node_id`` at every broker; raises BrokerRpcError on the first
    refusal (earlier brokers stay enrolled: enrolment is idempotent, rerun after a fix).

    A broker given as a replica set (a sequence of endpoints) is enrolled at the first
    replica that answers (:mod:`kms_broker.replicas`); both calls of one enrolment go to the
    same replica, since pending enrolments live in that process's memory."""
    begin = pb.BeginEnrolNodeRequest(
        node_id=node_id, tenant_scope=tenant_scope, ek_certificate=tpm.ek_certificate(),
        ek_public=tpm.ek_public(), ak_public=tpm.ak_public(),
    )

    def at(endpoint: BrokerEndpoint, connect_s: float) -> EnrolledAt:
        channel = open_channel(endpoint)
        stub = pb_grpc.OperatorServiceStub(channel)
        try:
            wait_until_ready(channel, endpoint.address, connect_s)
            challenge = stub.BeginEnrolNode(begin, timeout=timeout_s)
            try:
                answer = tpm.activate_credential(challenge.credential_blob,
                                                 challenge.encrypted_secret)
            except RuntimeError:  # TpmError: not our EK/AK pair; let the broker refuse it
                answer = b""
            reply = stub.CompleteEnrolNode(pb.CompleteEnrolNodeRequest(
                enrolment_id=challenge.enrolment_id, activated_secret=answer),
                timeout=timeout_s)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, endpoint.address) from None
        finally:
            channel.close()
        return EnrolledAt(endpoint.address, reply.node_id, reply.ak_name,
                          reply.ek_certificate_sha256)

    done = []
    for holder in brokers:
        replicas = [holder] if isinstance(holder, BrokerEndpoint) else list(holder)
        connect_s = timeout_s if len(replicas) == 1 else min(timeout_s, REPLICA_CONNECT_S)
        done.append(on_any_replica(replicas, lambda e, c=connect_s: at(e, c)))  # type: ignore[misc]
    return done
