"""Issue 11 item 9: a wrapped share is bound inside the HSM to (tenant, dataset, key version,
share index).

Attack: the threat model lets an attacker write DB rows. Swapping the ``wrapped_share`` rows of
two datasets of one tenant used to make a release for one dataset hand out the other's share
(wrapping was under the tenant KEK alone). Now the share is wrapped under a key the HSM
derives from the KEK and the binding (``kms_broker.hsm.interface``), so the swapped blob fails
RFC 5649's integrity check inside the HSM: the release ends in DATA_LOSS and an audited
``error`` record, and no ``allowed`` release record. Real broker (``kms-broker serve``), real
SoftHSM, real gRPC with mTLS. Before the fix the same test sees the release allowed.
"""

from __future__ import annotations

import pytest

from kms_broker.rpc import BrokerRpcError
from kms_broker.tenant import upload_dataset
from tests.kms_broker.conftest import World, make_world, records

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def world(broker_factory, tmp_path_factory) -> World:
    w = make_world(broker_factory("bindshare"), tmp_path_factory.mktemp("bindshare"))
    with w.broker.tenant("acme") as acme:
        upload_dataset([acme], records(3), w.store, dataset_id="ds2")
    return w


def _release(world: World) -> None:
    with world.broker.key_client("n1", world.job_id) as client:
        client.fetch_dek(tenant_id="acme", dataset_id=world.dataset_id,
                         key_version=1).dek.zeroize()


def _share(world: World, dataset: str) -> bytes:
    with world.broker.db() as db:
        (blob,) = db.execute("SELECT wrapped_share FROM dataset_shares WHERE tenant_id='acme' "
                             "AND dataset_id=?", (dataset,)).fetchone()
    return blob


def _set_share(world: World, dataset: str, blob: bytes) -> None:
    with world.broker.db() as db:
        db.execute("UPDATE dataset_shares SET wrapped_share=? WHERE tenant_id='acme' "
                   "AND dataset_id=?", (blob, dataset))


def test_swapped_share_rows_fail_inside_the_hsm_and_are_audited(world: World) -> None:
    _release(world)  # the untouched rows release
    mine, other = _share(world, "ds1"), _share(world, "ds2")
    assert mine != other
    before = len(world.broker.audit())
    _set_share(world, "ds1", other)
    _set_share(world, "ds2", mine)
    try:
        with pytest.raises(BrokerRpcError) as info:
            _release(world)
        assert info.value.code == "DATA_LOSS", info.value
        new = [r for r in world.broker.audit()[before:] if r["event"] == "release"]
        assert [r["outcome"] for r in new] == ["allowed", "error"], new
        assert "failed to authenticate" in new[-1]["reason"]
        assert new[-1]["subject"] == "dataset:acme/ds1@v1"
    finally:
        _set_share(world, "ds1", mine)
        _set_share(world, "ds2", other)
    _release(world)  # the honest rows work again


def test_share_row_moved_to_another_share_index_does_not_unwrap(world: World) -> None:
    with world.broker.db() as db:
        (index,) = db.execute("SELECT share_index FROM datasets WHERE tenant_id='acme' "
                              "AND dataset_id='ds1'").fetchone()
        db.execute("UPDATE datasets SET share_index=? WHERE tenant_id='acme' "
                   "AND dataset_id='ds1'", (index + 1,))
    try:
        with pytest.raises(BrokerRpcError) as info:
            _release(world)
        assert info.value.code == "DATA_LOSS", info.value
    finally:
        with world.broker.db() as db:
            db.execute("UPDATE datasets SET share_index=? WHERE tenant_id='acme' "
                       "AND dataset_id='ds1'", (index,))
    _release(world)
