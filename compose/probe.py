"""Health probes for compose healthchecks.

    python -m compose.probe grpc ADDRESS --ca CA.pem --cert CERT.pem --key KEY.pem
        [--service NAME] [--server-name NAME] [--timeout SECONDS]
    python -m compose.probe tcp HOST:PORT [--timeout SECONDS]
    python -m compose.probe pidfile PATH

``grpc`` calls the standard ``grpc.health.v1.Health/Check`` over mTLS and succeeds only on
SERVING. ``tcp`` succeeds when a TCP connection opens. ``pidfile`` succeeds while the process
whose pid the file holds is alive (for services with no port, like a trainer). Exit status:
0 healthy, 1 not healthy (reason on stderr), 2 usage error.
"""

from __future__ import annotations

import argparse
import socket
import sys
from pathlib import Path

__all__ = ["main", "probe_grpc", "probe_pidfile", "probe_tcp"]

MAX_PEM_BYTES = 64 * 1024


class ProbeFailed(Exception):
    pass


def _read_pem(path: str, what: str) -> bytes:
    file = Path(path)
    try:
        size = file.stat().st_size
        if size > MAX_PEM_BYTES:
            raise ProbeFailed(f"{what} {path} is {size} bytes, more than {MAX_PEM_BYTES}")
        return file.read_bytes()
    except OSError as exc:
        raise ProbeFailed(f"cannot read {what} {path}: {exc.strerror}") from None


def probe_grpc(
    address: str,
    *,
    ca: str,
    cert: str,
    key: str,
    service: str = "",
    server_name: str | None = None,
    timeout: float = 5.0,
) -> None:
    """Raise ProbeFailed unless the server at ``address`` reports SERVING for ``service``."""
    import grpc  # imported here so that `tcp` probes stay fast
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read_pem(ca, "CA certificate"),
        private_key=_read_pem(key, "client key"),
        certificate_chain=_read_pem(cert, "client certificate"),
    )
    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    with grpc.secure_channel(address, credentials, options=options) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as exc:
            raise ProbeFailed(f"{address}: {exc.code().name}: {exc.details()}") from None
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        raise ProbeFailed(f"{address}: service {service!r} is {status}")


def probe_tcp(address: str, *, timeout: float = 5.0) -> None:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ProbeFailed(f"expected HOST:PORT, got {address!r}")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as exc:
        raise ProbeFailed(f"{address}: {exc.strerror or exc}") from None


def probe_pidfile(path: str) -> None:
    try:
        text = Path(path).read_text()[:32].strip()
    except OSError as exc:
        raise ProbeFailed(f"cannot read pid file {path}: {exc.strerror}") from None
    if not text.isdigit():
        raise ProbeFailed(f"{path} does not hold a pid")
    try:
        stat = Path(f"/proc/{int(text)}/stat").read_text()
    except OSError:
        raise ProbeFailed(f"process {text} from {path} is gone") from None
    if stat[stat.rfind(")") + 2 :].startswith("Z"):
        raise ProbeFailed(f"process {text} from {path} has exited")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m compose.probe", description="Health probes for compose healthchecks."
    )
    sub = parser.add_subparsers(dest="kind", required=True)
    grpc_parser = sub.add_parser("grpc", help="grpc.health.v1 Check over mTLS")
    grpc_parser.add_argument("address", help="HOST:PORT of the gRPC server")
    grpc_parser.add_argument("--ca", required=True, help="PEM CA certificate to trust")
    grpc_parser.add_argument("--cert", required=True, help="PEM client certificate")
    grpc_parser.add_argument("--key", required=True, help="PEM client private key")
    grpc_parser.add_argument("--service", default="", help="health service name ('' = server)")
    grpc_parser.add_argument("--server-name", help="expected TLS server name, if not the host")
    grpc_parser.add_argument("--timeout", type=float, default=5.0, help="seconds (default 5)")
    tcp_parser = sub.add_parser("tcp", help="a TCP connection opens")
    tcp_parser.add_argument("address", help="HOST:PORT")
    tcp_parser.add_argument("--timeout", type=float, default=5.0, help="seconds (default 5)")
    pid_parser = sub.add_parser("pidfile", help="the process named in a pid file is alive")
    pid_parser.add_argument("path", help="file holding a pid")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.kind == "grpc":
            probe_grpc(
                args.address, ca=args.ca, cert=args.cert, key=args.key, service=args.service,
                server_name=args.server_name, timeout=args.timeout,
            )
        elif args.kind == "tcp":
            probe_tcp(args.address, timeout=args.timeout)
        else:
            probe_pidfile(args.path)
    except ProbeFailed as exc:
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1
    print("healthy")
    return 0


if __name__ == "__main__":
    sys.exit(main())
