"""Shared fixtures for the sealed format tests: keys, stores, a Tink oracle."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator

import pytest

from sealed import LocalDirStore, MappedDirStore, MemoryStore, SecretBuffer
from tests.s3server import s3_server, s3_tls_server  # noqa: F401 - fixtures
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


@pytest.fixture(params=["local", "mapped", "memory", "s3"])
def store(request: pytest.FixtureRequest, tmp_path):
    """Every backend: the contract and the format tests run against each (S3: a real local
    server, moto's server mode, with a fresh prefix per test)."""
    if request.param == "local":
        yield LocalDirStore(tmp_path / "store")
    elif request.param == "mapped":
        yield MappedDirStore(tmp_path / "store")
    elif request.param == "s3":
        server = request.getfixturevalue("s3_server")
        s3 = server.store(f"t-{os.urandom(8).hex()}", part_size=5 << 20)
        yield s3
        s3.close()
    else:
        yield MemoryStore()


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
