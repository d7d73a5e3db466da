"""Pkcs11Hsm on a real SoftHSM2 token: what only a real token can show."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator

import pkcs11
import pytest
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11 import exceptions as p11e

from kms_broker import sealing
from kms_broker.hsm.interface import HsmUnavailable, KeyNotFound, ShareBinding, UnwrapFailed
from kms_broker.hsm.pkcs11_hsm import Pkcs11Hsm
from sealed.secrets import SecretBuffer
from tests.kms_broker.hsm_fixtures import (  # noqa: F401 - registers the fixtures
    SoftHsmToken,
    pkcs11_hsm_fixture,
    softhsm_config_fixture,
    softhsm_token_fixture,
)


@pytest.fixture
def inspector(softhsm_token: SoftHsmToken, pkcs11_hsm: Pkcs11Hsm) -> Iterator[object]:
    """An independent session on the same token, as an auditor would open one."""
    lib = pkcs11.lib(softhsm_token.module_path)
    session = lib.get_token(token_label=softhsm_token.label).open(rw=True)
    yield session
    session.close()


def _b(tenant: str, dataset: str = "ds") -> ShareBinding:
    return ShareBinding(tenant_id=tenant, dataset_id=dataset, key_version=1, share_index=0)


def _upload(hsm: Pkcs11Hsm, tenant: str, share: SecretBuffer) -> bytes:
    hsm.create_tenant_kek(tenant, 1)
    pub = hsm.create_import_key("imp-1")
    transcript = sealing.import_transcript(
        import_id="imp-1", tenant_id=tenant, dataset_id="ds", key_version=1, share_index=0,
        broker_id="b", import_public_key=pub,
    )
    wrapped = hsm.import_share(
        "imp-1", sealing.seal_share_to(pub, share, transcript), transcript, _b(tenant), 1
    )
    hsm.destroy_import_key("imp-1")
    return wrapped


def _seal(hsm: Pkcs11Hsm, wrapped: bytes, tenant: str) -> SecretBuffer:
    node_key, node_pub = sealing.generate_node_key()
    transcript = sealing.release_transcript(
        session_id=os.urandom(16), nonce=os.urandom(32), tenant_id=tenant, dataset_id="ds",
        key_version=1, broker_id="b", node_public_key=node_pub,
    )
    blob = hsm.seal_share(wrapped, _b(tenant), 1, node_pub, transcript)
    return sealing.open_sealed_share(node_key, blob, transcript)


def test_kek_is_non_extractable_and_sensitive_on_the_token(
    pkcs11_hsm: Pkcs11Hsm, inspector: pkcs11.Session
) -> None:
    pkcs11_hsm.create_tenant_kek("tenant-a", 1)
    kek = inspector.get_key(label="tenant/tenant-a/kek/v1", object_class=ObjectClass.SECRET_KEY)
    assert kek[Attribute.KEY_TYPE] == KeyType.AES
    assert kek[Attribute.VALUE_LEN] == 32
    assert kek[Attribute.EXTRACTABLE] is False
    assert kek[Attribute.SENSITIVE] is True
    assert kek[Attribute.NEVER_EXTRACTABLE] is True
    assert kek[Attribute.ALWAYS_SENSITIVE] is True
    assert kek[Attribute.TOKEN] is True
    assert kek[Attribute.ENCRYPT] is False and kek[Attribute.DECRYPT] is False
    # bound wrapping: the KEK only derives per-binding keys, it never wraps a share itself
    assert kek[Attribute.WRAP] is False and kek[Attribute.UNWRAP] is False
    assert kek[Attribute.DERIVE] is True
    with pytest.raises(p11e.AttributeSensitive):
        kek[Attribute.VALUE]
    other = inspector.generate_key(KeyType.AES, 256, template={Attribute.WRAP: True})
    with pytest.raises(p11e.KeyUnextractable):
        other.wrap_key(kek, mechanism=Mechanism.AES_KEY_WRAP_PAD)
    assert pkcs11_hsm.kek_attributes("tenant-a", 1)["extractable"] is False


def test_signing_and_import_private_keys_stay_in_the_token(
    pkcs11_hsm: Pkcs11Hsm, inspector: pkcs11.Session
) -> None:
    pkcs11_hsm.signing_public_key()
    pkcs11_hsm.create_import_key("imp-7")
    for label in ("broker/signing", "import/imp-7"):
        key = inspector.get_key(label=label, object_class=ObjectClass.PRIVATE_KEY)
        assert key[Attribute.EXTRACTABLE] is False
        assert key[Attribute.SENSITIVE] is True
        with pytest.raises(p11e.AttributeSensitive):
            key[Attribute.VALUE]


def test_no_share_object_outlives_an_operation(
    pkcs11_hsm: Pkcs11Hsm, inspector: pkcs11.Session
) -> None:
    share = SecretBuffer.random(32)
    wrapped = _upload(pkcs11_hsm, "tenant-a", share)
    for _ in range(5):
        assert _seal(pkcs11_hsm, wrapped, "tenant-a").equals(share)
    secrets = list(inspector.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY}))
    assert [str(k.label) for k in secrets] == ["tenant/tenant-a/kek/v1"]
    privates = list(inspector.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY}))
    assert [str(k.label) for k in privates] == []  # import key destroyed, no ephemerals left


def test_concurrent_sealing_from_many_threads(pkcs11_hsm: Pkcs11Hsm) -> None:
    share = SecretBuffer.random(32)
    wrapped = _upload(pkcs11_hsm, "tenant-a", share)
    errors: list[BaseException] = []
    results: list[bool] = []

    def worker() -> None:
        try:
            for _ in range(10):
                results.append(_seal(pkcs11_hsm, wrapped, "tenant-a").equals(share))
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert results == [True] * 80


def test_wrong_pin_or_label_is_unavailable_not_a_crash(softhsm_token: SoftHsmToken) -> None:
    with pytest.raises(HsmUnavailable, match="login refused"):
        Pkcs11Hsm(softhsm_token.module_path, softhsm_token.label, "wrong-pin-0000")
    with pytest.raises(HsmUnavailable, match="no PKCS#11 token"):
        Pkcs11Hsm(softhsm_token.module_path, "no-such-token", softhsm_token.user_pin)
    hsm = softhsm_token.open_hsm()  # the token itself is fine
    hsm.health()
    hsm.close()


def test_shred_through_another_instance_is_seen_at_once(softhsm_token: SoftHsmToken) -> None:
    first = softhsm_token.open_hsm()
    share = SecretBuffer.random(32)
    wrapped = _upload(first, "tenant-a", share)
    assert _seal(first, wrapped, "tenant-a").equals(share)  # KEK handle now cached
    second = softhsm_token.open_hsm()
    assert second.destroy_tenant_keks("tenant-a") == 1
    second.close()  # also logs the module out: the first instance must log in again
    with pytest.raises(KeyNotFound):
        _seal(first, wrapped, "tenant-a")
    first.create_tenant_kek("tenant-b", 1)
    assert first.has_tenant_kek("tenant-b", 1)
    first.close()


def test_outage_during_use_recovers_with_the_same_object(softhsm_token: SoftHsmToken) -> None:
    hsm = softhsm_token.open_hsm()
    share = SecretBuffer.random(32)
    wrapped = _upload(hsm, "tenant-a", share)
    with softhsm_token.outage():
        for _ in range(3):  # stays unavailable, never a KeyNotFound
            with pytest.raises(HsmUnavailable):
                _seal(hsm, wrapped, "tenant-a")
            with pytest.raises(HsmUnavailable):
                hsm.destroy_tenant_keks("tenant-a")
    assert _seal(hsm, wrapped, "tenant-a").equals(share)
    hsm.close()
    with pytest.raises(HsmUnavailable, match="closed"):
        hsm.health()


def test_legacy_unbound_share_is_refused_and_migrated_by_rotation(
    pkcs11_hsm: Pkcs11Hsm, inspector: pkcs11.Session
) -> None:
    """A KEK from before bound wrapping (wrap/unwrap, no derive) and a share wrapped directly
    under it, as an old token holds them: release refuses it (never unbound), a KEK rotation
    re-wraps it bound under the new KEK, after which it releases."""
    from kms_broker.hsm.interface import LegacyWrapping

    legacy = inspector.generate_key(
        KeyType.AES, 256, id=b"tenant/tenant-old", label="tenant/tenant-old/kek/v1", store=True,
        template={Attribute.WRAP: True, Attribute.UNWRAP: True, Attribute.DERIVE: False,
                  Attribute.ENCRYPT: False, Attribute.DECRYPT: False, Attribute.PRIVATE: True,
                  Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False},
    )
    value = os.urandom(32)
    share = inspector.create_object({
        Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.GENERIC_SECRET,
        Attribute.TOKEN: False, Attribute.VALUE: value, Attribute.EXTRACTABLE: True,
    })
    wrapped = bytes(legacy.wrap_key(share, mechanism=Mechanism.AES_KEY_WRAP_PAD))
    binding = _b("tenant-old")
    node_key, node_pub = sealing.generate_node_key()
    transcript = sealing.release_transcript(
        session_id=os.urandom(16), nonce=os.urandom(32), tenant_id="tenant-old",
        dataset_id="ds", key_version=1, broker_id="b", node_public_key=node_pub,
    )
    with pytest.raises(LegacyWrapping):
        pkcs11_hsm.seal_share(wrapped, binding, 1, node_pub, transcript)
    pkcs11_hsm.create_tenant_kek("tenant-old", 2)
    bound = pkcs11_hsm.rewrap_share(wrapped, binding, 1, 2)
    with pytest.raises(LegacyWrapping):  # nothing new is ever wrapped under a legacy KEK
        pkcs11_hsm.rewrap_share(bound, binding, 2, 1)
    blob = pkcs11_hsm.seal_share(bound, binding, 2, node_pub, transcript)
    with sealing.open_sealed_share(node_key, blob, transcript) as opened, opened.view() as got:
        assert bytes(got) == value
    with pytest.raises(UnwrapFailed):
        pkcs11_hsm.seal_share(bound, _b("tenant-old", "other"), 2, node_pub, transcript)
