"""The node learns the dataset's manifest from the brokers, before any key is released.

A Challenge that names the dataset is answered with the manifest the tenant's upload
registered (and its key version), for a node that may ask for the dataset; a node without a
grant, or enrolled for another tenant, learns nothing (no oracle). :meth:`KeyClient.fetch_dek`
resolves the job's dataset from those answers and runs the caller's check before making any
evidence: a check that fails, or a manifest that does not match the record, leaves no release
and no lease at the broker. The production ``kms-broker serve``, TPM quotes from swtpm, nodes
enrolled with ``kms-broker node enrol``, mTLS, SoftHSM2.
"""

from __future__ import annotations

import grpc
import pytest

from kms_broker._proto.kmsbroker.v1 import broker_pb2 as pb
from kms_broker.client import DatasetRef, DatasetRefError
from tests.kms_broker.conftest import World, enrol, make_world

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def evidence() -> str:
    return "tpm2"  # production `kms-broker serve`, swtpm quotes, `kms-broker node enrol`


@pytest.fixture(scope="module")
def world(broker_factory, tmp_path_factory) -> World:
    return make_world(broker_factory("manifest"), tmp_path_factory.mktemp("manifest"),
                      nodes=("n1", "n2"))


def _releases(world: World) -> list[dict]:
    return [r for r in world.broker.audit()
            if r["event"] == "release" and r["outcome"] == "allowed"]


def _challenge(world: World, node: str, job: str, dataset: str) -> pb.ChallengeResponse:
    stub = world.broker.node_stub(node)
    return stub.Challenge(pb.ChallengeRequest(node_id=node, job_id=job, tenant_id="acme",
                                              dataset_id=dataset), timeout=10)


def test_challenge_names_the_registered_manifest_only_to_a_granted_job(world: World) -> None:
    granted = _challenge(world, "n1", world.job_id, world.dataset_id)
    assert (granted.manifest_name, granted.manifest_key_version) == (world.manifest_name, 1)
    assert granted.manifest_name.startswith("manifests/") and granted.nonce
    # another job (no grant), an unknown dataset: a session, but no manifest and no hint why
    for job, dataset in (("job-without-grant", world.dataset_id), (world.job_id, "nope")):
        other = _challenge(world, "n1", job, dataset)
        assert other.session_id and (other.manifest_name, other.manifest_key_version) == ("", 0)
    # a challenge that names no dataset is as before
    plain = world.broker.node_stub("n1").Challenge(
        pb.ChallengeRequest(node_id="n1", job_id=world.job_id), timeout=10)
    assert plain.session_id and plain.manifest_name == ""


def test_a_node_of_another_tenant_is_refused_naming_its_scope_and_learns_no_manifest(
        world: World) -> None:
    enrol(world.broker, "n3", tenant_scope="globex")
    with pytest.raises(grpc.RpcError) as refused:
        _challenge(world, "n3", world.job_id, world.dataset_id)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "node.scope: node is enrolled for tenant globex only" in refused.value.details()
    assert world.manifest_name not in refused.value.details()
    # the same whether or not the dataset exists: nothing about datasets or grants
    with pytest.raises(grpc.RpcError) as other:
        _challenge(world, "n3", world.job_id, "no-such-dataset")
    assert other.value.details() == refused.value.details()


def test_fetch_dek_without_version_or_manifest_takes_the_record(world: World) -> None:
    seen: list[DatasetRef] = []
    before = len(_releases(world))
    with world.broker.key_client("n1", world.job_id) as client:
        released = client.fetch_dek(tenant_id="acme", dataset_id=world.dataset_id,
                                     check_dataset=seen.append)
        with released.dek:
            pass
    assert seen == [DatasetRef("acme", world.dataset_id, 1, world.manifest_name)]
    assert (released.key_version, released.manifest_name) == (1, world.manifest_name)
    assert len(_releases(world)) == before + 1


class StoreSaysNo(Exception):
    pass


def test_a_failed_check_stops_before_evidence_and_release(world: World) -> None:
    evidence_calls: list[bytes] = []
    base = world.broker.evidence("n2")

    def counting(report_data: bytes) -> tuple[str, bytes]:
        evidence_calls.append(report_data)
        return base(report_data)

    def check(ref: DatasetRef) -> None:
        raise StoreSaysNo(ref.manifest_name)

    before = len(_releases(world))
    with world.broker.key_client("n2", world.job_id, evidence_for=counting) as client, \
            pytest.raises(StoreSaysNo, match=world.manifest_name):
        client.fetch_dek(tenant_id="acme", dataset_id=world.dataset_id, check_dataset=check)
    assert evidence_calls == [] and len(_releases(world)) == before


def test_a_job_naming_another_manifest_is_refused_before_release(world: World) -> None:
    before = len(_releases(world))
    wrong = "manifests/" + "0" * 32
    with world.broker.key_client("n2", world.job_id) as client:
        with pytest.raises(DatasetRefError, match="does not match the manifest") as err:
            client.fetch_dek(tenant_id="acme", dataset_id=world.dataset_id, key_version=1,
                             manifest_name=wrong)
        assert err.value.code == "FAILED_PRECONDITION"
        assert wrong in str(err.value) and world.manifest_name in str(err.value)
        # the matching name (and no key version) goes through
        released = client.fetch_dek(tenant_id="acme", dataset_id=world.dataset_id,
                                    manifest_name=world.manifest_name)
        with released.dek:
            pass
    assert len(_releases(world)) == before + 1


def test_a_job_without_a_grant_learns_no_key_version(world: World) -> None:
    with world.broker.key_client("n2", "job-without-grant") as client, \
            pytest.raises(DatasetRefError, match=r"name dataset\.key_version"):
        client.fetch_dek(tenant_id="acme", dataset_id=world.dataset_id)
