"""Must-show 4, HSM half: a token outage gives UNAVAILABLE and no release; recovery without a
broker restart once the token is back."""

from __future__ import annotations

import grpc
import pytest

from kms_broker.hsm import softhsm
from tests.kms_broker.conftest import World, make_world
from tests.kms_broker.test_isolation_faults import _count, _release, _token

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def world(broker_factory, tmp_path_factory) -> World:
    return make_world(broker_factory("outage"), tmp_path_factory.mktemp("outage"))


@pytest.fixture(scope="module")
def outage_result(world: World) -> dict:
    """Run one outage: a release and an attestation during it, then one attempt after."""
    token = _token(world)
    leases = _count(world, "SELECT COUNT(*) FROM leases")
    config = softhsm.write_config(world.broker.token_dir.parent)
    softhsm.make_token_unavailable(config)
    during = {}
    try:
        for name, call in (("release", lambda: _release(world, token)),
                           ("attest", lambda: _token(world))):
            try:
                call()
                during[name] = (grpc.StatusCode.OK, "")
            except grpc.RpcError as exc:
                during[name] = (exc.code(), exc.details())
        leases_during = _count(world, "SELECT COUNT(*) FROM leases")
    finally:
        softhsm.make_token_available(config)
    return {"token": token, "leases": leases, "leases_during": leases_during, "during": during}


def test_hsm_outage_is_unavailable_and_releases_nothing(world: World, outage_result) -> None:
    for name in ("release", "attest"):
        code, details = outage_result["during"][name]
        assert code == grpc.StatusCode.UNAVAILABLE, name
        assert "HSM unavailable" in details
    assert outage_result["leases_during"] == outage_result["leases"]
    errors = [r for r in world.broker.audit() if r["outcome"] == "error"]
    assert errors and "HSM" in errors[-1]["reason"]


def test_hsm_recovers_without_restart(world: World, outage_result) -> None:
    pid = world.broker.pid
    assert _release(world, outage_result["token"]).sealed_share
    with world.broker.key_client("n1", world.job_id) as client:
        client.fetch_dek(tenant_id="acme", dataset_id="ds1", key_version=1).dek.zeroize()
    assert world.broker.proc.poll() is None and world.broker.pid == pid
