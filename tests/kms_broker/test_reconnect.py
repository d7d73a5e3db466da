"""The node key client rides out a broker restart: once the broker is back, the next renewal
succeeds at the first call, long before the lease ends (before the fix, gRPC's reconnect
backoff kept failing with "connection refused" for up to two minutes)."""

from __future__ import annotations

import time

import pytest

from kms_broker.client import KeyClient
from kms_broker.rpc import UnavailableError
from sealed.keys import derive_dek
from sealed.secrets import SecretBuffer
from tests.kms_broker.conftest import make_world
from tests.kms_broker.verifiers import make_evidence

pytestmark = pytest.mark.integration
LEASE_MS = 60_000


def test_renew_succeeds_soon_after_a_broker_restart(broker_factory, tmp_path) -> None:
    broker = broker_factory("restart", ttl_ms={"lease": LEASE_MS})
    world = make_world(broker, tmp_path)
    client = KeyClient([broker.endpoint("node", "n1")], node_id="n1", job_id=world.job_id,
                       evidence_for=make_evidence, timeout_s=3.0)
    with client:
        released = client.fetch_dek(tenant_id="acme", dataset_id=world.dataset_id,
                                    key_version=1)
        with released.dek as dek, dek.view() as got:
            shares = [SecretBuffer.from_bytes(bytearray(s)) for s in world.shares]
            with derive_dek(shares, tenant_id="acme", dataset_id=world.dataset_id,
                            key_version=1) as want, want.view() as w:
                assert bytes(got) == bytes(w)
        first_expiry = client.leases[0].expires_unix_ms

        broker.stop()
        # renewals during the outage fail (typed, retryable) and push gRPC into backoff
        for _ in range(3):
            with pytest.raises(UnavailableError):
                client.renew()

        broker.restart()
        back = time.monotonic()
        expiry = client.renew()  # the first call after the restart, no retry loop
        took_ms = (time.monotonic() - back) * 1000

    assert expiry > first_expiry
    assert client.leases[0].lease_id == released.leases[0].lease_id
    assert took_ms < LEASE_MS  # renewed while the lease still held
    assert any(r["event"] == "renew" and r["outcome"] in ("ok", "allowed")
               for r in broker.audit()), "the restarted broker did not record the renewal"
