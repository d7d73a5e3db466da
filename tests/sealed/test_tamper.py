"""Tampering with a stream is rejected before any plaintext is returned.

Every failure must be a DecryptionError whose message names only the object and segment, and
the caller's output buffer must hold no plaintext afterwards (it is zeroed on failure).
"""

from __future__ import annotations

import os
import re
from functools import cache

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sealed import streaming as s
from sealed.errors import DecryptionError
from sealed.secrets import SecretBuffer

F, C, SEG = s.FIRST_SEGMENT_CAPACITY, s.SEGMENT_CAPACITY, s.SEGMENT_SIZE
AAD = b"tamper test"
MESSAGE = re.compile(r"^decryption failed \(stream(, segment \d+)?\)$")


@cache
def fixture_stream() -> tuple[bytes, bytes, bytes]:
    """(raw key, plaintext, ciphertext) of a 4-segment stream: 3 full segments + a partial."""
    raw = os.urandom(32)
    plaintext = os.urandom(F + 2 * C + 1000)
    key = SecretBuffer.from_bytes(raw)
    ciphertext = s.encrypt(key, AAD, plaintext)
    key.zeroize()
    assert s.segment_count(len(ciphertext)) == 4
    return raw, plaintext, ciphertext


def segments(ct: bytes) -> list[bytes]:
    n = s.segment_count(len(ct))
    return [ct[s.ciphertext_start(i) : min(len(ct), (i + 1) * SEG)] for i in range(n)]


def assert_rejected(ciphertext: bytes, *, segment: int | None = -1) -> DecryptionError:
    """Decrypt into a buffer and check: opaque error, nothing secret said, no plaintext kept."""
    raw, plaintext, _ = fixture_stream()
    out = bytearray(len(plaintext) + 2 * SEG)
    with SecretBuffer.from_bytes(raw) as key, pytest.raises(DecryptionError) as info:
        s.decrypt_into(key, AAD, ciphertext, out)
    err = info.value
    message = str(err)
    assert MESSAGE.match(message), message
    assert raw.hex() not in message and plaintext[:16].hex() not in message
    assert not any(out), "plaintext left in the caller's buffer after a failure"
    if segment != -1:
        assert err.segment == segment
    return err


def test_untouched_stream_decrypts() -> None:
    raw, plaintext, ciphertext = fixture_stream()
    with SecretBuffer.from_bytes(raw) as key:
        assert s.decrypt(key, AAD, ciphertext) == plaintext


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_bit_flip_is_rejected(data: st.DataObject) -> None:
    _, _, ct = fixture_stream()
    tags = [min(len(ct), (i + 1) * SEG) - s.TAG_SIZE for i in range(4)]
    region = data.draw(st.sampled_from(["header", "body", "tag", "anywhere"]))
    if region == "header":
        pos = data.draw(st.integers(0, s.HEADER_SIZE - 1))
    elif region == "tag":
        start = data.draw(st.sampled_from(tags))
        pos = data.draw(st.integers(start, start + s.TAG_SIZE - 1))
    elif region == "body":
        seg = data.draw(st.integers(0, 3))
        pos = data.draw(st.integers(s.ciphertext_start(seg), tags[seg] - 1))
    else:
        pos = data.draw(st.integers(0, len(ct) - 1))
    bit = data.draw(st.integers(0, 7))
    tampered = bytearray(ct)
    tampered[pos] ^= 1 << bit
    err = assert_rejected(bytes(tampered))
    if pos >= s.HEADER_SIZE:
        seg = 0 if pos < SEG else pos // SEG
        # a flip in segment k fails at k; segments before it decrypted but were zeroed
        assert err.segment == seg


def test_header_length_byte_and_salt_and_prefix_flips() -> None:
    _, _, ct = fixture_stream()
    for pos, segment in [(0, None), (1, 0), (32, 0), (33, 0), (39, 0)]:
        tampered = bytearray(ct)
        tampered[pos] ^= 0x01
        assert_rejected(bytes(tampered), segment=segment)


def test_dropped_last_segment_is_rejected() -> None:
    _, _, ct = fixture_stream()
    # three full segments remain; segment 2 now has to carry the last-segment flag
    assert_rejected(ct[: 3 * SEG], segment=2)


def test_cut_mid_segment_is_rejected() -> None:
    _, _, ct = fixture_stream()
    assert_rejected(ct[: 2 * SEG + SEG // 2], segment=2)
    assert_rejected(ct[:-1], segment=3)


def test_cut_into_the_header_is_rejected() -> None:
    _, _, ct = fixture_stream()
    assert_rejected(ct[:30], segment=None)


def test_reordered_segments_are_rejected() -> None:
    _, _, ct = fixture_stream()
    seg = segments(ct)
    swapped = ct[: s.HEADER_SIZE] + seg[0] + seg[2] + seg[1] + seg[3]
    assert len(swapped) == len(ct)
    assert_rejected(swapped, segment=1)


def test_duplicated_segments_are_rejected() -> None:
    _, _, ct = fixture_stream()
    seg = segments(ct)
    replaced = ct[: s.HEADER_SIZE] + seg[0] + seg[1] + seg[1] + seg[3]
    assert_rejected(replaced, segment=2)
    inserted = ct[: s.HEADER_SIZE] + seg[0] + seg[1] + seg[1] + seg[2] + seg[3]
    assert_rejected(inserted, segment=2)


def test_appended_bytes_and_segments_are_rejected() -> None:
    _, _, ct = fixture_stream()
    assert_rejected(ct + b"\x00" * 20, segment=3)
    assert_rejected(ct + segments(ct)[3], segment=3)


def test_wrong_key_and_wrong_associated_data_are_rejected() -> None:
    _, plaintext, ct = fixture_stream()
    out = bytearray(len(plaintext))
    with SecretBuffer.random(32) as other, pytest.raises(DecryptionError, match=MESSAGE):
        s.decrypt_into(other, AAD, ct, out)
    raw = fixture_stream()[0]
    with SecretBuffer.from_bytes(raw) as key, pytest.raises(DecryptionError, match=MESSAGE):
        s.decrypt_into(key, AAD + b"x", ct, out)
    assert not any(out)
