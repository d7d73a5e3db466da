"""The tenant and operator CLIs on two real broker replicas (one PostgreSQL database, one
SoftHSM token): a share holder given as a replica set (``--broker 'A|B'``) answers through
either replica, and keeps answering after ``kill -9`` of the replica that answered first;
the node's key client, naming only the dataset, learns the manifest from the survivor."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import pytest

from compose.postgres import LocalPostgres
from tests.kms_broker.conftest import BrokerProc, World
from tests.kms_broker.test_cli_json import as_json
from tests.kms_broker.test_replicas_pg import replica_pair

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pair(broker_factory, pg: LocalPostgres,
         tmp_path_factory) -> Iterator[tuple[World, BrokerProc, BrokerProc]]:
    with replica_pair(broker_factory, pg, tmp_path_factory, "clirep") as replicas:
        yield replicas


def _tls(broker: BrokerProc, role: str, ident: str) -> list[str]:
    root = broker.pki.root
    return ["--ca", str(broker.pki.ca_path), "--cert", str(root / f"{role}-{ident}.pem"),
            "--key", str(root / f"{role}-{ident}.key"), "--server-name", "localhost"]


def test_cli_on_a_replica_set_survives_kill_9_of_one_replica(pair) -> None:
    world, a, b = pair
    both = f"{a.address}|{b.address}"
    tenant = ["--broker", both, "--tenant", world.tenant_id, *_tls(a, "tenant", "acme")]
    expected = [(both, world.dataset_id, world.manifest_name)]

    def datasets() -> list[tuple[str, str, str]]:
        listed = as_json("dataset", "list", *tenant)
        return [(d["broker"], d["dataset"], d["manifest"]) for d in listed["datasets"]]

    assert datasets() == expected
    os.kill(a.pid, signal.SIGKILL)
    a.proc.wait(timeout=30)
    assert datasets() == expected  # the first replica is gone: the second answers
    nodes = as_json("node", "list", "--broker", both, *_tls(a, "operator", "ops"))
    assert {n["broker"] for n in nodes["nodes"]} == {b.address}
    assert {"n1", "n2", "n3"} <= {n["node"] for n in nodes["nodes"]}
    # a node that names only the dataset learns its manifest from the survivor
    with b.key_client("n1", world.job_id) as client:
        released = client.fetch_dek(tenant_id=world.tenant_id, dataset_id=world.dataset_id)
        with released.dek:
            assert (released.key_version, released.manifest_name) == (1, world.manifest_name)
