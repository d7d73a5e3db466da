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
        # the first call after the restart, no retry loop: a lease that had run out would be
        # refused (lease.expired), so a new expiry means it was renewed while it still held
        expiry = client.renew()

    assert expiry > first_expiry
    assert client.leases[0].lease_id == released.leases[0].lease_id
    assert any(r["event"] == "renew" and r["outcome"] in ("ok", "allowed")
               for r in broker.audit()), "the restarted broker did not record the renewal"


def test_revocation_watch_resubscribes_after_a_broker_restart(broker_factory, tmp_path) -> None:
    """The push stream comes back by itself: a grant revoked after the restart still reaches
    the node at once, not only at its next renewal."""
    broker = broker_factory("rewatch", ttl_ms={"lease": LEASE_MS})
    world = make_world(broker, tmp_path)
    notices, losses = [], []
    client = KeyClient([broker.endpoint("node", "n1")], node_id="n1", job_id=world.job_id,
                       evidence_for=make_evidence, timeout_s=3.0)
    with client:
        released = client.fetch_dek(tenant_id="acme", dataset_id=world.dataset_id,
                                    key_version=1)
        released.dek.zeroize()
        client.watch_revocations(notices.append, losses.append)
        deadline = time.monotonic() + 60  # hang guard for the waits below, not a timing check
        while not client.watching() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert client.watching()

        broker.stop()
        while not losses and time.monotonic() < deadline:
            time.sleep(0.02)
        assert losses and losses[0].code == "UNAVAILABLE", losses
        assert not client.watching()

        broker.restart()
        while not client.watching() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.watching(), "the revocation stream did not come back after the restart"
        assert len(losses) == 1  # one report per loss, not one per retry

        with broker.tenant("acme") as acme:
            assert acme.revoke_grant(world.grant_id) == 1
        while not notices and time.monotonic() < deadline:
            time.sleep(0.02)
    assert notices and notices[0].lease_id == released.leases[0].lease_id
    assert world.grant_id in notices[0].reason
