"""kms_broker.sealing: the client-side mirror of the HSM sealing construction."""

from __future__ import annotations

import hashlib
import struct

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.keywrap import aes_key_unwrap_with_padding

from kms_broker import sealing
from sealed.secrets import SecretBuffer

TRANSCRIPT = b"some transcript"


def _pair() -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    return sealing.generate_node_key()


def test_round_trip_and_blob_layout() -> None:
    key, pub = _pair()
    assert len(pub) == 65 and pub[0] == 4
    share = SecretBuffer.random(32)
    blob = sealing.seal_share_to(pub, share, TRANSCRIPT)
    assert len(blob) == sealing.SEALED_BLOB_SIZE == 107
    assert blob[:2] == b"\x00\x41" and blob[2] == 0x04
    opened = sealing.open_sealed_share(key, blob, TRANSCRIPT)
    assert isinstance(opened, SecretBuffer) and opened.equals(share)


def test_construction_matches_an_independent_computation() -> None:
    """Recompute Z, K and the unwrap by hand from the documented formula."""
    key, pub = _pair()
    share = SecretBuffer.random(32)
    blob = sealing.seal_share_to(pub, share, TRANSCRIPT)
    (n,) = struct.unpack(">H", blob[:2])
    eph = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), blob[2 : 2 + n])
    z = key.exchange(ec.ECDH(), eph)
    enc = Cipher(algorithms.AES(z), modes.ECB()).encryptor()
    k = enc.update(hashlib.sha256(TRANSCRIPT).digest()) + enc.finalize()
    raw = aes_key_unwrap_with_padding(k, blob[2 + n :])
    with share.view() as s:
        assert raw == bytes(s)


@pytest.mark.parametrize("where", [0, 1, 2, 40, 66, 67, 80, 106])
def test_any_modified_byte_fails(where: int) -> None:
    key, pub = _pair()
    blob = bytearray(sealing.seal_share_to(pub, SecretBuffer.random(32), TRANSCRIPT))
    blob[where] ^= 0x01
    # a broken length or off-curve ephemeral key is malformed input; the rest is opaque
    with pytest.raises((sealing.SealingError, ValueError)):
        sealing.open_sealed_share(key, bytes(blob), TRANSCRIPT)


def test_wrong_key_or_transcript_gives_one_opaque_error() -> None:
    key, pub = _pair()
    other, _ = _pair()
    blob = sealing.seal_share_to(pub, SecretBuffer.random(32), TRANSCRIPT)
    for k, t in ((other, TRANSCRIPT), (key, TRANSCRIPT + b"x")):
        with pytest.raises(sealing.SealingError) as info:
            sealing.open_sealed_share(k, blob, t)
        assert str(info.value) == "sealed share could not be opened"
        assert info.value.__cause__ is None and info.value.__suppress_context__


def test_malformed_inputs_are_value_errors() -> None:
    key, pub = _pair()
    share = SecretBuffer.random(32)
    with pytest.raises(ValueError, match="65-byte"):
        sealing.seal_share_to(pub[:-1], share, TRANSCRIPT)
    with pytest.raises(ValueError, match="not a point"):
        sealing.seal_share_to(b"\x04" + b"\x02" * 64, share, TRANSCRIPT)
    with pytest.raises(ValueError, match="32-byte"):
        sealing.seal_share_to(pub, SecretBuffer.random(16), TRANSCRIPT)
    with pytest.raises(ValueError, match="transcript"):
        sealing.seal_share_to(pub, share, b"")
    with pytest.raises(ValueError, match="transcript"):
        sealing.seal_share_to(pub, share, b"x" * (sealing.MAX_TRANSCRIPT + 1))
    with pytest.raises(ValueError, match="exactly 107"):
        sealing.open_sealed_share(key, b"\x00" * 2000, TRANSCRIPT)
    with pytest.raises(TypeError):
        sealing.open_sealed_share("not a key", b"", TRANSCRIPT)  # type: ignore[arg-type]


def test_transcripts_are_canonical_and_bind_every_field() -> None:
    _, pub = _pair()
    base = dict(session_id=b"sess", nonce=b"n" * 32, tenant_id="ta", dataset_id="ds",
                key_version=1, broker_id="b1", node_public_key=pub)
    t = sealing.release_transcript(**base)  # type: ignore[arg-type]
    assert t == sealing.release_transcript(**base)  # type: ignore[arg-type]
    assert t.startswith(b"\x00\x11ctrain/release/v1\x00\x00\x00\x04sess\x00\x00\x00\x20")
    _, other_pub = _pair()
    changes = dict(session_id=b"sesS", nonce=b"m" * 32, tenant_id="tb", dataset_id="dt",
                   key_version=2, broker_id="b2", node_public_key=other_pub)
    for name, value in changes.items():
        assert sealing.release_transcript(**{**base, name: value}) != t  # type: ignore[arg-type]
    # field boundaries cannot be shifted: ("ab","c") differs from ("a","bc")
    a = sealing.release_transcript(**{**base, "tenant_id": "ab", "dataset_id": "c"})  # type: ignore[arg-type]
    b = sealing.release_transcript(**{**base, "tenant_id": "a", "dataset_id": "bc"})  # type: ignore[arg-type]
    assert a != b
    imp = sealing.import_transcript(import_id="u1", tenant_id="ta", dataset_id="ds",
                                    key_version=1, share_index=0, broker_id="b1",
                                    import_public_key=pub)
    assert imp.startswith(b"\x00\x10ctrain/import/v1") and imp != t


def test_transcript_inputs_are_validated() -> None:
    _, pub = _pair()
    base = dict(session_id=b"s", nonce=b"n" * 32, tenant_id="ta", dataset_id="ds",
                key_version=1, broker_id="b1", node_public_key=pub)
    bad = [
        ({"tenant_id": "../x"}, "tenant id"),
        ({"dataset_id": ""}, "dataset id"),
        ({"nonce": b"short"}, "nonce"),
        ({"key_version": -1}, "32 bits"),
        ({"key_version": True}, "bool"),
        ({"session_id": b"x" * 5000}, "longer than"),
        ({"node_public_key": b"\x04" * 65}, "P-256"),
    ]
    for change, message in bad:
        with pytest.raises((ValueError, TypeError), match=message):
            sealing.release_transcript(**{**base, **change})  # type: ignore[arg-type]


def test_node_keys_are_fresh() -> None:
    pubs = {sealing.generate_node_key()[1] for _ in range(4)}
    assert len(pubs) == 4
    assert all(sealing.decode_public_key(p) for p in pubs)
