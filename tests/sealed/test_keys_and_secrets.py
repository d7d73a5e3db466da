"""SecretBuffer hygiene, HKDF into buffers, and the DEK derivation of DESIGN.md section 3."""

from __future__ import annotations

import copy
import os
import pickle
import struct

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from sealed import SecretBuffer, derive_dek
from sealed._primitives import hkdf_sha256_into


@pytest.mark.parametrize("length", [1, 31, 32, 33, 64, 100, 255 * 32])
def test_hkdf_into_matches_cryptography(length: int) -> None:
    ikm, salt, info = os.urandom(48), os.urandom(16), b"ctx"
    out = bytearray(length)
    hkdf_sha256_into(out, bytearray(ikm), salt=salt, info=info)
    assert bytes(out) == HKDF(hashes.SHA256(), length, salt, info).derive(ikm)


def test_hkdf_rejects_bad_lengths() -> None:
    with pytest.raises(ValueError, match=r"1\.\.8160"):
        hkdf_sha256_into(bytearray(0), b"k", salt=b"s", info=b"")
    with pytest.raises(ValueError, match=r"1\.\.8160"):
        hkdf_sha256_into(bytearray(255 * 32 + 1), b"k", salt=b"s", info=b"")


def test_derive_dek_matches_the_documented_formula() -> None:
    raw = [os.urandom(32) for _ in range(3)]
    shares = [SecretBuffer.from_bytes(s) for s in raw]
    dek = derive_dek(shares, tenant_id="acme", dataset_id="ds-1", key_version=7)
    info = b"dataset-key/v1\x00acme\x00" + struct.pack(">I", 7)
    expected = HKDF(hashes.SHA256(), 32, b"ds-1", info).derive(b"".join(raw))
    with dek.view() as v:
        assert bytes(v) == expected
    assert all(s.alive for s in shares), "derivation must not consume the caller's shares"


def test_dek_is_bound_to_tenant_dataset_version_and_share_order() -> None:
    a, b = SecretBuffer.random(32), SecretBuffer.random(32)
    base = derive_dek([a, b], tenant_id="t", dataset_id="d", key_version=1)
    variants = [
        derive_dek([a, b], tenant_id="u", dataset_id="d", key_version=1),
        derive_dek([a, b], tenant_id="t", dataset_id="e", key_version=1),
        derive_dek([a, b], tenant_id="t", dataset_id="d", key_version=2),
        derive_dek([b, a], tenant_id="t", dataset_id="d", key_version=1),
        derive_dek([a], tenant_id="t", dataset_id="d", key_version=1),
    ]
    assert not any(base.equals(v) for v in variants)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tenant_id": "../x"}, "tenant id"),
        ({"dataset_id": ""}, "dataset id"),
        ({"key_version": 0}, "key_version"),
        ({"key_version": 2**32}, "key_version"),
    ],
)
def test_derive_dek_rejects_bad_input(kwargs: dict, message: str) -> None:
    args = {"tenant_id": "t", "dataset_id": "d", "key_version": 1} | kwargs
    with pytest.raises(ValueError, match=message):
        derive_dek([SecretBuffer.random(32)], **args)


def test_derive_dek_rejects_wrong_share_sizes_and_counts() -> None:
    with pytest.raises(ValueError, match="share 0"):
        derive_dek([SecretBuffer.random(16)], tenant_id="t", dataset_id="d", key_version=1)
    with pytest.raises(ValueError, match="1 to 16 shares"):
        derive_dek([], tenant_id="t", dataset_id="d", key_version=1)


def test_secret_buffer_never_shows_or_copies_its_bytes() -> None:
    secret = SecretBuffer.from_bytes(b"\x41" * 32)
    assert "41" not in repr(secret) and "AAAA" not in str(secret)
    with pytest.raises(TypeError):
        pickle.dumps(secret)
    with pytest.raises(TypeError):
        bytes(secret)
    with pytest.raises(TypeError):
        _ = secret == SecretBuffer.from_bytes(b"\x41" * 32)
    with pytest.raises(TypeError):
        copy.copy(secret)


def test_zeroize_overwrites_in_place_and_disables_use() -> None:
    secret = SecretBuffer.from_bytes(b"\xab" * 32)
    backing = secret._buf  # the real storage, to prove the bytes are gone, not just hidden
    secret.zeroize()
    assert backing == bytearray(32)
    assert not secret.alive
    with pytest.raises(ValueError, match="zeroized"), secret.view():
        pass
    secret.zeroize()  # idempotent


def test_context_manager_zeroizes() -> None:
    with SecretBuffer.random(32) as secret:
        backing = secret._buf
        assert any(backing)
    assert backing == bytearray(32)
