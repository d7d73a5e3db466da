"""Issue 11 item 1: expired sessions, uploads (with their import key pairs on the HSM) and
leases are purged, so the state returns to its baseline after sustained load. A real broker
subprocess with short TTLs; token objects are counted through PKCS#11 in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import grpc
import pytest
import yaml

from kms_broker._proto.kmsbroker.v1 import broker_pb2 as pb
from kms_broker._proto.kmsbroker.v1 import broker_pb2_grpc as pb_grpc
from kms_broker.rpc import open_channel
from tests.kms_broker.conftest import BrokerProc, World, make_world

pytestmark = pytest.mark.integration

TTL_MS = {"session": 4000, "token": 4000, "lease": 4000, "upload": 4000}
COUNT_OBJECTS = """
import json, sys, pkcs11
cfg = json.loads(sys.argv[1])
token = pkcs11.lib(cfg["module"]).get_token(token_label=cfg["token_label"])
with open(cfg["pin_file"]) as f:
    pin = f.read().strip()
with token.open(user_pin=pin) as session:
    print(sum(1 for _ in session.get_objects()))
"""


def token_objects(broker: BrokerProc) -> int:
    """Objects on the broker's SoftHSM token, counted by a fresh process over PKCS#11."""
    cfg = yaml.safe_load((broker.state_dir.parent / f"{broker.name}.yaml").read_text())["hsm"]
    out = subprocess.run([sys.executable, "-c", COUNT_OBJECTS, json.dumps(cfg)],
                         env={**os.environ, "SOFTHSM2_CONF": cfg["softhsm_conf"]},
                         capture_output=True, text=True, timeout=120, check=True)
    return int(out.stdout)


def state_rows(broker: BrokerProc) -> dict[str, int]:
    with broker.db() as db:
        return {t: db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]
                for t in ("sessions", "uploads", "leases", "datasets")}


@pytest.fixture(scope="module")
def world(broker_factory, tmp_path_factory) -> World:
    broker = broker_factory("janitor", ttl_ms=TTL_MS,
                            extra_config={"janitor_interval_ms": 250})
    return make_world(broker, tmp_path_factory.mktemp("janitor"), nodes=("n1", "n2"))


def wait_for(what: str, check, deadline_s: float = 180) -> None:
    deadline = time.monotonic() + deadline_s  # a deadline on the wait, not a timing assertion
    while not check():
        assert time.monotonic() < deadline, f"{what} did not happen"
        time.sleep(0.25)


def test_janitor_returns_state_and_token_objects_to_baseline(world: World) -> None:
    broker = world.broker
    wait_for("make_world's rows purged", lambda: state_rows(broker)["uploads"] == 0)
    baseline_objects = token_objects(broker)
    baseline = state_rows(broker)
    assert baseline == {"sessions": 0, "uploads": 0, "leases": 0, "datasets": 1}
    # sustained load: releases (sessions, leases), challenges never answered, and uploads
    # opened and never committed (each leaves an EC key pair on the token)
    started = time.monotonic()
    for node in ("n1", "n2"):
        with broker.key_client(node, world.job_id) as client:
            client.fetch_dek(tenant_id="acme", dataset_id="ds1", key_version=1).dek.zeroize()
    nodes = {n: pb_grpc.NodeServiceStub(open_channel(broker.endpoint("node", n)))
             for n in ("n1", "n2")}
    for i in range(40):
        node = "n1" if i % 2 else "n2"
        nodes[node].Challenge(pb.ChallengeRequest(node_id=node, job_id="j"), timeout=10)
    tenant = pb_grpc.TenantServiceStub(open_channel(broker.endpoint("tenant", "acme")))
    for i in range(30):
        tenant.OpenUpload(pb.OpenUploadRequest(tenant_id="acme", dataset_id=f"never-{i}",
                                               key_version=1, share_count=1), timeout=10)
    loaded, loaded_objects = state_rows(broker), token_objects(broker)
    if time.monotonic() - started < min(TTL_MS.values()) / 1000:
        # nothing can have expired yet: every row and key pair is there
        assert loaded["uploads"] == 30 and loaded["sessions"] >= 42 and loaded["leases"] == 2
        assert loaded_objects >= baseline_objects + 60  # 30 import key pairs
    else:
        # a loaded machine took longer than a TTL: the janitor may have begun; the last
        # upload is still far from its expiry
        assert 0 < loaded["uploads"] <= 30 and loaded_objects >= baseline_objects
    # everything expires; the janitor purges it, the HSM objects first
    wait_for("state back to baseline", lambda: state_rows(broker) == baseline)
    assert token_objects(broker) == baseline_objects
    # and the broker still works
    with broker.key_client("n1", world.job_id) as client:
        client.fetch_dek(tenant_id="acme", dataset_id="ds1", key_version=1).dek.zeroize()


def test_a_purged_upload_is_not_found(world: World) -> None:
    tenant = pb_grpc.TenantServiceStub(open_channel(world.broker.endpoint("tenant", "acme")))
    opened = tenant.OpenUpload(pb.OpenUploadRequest(tenant_id="acme", dataset_id="late",
                                                    key_version=1, share_count=1), timeout=10)
    wait_for("the upload purged", lambda: state_rows(world.broker)["uploads"] == 0)
    with pytest.raises(grpc.RpcError) as info:
        tenant.CommitShare(pb.CommitShareRequest(tenant_id="acme", upload_id=opened.upload_id,
                                                 sealed_share=b"\x00" * 107), timeout=10)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
