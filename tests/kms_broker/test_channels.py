"""Client channels: the first call waits for the connection (up to its deadline), and a
connection attempt is not cut short (issue 11 item 6: 17-62 UNAVAILABLE errors at the start of a
64-client run, because ``grpc.min_reconnect_backoff_ms`` of 100 ms doubled as the connect
timeout). No timing is assumed: clients are started while the broker is down and are seen
failing to connect before it comes back."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import grpc
import pytest

from kms_broker.client import KeyClient
from kms_broker.rpc import RECONNECT_OPTIONS, BrokerEndpoint, UnavailableError
from kms_broker.tenant import TenantClient
from sealed.keys import derive_dek
from sealed.secrets import SecretBuffer
from tests.kms_broker.conftest import World, make_world

pytestmark = pytest.mark.integration
CLIENTS = 16
HANG_GUARD_S = 300.0  # the clients' deadline: generous, only so that a bug cannot hang CI


@pytest.fixture(scope="module")
def world(broker_factory, tmp_path_factory) -> World:
    return make_world(broker_factory("late"), tmp_path_factory.mktemp("late"),
                      nodes=("n1", "n2", "n3"))


def _refused(channel: grpc.Channel) -> threading.Event:
    """Set once the channel has failed to connect at least once."""
    seen = threading.Event()

    def on_state(state: grpc.ChannelConnectivity) -> None:
        if state == grpc.ChannelConnectivity.TRANSIENT_FAILURE:
            seen.set()

    channel.subscribe(on_state, try_to_connect=False)
    return seen


def test_clients_started_before_the_broker_listens_connect_once_it_is_up(world: World) -> None:
    broker = world.broker
    broker.stop()
    nodes = [f"n{1 + i % 3}" for i in range(CLIENTS)]
    clients = [KeyClient([broker.endpoint("node", n)], node_id=n, job_id=world.job_id,
                         evidence_for=broker.evidence(n), timeout_s=HANG_GUARD_S)
               for n in nodes]
    refused = [_refused(c._brokers[0].channel) for c in clients]
    results: dict[int, object] = {}

    def fetch(i: int) -> None:
        try:
            results[i] = clients[i].fetch_dek(tenant_id=world.tenant_id,
                                              dataset_id=world.dataset_id, key_version=1)
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=fetch, args=(i,)) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    try:
        for i, event in enumerate(refused):  # every client has tried and been refused
            assert event.wait(HANG_GUARD_S), f"client {i} never tried to connect"
        assert results == {}, "a client gave up while the broker was down"
        broker.restart()
        for t in threads:
            t.join(HANG_GUARD_S)
    finally:
        for c in clients:
            c.close()
    errors = {i: r for i, r in results.items() if isinstance(r, Exception)}
    assert errors == {} and len(results) == CLIENTS
    shares = [SecretBuffer.from_bytes(bytearray(s)) for s in world.shares]
    with derive_dek(shares, tenant_id=world.tenant_id, dataset_id=world.dataset_id,
                    key_version=1) as want, want.view() as w:
        for released in results.values():
            with released.dek as dek, dek.view() as got:  # type: ignore[attr-defined]
                assert bytes(got) == bytes(w)


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port bound but not listening: connections are refused, and nobody else can take it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


def test_a_broker_that_never_listens_fails_clearly_after_the_deadline(world: World,
                                                                      closed_port: int) -> None:
    address = f"127.0.0.1:{closed_port}"
    real = world.broker.endpoint("node", "n1")
    endpoint = BrokerEndpoint(address=address, ca_pem=real.ca_pem, cert_pem=real.cert_pem,
                              key_pem=real.key_pem, server_name="localhost")
    with KeyClient([endpoint], node_id="n1", job_id=world.job_id,
                   evidence_for=world.broker.evidence("n1"), timeout_s=1.0) as client, \
            pytest.raises(UnavailableError) as err:
        client.fetch_dek(tenant_id=world.tenant_id, dataset_id=world.dataset_id, key_version=1)
    assert err.value.code == "UNAVAILABLE" and err.value.broker == address
    assert f"{address}: could not connect within 1 s" in str(err.value)
    tenant_real = world.broker.endpoint("tenant", "acme")
    with TenantClient(BrokerEndpoint(address=address, ca_pem=tenant_real.ca_pem,
                                     cert_pem=tenant_real.cert_pem,
                                     key_pem=tenant_real.key_pem, server_name="localhost"),
                      tenant_id="acme", timeout_s=1.0) as tenant, \
            pytest.raises(UnavailableError, match="could not connect within 1 s"):
        tenant.list_datasets()


def test_a_connection_attempt_is_not_cut_short() -> None:
    """gRPC core takes min_reconnect_backoff_ms as the least time one connection attempt
    (TCP + TLS handshake) may take; 100 ms aborted handshakes on a loaded broker."""
    options = dict(RECONNECT_OPTIONS)
    assert options["grpc.min_reconnect_backoff_ms"] >= 10_000
    assert options["grpc.initial_reconnect_backoff_ms"] <= 200  # still retries refusals soon
