"""One contract for every Hsm backend: FakeHsm and Pkcs11Hsm on a real SoftHSM2 token."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from kms_broker import sealing
from kms_broker.hsm.fake import FakeHsm
from kms_broker.hsm.interface import (
    Hsm,
    HsmUnavailable,
    KeyNotFound,
    ShareBinding,
    UnwrapFailed,
)
from sealed.secrets import SecretBuffer
from tests.kms_broker.hsm_fixtures import (  # noqa: F401 - registers the fixtures
    softhsm_config_fixture,
    softhsm_token_fixture,
)


@dataclass
class Backend:
    hsm: Hsm
    outage: Callable[[], contextlib.AbstractContextManager[None]]


@contextlib.contextmanager
def _fake_outage(hsm: FakeHsm) -> Iterator[None]:
    hsm.available = False
    try:
        yield
    finally:
        hsm.available = True


@pytest.fixture(params=["fake", "softhsm"])
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    if request.param == "fake":
        hsm = FakeHsm()
        yield Backend(hsm=hsm, outage=lambda: _fake_outage(hsm))
    else:
        token = request.getfixturevalue("softhsm_token")
        hsm = token.open_hsm()
        yield Backend(hsm=hsm, outage=token.outage)
    hsm.close()


BROKER = "broker-1"


def _b(tenant: str, dataset: str = "ds", *, key_version: int = 1, index: int = 0) -> ShareBinding:
    return ShareBinding(tenant_id=tenant, dataset_id=dataset, key_version=key_version,
                        share_index=index)


def _upload(hsm: Hsm, tenant: str, dataset: str, share: SecretBuffer, *, version: int = 1,
            import_id: str = "imp-1") -> bytes:
    """What the tenant CLI and the broker do together: returns the wrapped share."""
    if not hsm.has_tenant_kek(tenant, version):
        hsm.create_tenant_kek(tenant, version)
    import_pub = hsm.create_import_key(import_id)
    transcript = sealing.import_transcript(
        import_id=import_id, tenant_id=tenant, dataset_id=dataset, key_version=1,
        share_index=0, broker_id=BROKER, import_public_key=import_pub,
    )
    sealed = sealing.seal_share_to(import_pub, share, transcript)
    wrapped = hsm.import_share(import_id, sealed, transcript, _b(tenant, dataset), version)
    hsm.destroy_import_key(import_id)
    return wrapped


def _release_transcript(tenant: str, dataset: str, node_pub: bytes, nonce: bytes) -> bytes:
    return sealing.release_transcript(
        session_id=b"session-1", nonce=nonce, tenant_id=tenant, dataset_id=dataset,
        key_version=1, broker_id=BROKER, node_public_key=node_pub,
    )


def _release_and_open(hsm: Hsm, wrapped: bytes, tenant: str, version: int) -> SecretBuffer:
    node_key, node_pub = sealing.generate_node_key()
    transcript = _release_transcript(tenant, "ds", node_pub, os.urandom(32))
    blob = hsm.seal_share(wrapped, _b(tenant), version, node_pub, transcript)
    return sealing.open_sealed_share(node_key, blob, transcript)


def test_upload_release_open_round_trip(backend: Backend) -> None:
    hsm = backend.hsm
    share = SecretBuffer.random(32)
    wrapped = _upload(hsm, "tenant-a", "ds", share)
    assert len(wrapped) == 40
    with share.view() as s:
        assert bytes(s) not in wrapped
    node_key, node_pub = sealing.generate_node_key()
    transcript = _release_transcript("tenant-a", "ds", node_pub, os.urandom(32))
    blob = hsm.seal_share(wrapped, _b("tenant-a"), 1, node_pub, transcript)
    assert len(blob) == sealing.SEALED_BLOB_SIZE
    with share.view() as s:
        assert bytes(s) not in blob
    opened = sealing.open_sealed_share(node_key, blob, transcript)
    assert opened.equals(share)
    # a second sealing uses a fresh ephemeral key: different blob, same share
    blob2 = hsm.seal_share(wrapped, _b("tenant-a"), 1, node_pub, transcript)
    assert blob2 != blob
    assert sealing.open_sealed_share(node_key, blob2, transcript).equals(share)


def test_wrong_transcript_or_key_does_not_open(backend: Backend) -> None:
    hsm = backend.hsm
    share = SecretBuffer.random(32)
    wrapped = _upload(hsm, "tenant-a", "ds", share)
    node_key, node_pub = sealing.generate_node_key()
    nonce = os.urandom(32)
    transcript = _release_transcript("tenant-a", "ds", node_pub, nonce)
    blob = hsm.seal_share(wrapped, _b("tenant-a"), 1, node_pub, transcript)
    other_nonce = _release_transcript("tenant-a", "ds", node_pub, os.urandom(32))
    with pytest.raises(sealing.SealingError):
        sealing.open_sealed_share(node_key, blob, other_nonce)
    other_key, _ = sealing.generate_node_key()
    with pytest.raises(sealing.SealingError):
        sealing.open_sealed_share(other_key, blob, transcript)


def test_import_with_wrong_transcript_or_tampered_blob_fails(backend: Backend) -> None:
    hsm = backend.hsm
    hsm.create_tenant_kek("tenant-a", 1)
    pub = hsm.create_import_key("imp-9")
    good = sealing.import_transcript(
        import_id="imp-9", tenant_id="tenant-a", dataset_id="ds", key_version=1,
        share_index=0, broker_id=BROKER, import_public_key=pub,
    )
    share = SecretBuffer.random(32)
    sealed = sealing.seal_share_to(pub, share, good)
    bad = good[:-1] + bytes([good[-1] ^ 1])
    with pytest.raises(UnwrapFailed):
        hsm.import_share("imp-9", sealed, bad, _b("tenant-a"), 1)
    tampered = sealed[:-1] + bytes([sealed[-1] ^ 0x80])
    with pytest.raises(UnwrapFailed):
        hsm.import_share("imp-9", tampered, good, _b("tenant-a"), 1)
    # nothing was consumed: the genuine blob still imports
    wrapped = hsm.import_share("imp-9", sealed, good, _b("tenant-a"), 1)
    assert _release_and_open(hsm, wrapped, "tenant-a", 1).equals(share)


def test_share_of_tenant_b_does_not_unwrap_under_tenant_a(backend: Backend) -> None:
    hsm = backend.hsm
    share_a, share_b = SecretBuffer.random(32), SecretBuffer.random(32)
    wrapped_a = _upload(hsm, "tenant-a", "ds", share_a, import_id="imp-a")
    wrapped_b = _upload(hsm, "tenant-b", "ds", share_b, import_id="imp-b")
    _, node_pub = sealing.generate_node_key()
    transcript = _release_transcript("tenant-a", "ds", node_pub, os.urandom(32))
    with pytest.raises(UnwrapFailed):
        hsm.seal_share(wrapped_b, _b("tenant-a"), 1, node_pub, transcript)
    hsm.create_tenant_kek("tenant-a", 2)
    with pytest.raises(UnwrapFailed):
        hsm.rewrap_share(wrapped_b, _b("tenant-a"), 1, 2)
    flipped = bytes([wrapped_a[0] ^ 1]) + wrapped_a[1:]
    with pytest.raises(UnwrapFailed):
        hsm.seal_share(flipped, _b("tenant-a"), 1, node_pub, transcript)
    # the legitimate share is unaffected
    assert _release_and_open(hsm, wrapped_a, "tenant-a", 1).equals(share_a)


def test_rotation_then_shred(backend: Backend) -> None:
    hsm = backend.hsm
    share = SecretBuffer.random(32)
    wrapped_v1 = _upload(hsm, "tenant-a", "ds", share)
    hsm.create_tenant_kek("tenant-a", 2)
    wrapped_v2 = hsm.rewrap_share(wrapped_v1, _b("tenant-a"), 1, 2)
    assert wrapped_v2 != wrapped_v1
    assert _release_and_open(hsm, wrapped_v2, "tenant-a", 2).equals(share)
    # v2 blob is not a v1 blob, and the old v1 blob keeps working until the KEK is destroyed
    _, node_pub = sealing.generate_node_key()
    transcript = _release_transcript("tenant-a", "ds", node_pub, os.urandom(32))
    with pytest.raises(UnwrapFailed):
        hsm.seal_share(wrapped_v2, _b("tenant-a"), 1, node_pub, transcript)
    assert _release_and_open(hsm, wrapped_v1, "tenant-a", 1).equals(share)

    survivor = _upload(hsm, "tenant-b", "ds", SecretBuffer.random(32), import_id="imp-b")
    assert hsm.destroy_tenant_keks("tenant-a") == 2
    assert not hsm.has_tenant_kek("tenant-a", 1)
    assert not hsm.has_tenant_kek("tenant-a", 2)
    for wrapped, version in ((wrapped_v1, 1), (wrapped_v2, 2)):
        with pytest.raises(KeyNotFound):
            hsm.seal_share(wrapped, _b("tenant-a"), version, node_pub, transcript)
    with pytest.raises(KeyNotFound):
        hsm.rewrap_share(wrapped_v1, _b("tenant-a"), 1, 2)
    assert hsm.destroy_tenant_keks("tenant-a") == 0
    assert hsm.has_tenant_kek("tenant-b", 1)
    _release_and_open(hsm, survivor, "tenant-b", 1)


def test_import_key_lifecycle(backend: Backend) -> None:
    hsm = backend.hsm
    hsm.create_tenant_kek("tenant-a", 1)
    pub = hsm.create_import_key("imp-1")
    sealing.decode_public_key(pub)
    assert hsm.create_import_key("imp-1") == pub  # idempotent
    assert hsm.create_import_key("imp-2") != pub
    transcript = sealing.import_transcript(
        import_id="imp-1", tenant_id="tenant-a", dataset_id="ds", key_version=1,
        share_index=0, broker_id=BROKER, import_public_key=pub,
    )
    sealed = sealing.seal_share_to(pub, SecretBuffer.random(32), transcript)
    hsm.destroy_import_key("imp-1")
    with pytest.raises(KeyNotFound):
        hsm.import_share("imp-1", sealed, transcript, _b("tenant-a"), 1)
    with pytest.raises(KeyNotFound):
        hsm.destroy_import_key("imp-1")
    with pytest.raises(KeyNotFound):
        hsm.import_share("imp-2", sealed, transcript, _b("tenant-unknown"), 1)


def test_bad_input_is_rejected_before_the_hsm(backend: Backend) -> None:
    hsm = backend.hsm
    share = SecretBuffer.random(32)
    wrapped = _upload(hsm, "tenant-a", "ds", share)
    _, node_pub = sealing.generate_node_key()
    transcript = _release_transcript("tenant-a", "ds", node_pub, os.urandom(32))
    not_on_curve = b"\x04" + b"\x01" * 64
    with pytest.raises(ValueError, match="P-256"):
        hsm.seal_share(wrapped, _b("tenant-a"), 1, not_on_curve, transcript)
    with pytest.raises(ValueError, match="40 bytes"):
        hsm.seal_share(wrapped + b"\x00", _b("tenant-a"), 1, node_pub, transcript)
    with pytest.raises(ValueError, match="transcript"):
        hsm.seal_share(wrapped, _b("tenant-a"), 1, node_pub, b"x" * 5000)
    with pytest.raises(ValueError, match="tenant id"):
        hsm.seal_share(wrapped, _b("../tenant-a"), 1, node_pub, transcript)
    with pytest.raises(ValueError, match="version"):
        hsm.create_tenant_kek("tenant-a", 0)
    with pytest.raises(ValueError, match="sealed blob"):
        hsm.import_share("imp-1", b"\x00" * 10, transcript, _b("tenant-a"), 1)
    with pytest.raises(TypeError):
        hsm.sign("text")  # type: ignore[arg-type]
    # nothing changed: the share still releases
    assert _release_and_open(hsm, wrapped, "tenant-a", 1).equals(share)
    assert not hsm.has_tenant_kek("tenant-a", 2)


def test_signatures_verify_with_cryptography(backend: Backend) -> None:
    hsm = backend.hsm
    pub = hsm.signing_public_key()
    assert hsm.signing_public_key() == pub  # one stable key
    key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), pub)
    data = b"audit checkpoint 42"
    signature = hsm.sign(data)
    key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
    with pytest.raises(InvalidSignature):
        key.verify(signature, data + b"!", ec.ECDSA(hashes.SHA256()))


def test_unavailable_then_recovers_without_reconstruction(backend: Backend) -> None:
    hsm = backend.hsm
    share = SecretBuffer.random(32)
    wrapped = _upload(hsm, "tenant-a", "ds", share)
    hsm.health()
    _, node_pub = sealing.generate_node_key()
    transcript = _release_transcript("tenant-a", "ds", node_pub, os.urandom(32))
    with backend.outage():
        with pytest.raises(HsmUnavailable):
            hsm.seal_share(wrapped, _b("tenant-a"), 1, node_pub, transcript)
        with pytest.raises(HsmUnavailable):
            hsm.health()
        with pytest.raises(HsmUnavailable):
            hsm.sign(b"x")
        # an outage is never reported as a missing key
        with pytest.raises(HsmUnavailable):
            hsm.has_tenant_kek("tenant-a", 1)
    hsm.health()
    assert hsm.has_tenant_kek("tenant-a", 1)
    assert _release_and_open(hsm, wrapped, "tenant-a", 1).equals(share)


@pytest.mark.parametrize("first_call", ["seal", "sign", "health", "has_kek", "create_kek",
                                        "rewrap", "import_key"])
def test_one_failed_call_during_an_outage_then_recovery(backend: Backend, first_call: str) -> None:
    """Whatever single call meets the outage first, the next call after it works again."""
    hsm = backend.hsm
    share = SecretBuffer.random(32)
    wrapped = _upload(hsm, "tenant-a", "ds", share)
    hsm.create_tenant_kek("tenant-a", 2)
    assert _release_and_open(hsm, wrapped, "tenant-a", 1).equals(share)  # handles cached
    hsm.sign(b"warm")
    _, node_pub = sealing.generate_node_key()
    transcript = _release_transcript("tenant-a", "ds", node_pub, os.urandom(32))
    calls: dict[str, Callable[[], object]] = {
        "seal": lambda: hsm.seal_share(wrapped, _b("tenant-a"), 1, node_pub, transcript),
        "sign": lambda: hsm.sign(b"x"),
        "health": hsm.health,
        "has_kek": lambda: hsm.has_tenant_kek("tenant-a", 1),
        "create_kek": lambda: hsm.create_tenant_kek("tenant-c", 1),
        "rewrap": lambda: hsm.rewrap_share(wrapped, _b("tenant-a"), 1, 2),
        "import_key": lambda: hsm.create_import_key("imp-x"),
    }
    with backend.outage(), pytest.raises(HsmUnavailable):
        calls[first_call]()
    assert _release_and_open(hsm, wrapped, "tenant-a", 1).equals(share)
    calls[first_call]()


def test_wrapped_share_is_bound_to_its_dataset_version_and_index(backend: Backend) -> None:
    """Issue 11 item 9: a wrapped share moved to another binding of the same tenant fails
    the integrity check inside the HSM (not a row check): seal and rewrap both refuse it."""
    hsm = backend.hsm
    share_1, share_2 = SecretBuffer.random(32), SecretBuffer.random(32)
    wrapped_1 = _upload(hsm, "tenant-a", "ds1", share_1, import_id="imp-1")
    wrapped_2 = _upload(hsm, "tenant-a", "ds2", share_2, import_id="imp-2")
    hsm.create_tenant_kek("tenant-a", 2)
    node_key, node_pub = sealing.generate_node_key()
    transcript = _release_transcript("tenant-a", "ds1", node_pub, os.urandom(32))
    for wrong in (_b("tenant-a", "ds2"), _b("tenant-a", "ds1", key_version=2),
                  _b("tenant-a", "ds1", index=1)):
        with pytest.raises(UnwrapFailed):
            hsm.seal_share(wrapped_1, wrong, 1, node_pub, transcript)
        with pytest.raises(UnwrapFailed):
            hsm.rewrap_share(wrapped_1, wrong, 1, 2)
    with pytest.raises(UnwrapFailed):  # ds2's row swapped into ds1's place
        hsm.seal_share(wrapped_2, _b("tenant-a", "ds1"), 1, node_pub, transcript)
    blob = hsm.seal_share(wrapped_1, _b("tenant-a", "ds1"), 1, node_pub, transcript)
    assert sealing.open_sealed_share(node_key, blob, transcript).equals(share_1)
    # a rewrapped share stays bound to the same place
    wrapped_1v2 = hsm.rewrap_share(wrapped_1, _b("tenant-a", "ds1"), 1, 2)
    with pytest.raises(UnwrapFailed):
        hsm.seal_share(wrapped_1v2, _b("tenant-a", "ds2"), 2, node_pub, transcript)
    blob = hsm.seal_share(wrapped_1v2, _b("tenant-a", "ds1"), 2, node_pub, transcript)
    assert sealing.open_sealed_share(node_key, blob, transcript).equals(share_1)


def test_audit_anchor_is_kept_and_never_moves_back(backend: Backend) -> None:
    hsm = backend.hsm
    assert hsm.audit_anchor() is None
    hsm.set_audit_anchor(5, b"\x05" * 32)
    assert hsm.audit_anchor() == (5, b"\x05" * 32)
    hsm.set_audit_anchor(3, b"\x03" * 32)  # older: ignored
    assert hsm.audit_anchor() == (5, b"\x05" * 32)
    hsm.set_audit_anchor(9, b"\x09" * 32)
    assert hsm.audit_anchor() == (9, b"\x09" * 32)
    with pytest.raises(ValueError):
        hsm.set_audit_anchor(10, b"short")
