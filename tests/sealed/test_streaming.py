"""Tink AES-GCM-HKDF streaming: layout arithmetic and byte-level interop with tink-py."""

from __future__ import annotations

import os

import pytest

from sealed import streaming as s
from sealed.errors import DecryptionError
from sealed.secrets import SecretBuffer

F, C = s.FIRST_SEGMENT_CAPACITY, s.SEGMENT_CAPACITY
# 0, 1, first-segment boundary -1/0/+1, a later-segment boundary -1/0/+1, several MiB
INTEROP_SIZES = [0, 1, F - 1, F, F + 1, F + C - 1, F + C, F + C + 1, 5 * (1 << 20) + 12345]
AAD = b"interop associated data"


def test_parameters_match_tink_aes256_gcm_hkdf_1mb() -> None:
    assert s.HEADER_SIZE == 0x28 == 40
    assert s.SEGMENT_SIZE == 1048576
    assert F == 1048576 - 40 - 16
    assert C == 1048576 - 16


@pytest.mark.parametrize("n", INTEROP_SIZES)
def test_tink_decrypts_our_ciphertext(n: int, dek: SecretBuffer, tink_oracle) -> None:
    plaintext = os.urandom(n)
    ciphertext = s.encrypt(dek, AAD, plaintext)
    assert len(ciphertext) == s.ciphertext_size(n)
    assert ciphertext[0] == 40
    assert tink_oracle.decrypt(ciphertext, AAD) == plaintext


@pytest.mark.parametrize("n", INTEROP_SIZES)
def test_we_decrypt_tink_ciphertext(n: int, dek: SecretBuffer, tink_oracle) -> None:
    plaintext = os.urandom(n)
    ciphertext = tink_oracle.encrypt(plaintext, AAD)
    assert s.plaintext_size(len(ciphertext)) == n
    out = bytearray(n + 7)  # a larger caller buffer: we return the exact-size view
    view = s.decrypt_into(dek, AAD, ciphertext, out)
    assert len(view) == n
    assert view == plaintext


def test_tink_rejects_our_ciphertext_under_other_aad(dek: SecretBuffer, tink_oracle) -> None:
    ciphertext = s.encrypt(dek, AAD, b"x" * 1000)
    with pytest.raises(Exception):  # noqa: B017 - tink raises its own error type
        tink_oracle.decrypt(ciphertext, AAD + b"!")


def test_chunking_does_not_change_the_stream_layout(dek: SecretBuffer) -> None:
    plaintext = os.urandom(F + 2 * C + 333)
    chunkings = [
        [plaintext],
        [plaintext[i : i + 4096] for i in range(0, len(plaintext), 4096)],
        [plaintext[:F], plaintext[F : F + C], plaintext[F + C :]],
        [b"", plaintext[:10], b"", plaintext[10:]],
    ]
    for chunks in chunkings:
        enc = s.StreamEncryptor(dek, AAD)
        ciphertext = b"".join(bytes(c) for c in enc.encrypt(chunks))
        assert enc.plaintext_size == len(plaintext)
        assert enc.ciphertext_size == len(ciphertext) == s.ciphertext_size(len(plaintext))
        assert s.decrypt(dek, AAD, ciphertext) == plaintext


def test_exactly_full_segments_end_without_an_empty_segment(dek: SecretBuffer) -> None:
    ciphertext = s.encrypt(dek, AAD, os.urandom(F + C))
    assert len(ciphertext) == 2 * s.SEGMENT_SIZE
    assert s.segment_count(len(ciphertext)) == 2


def test_trailing_empty_segment_form_decrypts(dek: SecretBuffer, tink_oracle) -> None:
    """Tink may close a stream that fills its segments with one empty last segment."""
    plaintext = os.urandom(F)
    cipher = s.SegmentCipher.new_stream(dek, AAD)
    seg0 = bytearray(s.SEGMENT_SIZE)
    n0 = cipher.encrypt_segment_into(0, False, plaintext, memoryview(seg0))
    seg1 = bytearray(s.TAG_SIZE)
    cipher.encrypt_segment_into(1, True, b"", memoryview(seg1))
    ciphertext = cipher.header + bytes(seg0[:n0]) + bytes(seg1)
    assert len(ciphertext) == s.SEGMENT_SIZE + s.TAG_SIZE
    assert tink_oracle.decrypt(ciphertext, AAD) == plaintext
    assert s.decrypt(dek, AAD, ciphertext) == plaintext


def test_segment_arithmetic_is_consistent() -> None:
    for i in range(5):
        assert s.segment_of(s.plaintext_start(i)) == i
        if i:
            assert s.segment_of(s.plaintext_start(i) - 1) == i - 1
            assert s.ciphertext_start(i) == i * s.SEGMENT_SIZE
    for n in INTEROP_SIZES:
        assert s.plaintext_size(s.ciphertext_size(n)) == n


@pytest.mark.parametrize("size", [0, 39, 40, 55, s.SEGMENT_SIZE + 15, 1 << 41])
def test_impossible_ciphertext_sizes_are_rejected(size: int) -> None:
    with pytest.raises(DecryptionError, match=r"^decryption failed \(stream\)$"):
        s.plaintext_size(size)


def test_limits_are_checked(dek: SecretBuffer) -> None:
    with pytest.raises(ValueError, match="associated data"):
        s.StreamEncryptor(dek, b"a" * (s.MAX_ASSOCIATED_DATA + 1))
    with pytest.raises(ValueError, match="SecretBuffer"):
        s.StreamEncryptor(b"k" * 32, AAD)  # type: ignore[arg-type]
    ciphertext = s.encrypt(dek, AAD, b"abc")
    with pytest.raises(ValueError, match="too small"):
        s.decrypt_into(dek, AAD, ciphertext, bytearray(2))


def test_encryptor_encrypts_one_stream_only(dek: SecretBuffer) -> None:
    enc = s.StreamEncryptor(dek, AAD)
    list(enc.encrypt([b"secret"]))
    with pytest.raises(ValueError, match="exactly one stream"):
        enc.encrypt([b"again"])
