"""The tpm2 evidence wire format: exact bytes, round trip, bounded and strict parsing."""

from __future__ import annotations

import struct

import pytest

from attest.interface import MalformedEvidence, VerificationContext
from attest.tpm2 import Tpm2Evidence, Tpm2Verifier
from attest.tpm2.verifier import load_ak


def sample() -> Tpm2Evidence:
    return Tpm2Evidence(b"A" * 3, b"S" * 2, {0: b"\x00" * 32, 23: b"\x17" * 32}, b"LOG")


def test_exact_bytes_and_round_trip():
    data = sample().to_bytes()
    assert data == (
        b"CTTPM2\x00\x01" + b"\x00\x03AAA" + b"\x00\x02SS" + b"\x02"
        + b"\x00" + b"\x00" * 32 + b"\x17" + b"\x17" * 32 + b"\x00\x00\x00\x03LOG"
    )
    assert Tpm2Evidence.from_bytes(data) == sample()


def _with_pcrs(entries: bytes, count: int) -> bytes:
    return (b"CTTPM2\x00\x01" + b"\x00\x01A" + b"\x00\x01S" + bytes([count]) + entries
            + b"\x00\x00\x00\x00")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"CTTPM2\x00\x03", "magic"),
        (b"CTTPM2\x00\x01\x04\x01", "attest length 1025"),
        (b"CTTPM2\x00\x01\x00\x05AB", "truncated at attest"),
        (_with_pcrs(b"", 25), "PCR count 25"),
        (_with_pcrs(b"\x18" + bytes(32), 1), "PCR index 24"),
        (_with_pcrs(b"\x05" + bytes(32) + b"\x05" + bytes(32), 2), "ascending"),
        (_with_pcrs(b"", 0) + b"x", "trailing"),
        (b"CTTPM2\x00\x01\x00\x01A\x00\x01S\x00\x00\x20\x00\x01", "event log length"),
        (b"CTTPM2\x00\x01\x00\x00\x00\x01S\x00\x00\x00\x00\x00", "empty"),
    ],
)
def test_malformed_evidence_names_the_field(data, message):
    with pytest.raises(MalformedEvidence, match=message):
        Tpm2Evidence.from_bytes(data)


def test_oversized_evidence_is_rejected_before_parsing():
    with pytest.raises(MalformedEvidence, match="maximum"):
        Tpm2Evidence.from_bytes(b"CTTPM2\x00\x01" + bytes(3 << 20))


def test_construction_checks_sizes():
    with pytest.raises(ValueError, match="32 bytes"):
        Tpm2Evidence(b"A", b"S", {24: bytes(32)})
    with pytest.raises(ValueError, match="1-1024"):
        Tpm2Evidence(b"", b"S")


def test_verifier_raises_malformed_for_garbage():
    ctx = VerificationContext(expected_report_data=bytes(32))
    with pytest.raises(MalformedEvidence):
        Tpm2Verifier().verify(b"garbage", ctx)
    # structurally valid container, unparsable quote inside
    bad = Tpm2Evidence(b"A" * 3, b"S" * 2, {}, b"CTEVLOG1\x00\x00").to_bytes()
    with pytest.raises(MalformedEvidence, match="TPMS_ATTEST"):
        Tpm2Verifier().verify(bad, VerificationContext(bytes(32), node={"ak_public": _pem()}))


def test_unusable_ak_record_is_not_enrolled():
    ev = Tpm2Evidence(b"A" * 3, b"S" * 2, {}, b"CTEVLOG1\x00\x00").to_bytes()
    result = Tpm2Verifier().verify(ev, VerificationContext(bytes(32), node={"ak_public": 5}))
    assert [f.id for f in result.failures] == ["tpm2.ak_not_enrolled"]
    with pytest.raises(ValueError):
        load_ak(b"\x00" * 10)


def _pem() -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def test_length_prefix_is_big_endian():
    data = sample().to_bytes()
    assert struct.unpack_from(">H", data, 8)[0] == 3


def test_version_2_carries_every_bank_exact_bytes_and_round_trip():
    ev = Tpm2Evidence(b"A", b"S", {0: b"\x00" * 32}, b"L",
                      other_banks={0x000C: {0: b"\x0c" * 48, 1: b"\x01" * 48}})
    data = ev.to_bytes()
    assert data == (
        b"CTTPM2\x00\x02" + b"\x00\x01A" + b"\x00\x01S" + b"\x02"
        + b"\x00\x0b\x01" + b"\x00" + b"\x00" * 32
        + b"\x00\x0c\x02" + b"\x00" + b"\x0c" * 48 + b"\x01" + b"\x01" * 48
        + b"\x00\x00\x00\x01L"
    )
    back = Tpm2Evidence.from_bytes(data)
    assert back == ev and back.banks == {0x000B: ev.pcrs, 0x000C: ev.other_banks[0x000C]}
    # a SHA-384 value of the wrong size, an unknown bank, banks out of order: refused
    with pytest.raises(ValueError, match="48 bytes"):
        Tpm2Evidence(b"A", b"S", {}, other_banks={0x000C: {0: bytes(32)}})
    for bad, what in (
        (data.replace(b"\x00\x0c\x02", b"\x00\x0e\x02"), "unknown"),
        (b"CTTPM2\x00\x02\x00\x01A\x00\x01S\x02\x00\x0c\x00\x00\x0b\x00\x00\x00\x00\x00",
         "ascending"),
        (b"CTTPM2\x00\x02\x00\x01A\x00\x01S\x00\x00\x00\x00\x00", "no PCR bank"),
    ):
        with pytest.raises(MalformedEvidence, match=what):
            Tpm2Evidence.from_bytes(bad)
