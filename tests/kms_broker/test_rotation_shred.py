"""Must-show 7: KEK rotation re-wraps shares under a new version and old ciphertexts still
decrypt; tenant shred destroys the KEK and every later release fails (cryptographically too).
Also n-of-n across two brokers, and upload rollback."""

from __future__ import annotations

import json
import time

import pytest

from kms_broker.client import KeyClient
from kms_broker.grants import GrantDocument
from kms_broker.rpc import NotFoundError, PermissionDeniedError
from kms_broker.tenant import upload_dataset
from sealed import DatasetReader, LocalDirStore
from tests.kms_broker.conftest import World, enrol, make_world, records
from tests.kms_broker.evidence import every_evidence  # noqa: F401 - fixture
from tests.kms_broker.test_e2e_release import _read_all
from tests.kms_broker.verifiers import POLICY_YAML

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def world(broker_factory, tmp_path_factory) -> World:
    return make_world(broker_factory("rot"), tmp_path_factory.mktemp("rot"))


def _fetch(world: World, tenant: str = "acme", dataset: str = "ds1"):
    with world.broker.key_client("n1", world.job_id) as client:
        return client.fetch_dek(tenant_id=tenant, dataset_id=dataset, key_version=1)


def _shares(world: World, tenant: str) -> list[tuple]:
    with world.broker.db() as db:
        return db.execute("SELECT dataset_id, kek_version, wrapped_share FROM dataset_shares "
                          "WHERE tenant_id=? ORDER BY dataset_id", (tenant,)).fetchall()


def test_kek_rotation_rewraps_and_old_ciphertexts_still_decrypt(world: World) -> None:
    before = _shares(world, "acme")
    assert [row[1] for row in before] == [1]
    with world.broker.tenant("acme") as acme:
        assert acme.rotate_kek() == (2, 1)
        datasets = acme.list_datasets()
    after = _shares(world, "acme")
    assert [row[1] for row in after] == [2] and after[0][2] != before[0][2]
    assert datasets[0].kek_version == 2 and list(datasets[0].key_versions) == [1]
    with _fetch(world).dek as dek:
        assert _read_all(world, dek) == [payload for _, payload in world.data]
    # the old wrapped blob no longer names the current KEK: putting it back fails
    with world.broker.db() as db:
        db.execute("UPDATE dataset_shares SET wrapped_share=? WHERE tenant_id='acme'",
                   (before[0][2],))
    try:
        with pytest.raises(Exception) as info:
            _fetch(world)
        assert getattr(info.value, "code", "") == "DATA_LOSS"
    finally:
        with world.broker.db() as db:
            db.execute("UPDATE dataset_shares SET wrapped_share=? WHERE tenant_id='acme'",
                       (after[0][2],))
    assert any(r["event"] == "rotate_kek" for r in world.broker.audit())


def test_shred_destroys_the_kek_and_every_release_fails(world: World, tmp_path) -> None:
    with world.broker.tenant("beta") as beta:
        beta.register()
        enrol(world.broker, "n1")
        upload_dataset([beta], records(3), LocalDirStore(tmp_path / "b"), dataset_id="bds")
        digest = beta.put_policy(POLICY_YAML)
        assert digest == world.policy_digest
        world.grant(beta, grant_id="g-beta", dataset_id="bds")
    _fetch(world, "beta", "bds").dek.zeroize()
    with world.broker.tenant("beta") as beta:
        assert beta.shred() >= 1
    with pytest.raises(PermissionDeniedError) as info:
        _fetch(world, "beta", "bds")
    assert "tenant.shredded" in str(info.value)
    # an operator who flips the status back still gets nothing: the KEK is gone
    with world.broker.db() as db:
        db.execute("UPDATE tenants SET status='active' WHERE tenant_id='beta'")
    with pytest.raises(NotFoundError) as info:
        _fetch(world, "beta", "bds")
    assert "does not exist" in str(info.value)
    # the other tenant is untouched
    _fetch(world).dek.zeroize()


def test_n_of_n_release_from_every_broker(broker_factory, tmp_path) -> None:
    b1, b2 = broker_factory("nn1"), broker_factory("nn2")
    key = None
    clients = []
    for b in (b1, b2):
        b.keys["acme"] = key or b.tenant("acme")._key  # same tenant key at both brokers
        key = b.keys["acme"]
        c = b.tenant("acme")
        c.register()
        enrol(b, "n1")
        clients.append(c)
    store = LocalDirStore(tmp_path / "store")
    data = records(5)
    result = upload_dataset(clients, data, store, dataset_id="split")
    assert result.holders == (b1.address, b2.address)
    digest = clients[0].put_policy(POLICY_YAML)
    for c in clients:
        c.put_policy(POLICY_YAML)
        c.create_grant(GrantDocument(grant_id="g-split", tenant_id="acme", dataset_id="split",
                                     job_id="job-split", policy_digest=digest, max_nodes=1,
                                     expires_unix_ms=int(time.time() * 1000) + 600_000))
    endpoints = [b1.endpoint("node", "n1"), b2.endpoint("node", "n1")]
    with KeyClient(endpoints, node_id="n1", job_id="job-split",
                   evidence_for=b1.evidence("n1")) as client:
        released = client.fetch_dek(tenant_id="acme", dataset_id="split", key_version=1)
    with released.dek as dek:
        reader = DatasetReader.open(store, result.manifest_name, dek=dek, tenant_id="acme",
                                    dataset_id="split", key_version=1)
        assert reader.share_holders == (b1.address, b2.address)
    assert len(released.leases) == 2
    # one broker alone is not enough
    with KeyClient(endpoints[:1], node_id="n1", job_id="job-split",
                   evidence_for=b1.evidence("n1")) as client, pytest.raises(Exception) as info:
        client.fetch_dek(tenant_id="acme", dataset_id="split", key_version=1)
    assert "configure every broker" in str(info.value)
    # a grant revoked at one share holder is enough to refuse the whole key
    clients[1].revoke_grant("g-split")
    with KeyClient(endpoints, node_id="n1", job_id="job-split",
                   evidence_for=b1.evidence("n1")) as client, pytest.raises(PermissionDeniedError):
        client.fetch_dek(tenant_id="acme", dataset_id="split", key_version=1)
    denials = [json.loads(r.canonical_json) for r in clients[1].tail_audit(1000)]
    assert denials[-1]["event"] == "release" and denials[-1]["outcome"] != "allowed"
    for c in clients:
        c.close()


def test_upload_rolls_back_when_a_broker_fails(broker_factory, tmp_path) -> None:
    from sealed import InputError

    b1, b2 = broker_factory("rb1"), broker_factory("rb2")
    b2.keys["acme"] = b1.tenant("acme")._key
    store = LocalDirStore(tmp_path / "store")
    with b1.tenant("acme") as good, b2.tenant("acme") as unregistered:
        good.register()
        # the second broker does not know the tenant: its OpenUpload fails after the first
        # broker already holds a committed share
        with pytest.raises(NotFoundError):
            upload_dataset([good, unregistered], records(3), store, dataset_id="rolled")
        assert good.list_datasets() == []
        # a failure while encrypting (no records) rolls back every broker too
        unregistered.register()
        with pytest.raises(InputError):
            upload_dataset([good, unregistered], [], store, dataset_id="rolled")
        assert good.list_datasets() == [] and unregistered.list_datasets() == []
    assert store.list() == []


def test_a_tenant_tails_only_its_own_audit_records(world: World) -> None:
    with world.broker.tenant("acme") as acme:
        records = [json.loads(r.canonical_json) for r in acme.tail_audit(1000)]
    assert records and all(
        r["actor"] == "tenant:acme" or r["subject"] == "tenant:acme"
        or r["subject"].startswith("dataset:acme/") for r in records)
    assert any(r["event"] == "release" for r in records)
    assert not any("beta" in r["subject"] or "beta" in r["actor"] for r in records)
