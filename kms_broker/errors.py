"""The one table from domain errors to gRPC status codes (DESIGN.md section 5).

Servicers never pick codes themselves: they call :func:`status_for`. Anything not in the table
is a bug and becomes INTERNAL with a generic message (details go to the server log only).
"""

from __future__ import annotations

import grpc

from kms_broker.domain import errors as e

__all__ = ["STATUS_TABLE", "status_for"]

STATUS_TABLE: dict[type[e.BrokerError], grpc.StatusCode] = {
    e.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    e.NotFound: grpc.StatusCode.NOT_FOUND,
    e.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    e.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    e.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    e.Unavailable: grpc.StatusCode.UNAVAILABLE,
    e.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    e.IntegrityFailure: grpc.StatusCode.DATA_LOSS,
}


def status_for(error: BaseException) -> tuple[grpc.StatusCode, str]:
    for cls in type(error).__mro__:
        code = STATUS_TABLE.get(cls)  # type: ignore[arg-type]
        if code is not None:
            return code, str(error)
    return grpc.StatusCode.INTERNAL, "internal error"
