"""Server surface: TLS 1.3 with client certificates, Prometheus metrics, health."""

from __future__ import annotations

import socket
import ssl
import urllib.request

import pytest

from compose.ports import free_port
from kms_broker.rpc import NotFoundError, PermissionDeniedError
from tests.kms_broker.conftest import make_world

pytestmark = pytest.mark.integration


def _free_port() -> int:
    return free_port()  # reserved for this process, outside the ephemeral range


@pytest.fixture(scope="module")
def metered(broker_factory, tmp_path_factory):
    port = _free_port()
    world = make_world(broker_factory("metered", metrics_port=port),
                       tmp_path_factory.mktemp("metered"))
    return world, port


def _tls_probe(world, *, client_cert: bool) -> tuple[str, bytes]:
    """Handshake, send the HTTP/2 preface, read the server's first byte (b"" if refused)."""
    host, port = world.broker.address.rsplit(":", 1)
    ctx = ssl.create_default_context(cafile=str(world.broker.pki.ca_path))
    ctx.set_alpn_protocols(["h2"])
    if client_cert:
        ctx.load_cert_chain(world.broker.pki.root / "node-n1.pem",
                            world.broker.pki.root / "node-n1.key")
    with socket.create_connection((host, int(port))) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        version = tls.version()
        tls.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        try:
            first = tls.recv(1)
        except (ssl.SSLError, ConnectionResetError):
            first = b""
        return version, first


def test_tls13_and_client_certificates_required(metered) -> None:
    world, _ = metered
    assert _tls_probe(world, client_cert=True) == ("TLSv1.3", b"\x00")  # SETTINGS frame
    assert _tls_probe(world, client_cert=False)[1] == b""  # refused: no client certificate


def test_prometheus_metrics(metered) -> None:
    world, port = metered
    with world.broker.key_client("n1", world.job_id) as client:
        client.fetch_dek(tenant_id="acme", dataset_id="ds1", key_version=1).dek.zeroize()
        with pytest.raises(NotFoundError):
            client.fetch_dek(tenant_id="acme", dataset_id="missing", key_version=1)
    with pytest.raises(PermissionDeniedError), \
            world.broker.key_client("n1", "other-job") as client:
        client.fetch_dek(tenant_id="acme", dataset_id="ds1", key_version=1)
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert "kmsbroker_release_seconds_count 1.0" in text
    assert 'kmsbroker_denials_total{reason="grant.missing"} 1.0' in text
    assert 'kmsbroker_hsm_op_seconds_count{op="seal_share"} 1.0' in text
    # the client releases inside its Attest (AttestRequest.release): the unknown dataset is
    # that call's NOT_FOUND
    assert 'kmsbroker_rpcs_total{code="NOT_FOUND",method="Attest"} 1.0' in text
