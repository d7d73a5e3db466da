"""Who a tenant or node is cannot be changed by editing the broker's database.

The threat model lets an attacker write DB rows. Swapping a tenant's grant-signing key for
the attacker's own (then forging a grant with it), or a node's attestation key, would let a
release through without the tenant's grant or the node's TPM; each row carries the broker's
HSM signature over its identity fields, so every such edit is refused, audited, by a real
broker on real SoftHSM. Unit checks of the signature scheme come first.
"""

from __future__ import annotations

import time

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from kms_broker.domain.bindings import BindingVerifier, node_binding, tenant_binding
from kms_broker.domain.model import Node, Tenant
from kms_broker.grants import GrantDocument, sign_grant
from kms_broker.hsm.fake import FakeHsm
from kms_broker.rpc import PermissionDeniedError
from kms_broker.tenant import upload_dataset
from tests.kms_broker.conftest import World, enrol, make_world, records
from tests.kms_broker.verifiers import POLICY_YAML


def _raw(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def test_binding_signatures_cover_every_identity_field() -> None:
    hsm = FakeHsm()
    check = BindingVerifier(hsm.signing_public_key())
    key = b"k" * 32
    tenant = Tenant(tenant_id="acme", signing_public_key=key, kek_version=1,
                    binding_sig=hsm.sign(tenant_binding("acme", key)))
    assert check.tenant_ok(tenant) and check.tenant_ok(tenant)  # second answer memoised
    for edited in (Tenant(tenant_id="beta", signing_public_key=key, kek_version=1,
                          binding_sig=tenant.binding_sig),
                   Tenant(tenant_id="acme", signing_public_key=b"x" * 32, kek_version=1,
                          binding_sig=tenant.binding_sig),
                   Tenant(tenant_id="acme", signing_public_key=key, kek_version=1),
                   Tenant(tenant_id="acme", signing_public_key=key, kek_version=1,
                          binding_sig=b"\x30\x06garbage")):
        assert not check.tenant_ok(edited), edited
    sig = hsm.sign(node_binding("n1", "acme", b"ak", b"ek"))
    node = Node(node_id="n1", tenant_scope="acme", ak_public=b"ak", ek_certificate=b"ek",
                binding_sig=sig)
    assert check.node_ok(node)
    for field, value in (("node_id", "n2"), ("tenant_scope", ""), ("ak_public", b"ak2"),
                         ("ek_certificate", b"ek2")):
        fields = {"node_id": "n1", "tenant_scope": "acme", "ak_public": b"ak",
                  "ek_certificate": b"ek", field: value}
        assert not check.node_ok(Node(**fields, binding_sig=sig)), field
    # a signature by another broker's key does not count
    assert not BindingVerifier(FakeHsm().signing_public_key()).node_ok(node)
    # the two kinds of binding are domain-separated
    assert tenant_binding("n1", b"ak") != node_binding("n1", "", b"ak", b"")


@pytest.fixture(scope="module")
def world(broker_factory, tmp_path_factory) -> World:
    w = make_world(broker_factory("bind"), tmp_path_factory.mktemp("bind"), nodes=("n1", "n2"))
    with w.broker.tenant("beta") as beta:
        beta.register()
        upload_dataset([beta], records(3), w.store, dataset_id="beta-ds")
        beta.put_policy(POLICY_YAML)
    return w


def _release(world: World, node: str, job: str) -> None:
    with world.broker.key_client(node, job) as client:
        client.fetch_dek(tenant_id="acme", dataset_id=world.dataset_id,
                         key_version=1).dek.zeroize()


def _last_denial(world: World) -> dict:
    return [r for r in world.broker.audit() if r["outcome"] == "denied"][-1]


def test_swapped_tenant_key_and_forged_grant_are_refused(world: World) -> None:
    _release(world, "n1", world.job_id)  # the untouched rows work
    attacker = Ed25519PrivateKey.generate()
    doc = GrantDocument(grant_id="g-evil", tenant_id="acme", dataset_id=world.dataset_id,
                        job_id="job-evil", policy_digest=world.policy_digest, max_nodes=8,
                        expires_unix_ms=int(time.time() * 1000) + 3_600_000)
    document, signature = sign_grant(doc, attacker)
    with world.broker.db() as db:
        (original,) = db.execute("SELECT signing_public_key FROM tenants WHERE tenant_id='acme'"
                                 ).fetchone()
        db.execute("UPDATE tenants SET signing_public_key=? WHERE tenant_id='acme'",
                   (_raw(attacker),))
        db.execute("INSERT INTO grants VALUES (?,?,?,?,?,?,?,?,?,?)",
                   ("g-evil", "acme", world.dataset_id, "job-evil", world.policy_digest, 8,
                    doc.expires_unix_ms, 0, document, signature))
    try:
        # the forged grant verifies under the swapped key, so only the binding stops it
        with pytest.raises(PermissionDeniedError) as info:
            _release(world, "n1", "job-evil")
        assert "state.tampered" in str(info.value) and "tenant acme" in str(info.value)
        assert "state.tampered" in _last_denial(world)["reason"]
        # the attacker's key cannot submit grants through the API either
        with world.broker.tenant("acme") as acme, pytest.raises(PermissionDeniedError) as info:
            acme.submit_grant(*sign_grant(GrantDocument(
                grant_id="g-evil2", tenant_id="acme", dataset_id=world.dataset_id,
                job_id="job-evil", policy_digest=world.policy_digest, max_nodes=8,
                expires_unix_ms=int(time.time() * 1000) + 3_600_000), attacker))
        assert "state.tampered" in str(info.value)
        # and the tenant's own, honest job is refused too while the row is wrong: fail closed
        with pytest.raises(PermissionDeniedError, match=r"state\.tampered"):
            _release(world, "n1", world.job_id)
    finally:
        with world.broker.db() as db:
            db.execute("UPDATE tenants SET signing_public_key=? WHERE tenant_id='acme'",
                       (original,))
    _release(world, "n1", world.job_id)  # the honest row works again


def test_another_tenants_key_and_signature_copied_in_are_refused(world: World) -> None:
    with world.broker.db() as db:
        acme = db.execute("SELECT signing_public_key, binding_sig FROM tenants "
                          "WHERE tenant_id='acme'").fetchone()
        beta = db.execute("SELECT signing_public_key, binding_sig FROM tenants "
                          "WHERE tenant_id='beta'").fetchone()
        db.execute("UPDATE tenants SET signing_public_key=?, binding_sig=? "
                   "WHERE tenant_id='acme'", beta)
    try:
        with pytest.raises(PermissionDeniedError, match=r"state\.tampered"):
            _release(world, "n1", world.job_id)
    finally:
        with world.broker.db() as db:
            db.execute("UPDATE tenants SET signing_public_key=?, binding_sig=? "
                       "WHERE tenant_id='acme'", acme)
    _release(world, "n1", world.job_id)


def test_edited_node_row_is_refused(world: World) -> None:
    enrol(world.broker, "n3")
    for column, value in (("ak_public", b"\x00\x23" + b"a" * 80), ("tenant_scope", "beta")):
        with world.broker.db() as db:
            (before,) = db.execute(f"SELECT {column} FROM nodes WHERE node_id='n2'").fetchone()
            db.execute(f"UPDATE nodes SET {column}=? WHERE node_id='n2'", (value,))
        try:
            with pytest.raises(PermissionDeniedError) as info:
                _release(world, "n2", world.job_id)
            assert "state.tampered" in str(info.value) and "node n2" in str(info.value)
            assert "state.tampered" in _last_denial(world)["reason"]
        finally:
            with world.broker.db() as db:
                db.execute(f"UPDATE nodes SET {column}=? WHERE node_id='n2'", (before,))
        _release(world, "n2", world.job_id)
    # a row copied from another node (its signature with it) does not fit this node id
    with world.broker.db() as db:
        sig = db.execute("SELECT binding_sig FROM nodes WHERE node_id='n3'").fetchone()[0]
        mine = db.execute("SELECT binding_sig FROM nodes WHERE node_id='n2'").fetchone()[0]
        db.execute("UPDATE nodes SET binding_sig=? WHERE node_id='n2'", (sig,))
    try:
        with pytest.raises(PermissionDeniedError, match=r"state\.tampered"):
            _release(world, "n2", world.job_id)
    finally:
        with world.broker.db() as db:
            db.execute("UPDATE nodes SET binding_sig=? WHERE node_id='n2'", (mine,))
