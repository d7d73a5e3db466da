"""Shared fixtures for the sealed format tests: keys, stores, a Tink oracle."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator

import pytest

from sealed import LocalDirStore, MappedDirStore, MemoryStore, SecretBuffer
from tests.sealed.tink_oracle import tink_streaming_aead

TENANT, DATASET, VERSION = "tenant-a", "dataset-1", 1


@pytest.fixture
def raw_key() -> bytes:
    return os.urandom(32)


@pytest.fixture
def dek(raw_key: bytes) -> Iterator[SecretBuffer]:
    key = SecretBuffer.from_bytes(raw_key)
    yield key
    key.zeroize()


@pytest.fixture(params=["local", "mapped", "memory"])
def store(request: pytest.FixtureRequest, tmp_path):
    """Every backend: the contract and the format tests run against each."""
    if request.param == "local":
        return LocalDirStore(tmp_path / "store")
    if request.param == "mapped":
        return MappedDirStore(tmp_path / "store")
    return MemoryStore()


@pytest.fixture
def local_store(tmp_path) -> LocalDirStore:
    return LocalDirStore(tmp_path / "store")


class TinkOracle:
    """tink-py's StreamingAead over a keyset built from raw key bytes (tests only)."""

    def __init__(self, raw_key: bytes) -> None:
        self._primitive = tink_streaming_aead(raw_key)

    def encrypt(self, plaintext: bytes, aad: bytes) -> bytes:
        class _Keep(io.BytesIO):
            def close(self) -> None:  # tink closes the destination; keep the bytes readable
                pass

        dest = _Keep()
        with self._primitive.new_encrypting_stream(dest, aad) as enc:
            enc.write(plaintext)
        return dest.getvalue()

    def decrypt(self, ciphertext: bytes, aad: bytes) -> bytes:
        with self._primitive.new_decrypting_stream(io.BytesIO(ciphertext), aad) as dec:
            return dec.read()


@pytest.fixture
def tink_oracle(raw_key: bytes) -> TinkOracle:
    return TinkOracle(raw_key)
