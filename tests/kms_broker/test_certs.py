"""kms_broker.certs: the dev CA and certificates, checked by a real TLS 1.3 mTLS handshake."""

from __future__ import annotations

import os
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509

from kms_broker import certs
from kms_broker.identity import Identity


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, certs.IssuedFiles]:
    certs.create_ca(tmp_path / "ca")
    return {
        "broker": certs.issue(tmp_path / "ca", tmp_path / "out", role="broker", ident="b1",
                              dns_names=["broker.internal"], ip_addresses=["10.0.0.7"]),
        "node": certs.issue(tmp_path / "ca", tmp_path / "out", role="node", ident="n1"),
        "tenant": certs.issue(tmp_path / "ca", tmp_path / "out", role="tenant", ident="acme"),
    }


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_certificates_chain_to_the_ca_and_name_their_identity(
    pki: dict[str, certs.IssuedFiles],
) -> None:
    ca = _cert(pki["node"].ca_path)
    for role, ident in (("broker", "b1"), ("node", "n1"), ("tenant", "acme")):
        issued = pki[role]
        cert = _cert(issued.cert_path)
        cert.verify_directly_issued_by(ca)
        assert certs.peer_identity(cert) == Identity(role, ident)
        assert certs.peer_identity(issued.cert_path.read_bytes()) == Identity(role, ident)
        der = cert.public_bytes(certs.serialization.Encoding.DER)
        assert certs.peer_identity(der) == Identity(role, ident)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
            f"urn:kmsbroker:{role}:{ident}"
        ]
        assert stat.S_IMODE(os.stat(issued.key_path).st_mode) == 0o600
        assert b"PRIVATE KEY" in issued.key_path.read_bytes()
    broker_san = _cert(pki["broker"].cert_path).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
    assert broker_san.get_values_for_type(x509.DNSName) == ["localhost", "broker.internal"]
    assert [str(i) for i in broker_san.get_values_for_type(x509.IPAddress)] == [
        "127.0.0.1", "10.0.0.7"]
    node_eku = _cert(pki["node"].cert_path).extensions.get_extension_for_class(
        x509.ExtendedKeyUsage).value
    assert x509.oid.ExtendedKeyUsageOID.SERVER_AUTH not in node_eku
    assert certs.peer_identity(b"garbage") is None


def test_real_tls13_mutual_handshake(pki: dict[str, certs.IssuedFiles]) -> None:
    ca_path = str(pki["node"].ca_path)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    server_ctx.load_cert_chain(pki["broker"].cert_path, pki["broker"].key_path)
    server_ctx.load_verify_locations(ca_path)
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    client_ctx.load_cert_chain(pki["node"].cert_path, pki["node"].key_path)
    client_ctx.load_verify_locations(ca_path)

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    seen: dict[str, object] = {}

    def serve() -> None:
        conn, _ = listener.accept()
        with server_ctx.wrap_socket(conn, server_side=True) as tls:
            seen["peer"] = certs.peer_identity(tls.getpeercert(binary_form=True) or b"")
            seen["version"] = tls.version()
            tls.sendall(b"ok")

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with socket.create_connection(("127.0.0.1", port)) as raw, \
                client_ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            assert tls.recv(2) == b"ok"
            assert certs.peer_identity(tls.getpeercert(binary_form=True) or b"") == Identity(
                "broker", "b1")
    finally:
        thread.join()
        listener.close()
    assert seen == {"peer": Identity("node", "n1"), "version": "TLSv1.3"}


def test_refusals_change_nothing(tmp_path: Path, pki: dict[str, certs.IssuedFiles]) -> None:
    ca_dir = pki["node"].ca_path.parent
    before = pki["node"].cert_path.read_bytes()
    with pytest.raises(FileExistsError):
        certs.issue(ca_dir, pki["node"].cert_path.parent, role="node", ident="n1")
    assert pki["node"].cert_path.read_bytes() == before
    with pytest.raises(FileExistsError):
        certs.create_ca(ca_dir)
    with pytest.raises(ValueError, match="node id"):
        certs.issue(ca_dir, tmp_path / "x", role="node", ident="../evil")
    with pytest.raises(ValueError, match="role"):
        certs.issue(ca_dir, tmp_path / "x", role="admin", ident="a")
    with pytest.raises(ValueError, match="only a broker"):
        certs.issue(ca_dir, tmp_path / "x", role="node", ident="n2", dns_names=["x"])
    with pytest.raises(ValueError, match="IP address"):
        certs.issue(ca_dir, tmp_path / "x", role="broker", ident="b2", ip_addresses=["nope"])
    with pytest.raises(ValueError, match="days"):
        certs.issue(ca_dir, tmp_path / "x", role="node", ident="n2", days=0)
    with pytest.raises(FileNotFoundError, match="no CA"):
        certs.issue(tmp_path / "empty", tmp_path / "x", role="node", ident="n2")
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())
    # force replaces, with a new key
    old_key = pki["node"].key_path.read_bytes()
    certs.issue(ca_dir, pki["node"].cert_path.parent, role="node", ident="n1", force=True)
    assert pki["node"].key_path.read_bytes() != old_key
    assert stat.S_IMODE(os.stat(pki["node"].key_path).st_mode) == 0o600


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert certs.main(["ca", "--dir", str(tmp_path / "ca")]) == 0
    assert certs.main(["issue", "--ca-dir", str(tmp_path / "ca"), "--out", str(tmp_path / "o"),
                       "--role", "tenant", "--id", "acme"]) == 0
    assert "tenant:acme" in capsys.readouterr().out
    assert certs.main(["issue", "--ca-dir", str(tmp_path / "nope"), "--out",
                       str(tmp_path / "o"), "--role", "node", "--id", "n1"]) == 1
    assert "no CA" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        certs.main(["issue", "--role", "node"])
    assert exit_info.value.code == 2
