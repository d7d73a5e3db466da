"""The gRPC health probe against a real mTLS gRPC server with the standard health service."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from compose.ports import free_port
from compose.probe import main as probe_main


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


def _issue(directory: Path, name: str, ca_key, ca_name, *, server: bool) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(name)).issuer_name(ca_name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.ExtendedKeyUsage(
            [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False)
    )
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    (directory / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(directory / f"{name}.key", key)


def _make_ca(directory: Path, cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Name]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn))
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    (directory / "ca.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key, _name(cn)


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    ca_key, ca_name = _make_ca(tmp_path, "probe test CA")
    _issue(tmp_path, "server", ca_key, ca_name, server=True)
    _issue(tmp_path, "client", ca_key, ca_name, server=False)
    other = tmp_path / "other"
    other.mkdir()
    other_key, other_name = _make_ca(other, "another CA")
    _issue(other, "client", other_key, other_name, server=False)
    return tmp_path


@pytest.fixture
def server(pki: Path) -> Iterator[tuple[str, health.HealthServicer]]:
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, grpc_server)
    credentials = grpc.ssl_server_credentials(
        [((pki / "server.key").read_bytes(), (pki / "server.pem").read_bytes())],
        root_certificates=(pki / "ca.pem").read_bytes(),
        require_client_auth=True,
    )
    port = grpc_server.add_secure_port("127.0.0.1:0", credentials)
    grpc_server.start()
    yield f"127.0.0.1:{port}", servicer
    grpc_server.stop(grace=None)


def _args(address: str, pki: Path, *extra: str) -> list[str]:
    return ["grpc", address, "--ca", str(pki / "ca.pem"), "--cert", str(pki / "client.pem"),
            "--key", str(pki / "client.key"), "--timeout", "10", *extra]


def test_grpc_probe_follows_serving_status(server, pki: Path, capsys):
    address, servicer = server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    assert probe_main(_args(address, pki)) == 0
    assert capsys.readouterr().out == "healthy\n"
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert probe_main(_args(address, pki)) == 1
    assert "service '' is NOT_SERVING" in capsys.readouterr().err
    servicer.set("kmsbroker.v1.NodeService", health_pb2.HealthCheckResponse.SERVING)
    assert probe_main(_args(address, pki, "--service", "kmsbroker.v1.NodeService")) == 0
    assert probe_main(_args(address, pki, "--service", "unknown.Service")) == 1
    assert "NOT_FOUND" in capsys.readouterr().err


def test_grpc_probe_needs_a_certificate_the_server_trusts(server, pki: Path, capsys):
    address, servicer = server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    other = pki / "other"
    args = ["grpc", address, "--ca", str(pki / "ca.pem"), "--cert", str(other / "client.pem"),
            "--key", str(other / "client.key"), "--timeout", "10"]
    assert probe_main(args) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err


def test_probe_failures_and_usage(pki: Path, capsys):
    # nothing listens on a port reserved for this process outside the ephemeral range
    port = free_port()
    assert probe_main(["tcp", f"127.0.0.1:{port}", "--timeout", "5"]) == 1
    assert "unhealthy: 127.0.0.1:" in capsys.readouterr().err
    assert probe_main(_args("127.0.0.1:1", pki, "--ca", str(pki / "missing.pem"))) == 1
    assert "cannot read CA certificate" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:
        probe_main(["grpc", "127.0.0.1:1"])
    assert usage.value.code == 2


def test_tcp_probe_succeeds_on_listening_port(capsys):
    import socket

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert probe_main(["tcp", f"127.0.0.1:{port}"]) == 0


def test_pidfile_probe(tmp_path: Path, capsys):
    import subprocess
    import sys

    pid_file = tmp_path / "svc.pid"
    assert probe_main(["pidfile", str(pid_file)]) == 1
    assert "cannot read pid file" in capsys.readouterr().err
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        pid_file.write_text(f"{child.pid}\n")
        assert probe_main(["pidfile", str(pid_file)]) == 0
    finally:
        child.kill()
    os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # dead, not reaped: a zombie
    assert probe_main(["pidfile", str(pid_file)]) == 1
    child.wait()
    assert probe_main(["pidfile", str(pid_file)]) == 1
    assert "is gone" in capsys.readouterr().err
    pid_file.write_text("not a pid")
    assert probe_main(["pidfile", str(pid_file)]) == 1
