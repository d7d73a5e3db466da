"""Event log: canonical encoding, replay into the application PCR, bounded parsing."""

from __future__ import annotations

import hashlib
import struct

import pytest

from attest.eventlog import APP_PCR, Event, EventLog, event_digest, replay
from attest.interface import MalformedEvidence


def test_replay_is_the_tpm_extend_chain_from_zero():
    events = [Event.claim("a", 1), Event.claim("b", "x")]
    pcr = bytes(32)
    for e in events:
        pcr = hashlib.sha256(pcr + e.digest).digest()
    assert replay(events) == pcr
    assert replay([]) == bytes(32)
    assert APP_PCR == 23


def test_event_digest_is_domain_separated_and_length_prefixed():
    expected = hashlib.sha256(
        b"ct-event/v1\x00" + b"\x01" + b"a" + struct.pack(">I", 1) + b"1"
    ).digest()
    assert event_digest("a", b"1") == expected
    # moving a byte between type and data changes the digest
    assert event_digest("ab", b"c") != event_digest("a", b"bc")


def test_claims_are_canonical_json_in_sorted_order():
    log = EventLog.from_claims({"z": [1, 2], "a": {"y": 1, "x": True}})
    assert [e.type for e in log.events] == ["a", "z"]
    assert log.events[0].data == b'{"x":true,"y":1}'
    assert log.claims() == {"a": {"x": True, "y": 1}, "z": [1, 2]}


def test_round_trip_and_exact_wire_format():
    log = EventLog((Event("k", b"v"),))
    data = log.to_bytes()
    assert data == b"CTEVLOG1" + b"\x00\x01" + b"\x01k" + b"\x00\x00\x00\x01v"
    assert EventLog.from_bytes(data) == log


def test_order_changes_the_pcr():
    a, b = Event.claim("a", 1), Event.claim("b", 2)
    assert replay([a, b]) != replay([b, a])


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"XXEVLOG1\x00\x00", "magic"),
        (b"CTEVLOG1\x00", "truncated"),
        (b"CTEVLOG1\x01\x01", "events, maximum"),
        (b"CTEVLOG1\x00\x01\x00", "type length 0"),
        (b"CTEVLOG1\x00\x01\x01k\x00\x01\x00\x01", "data length 65537"),
        (b"CTEVLOG1\x00\x01\x01k\x00\x00\x00\x05v", "data length 5"),
        (b"CTEVLOG1\x00\x00junk", "trailing"),
        (b"CTEVLOG1\x00\x01\x01K\x00\x00\x00\x00", "type must be"),
    ],
)
def test_malformed_logs_are_rejected_with_a_specific_reason(data, message):
    with pytest.raises(MalformedEvidence, match=message):
        EventLog.from_bytes(data)


def test_oversized_log_is_rejected_before_parsing():
    with pytest.raises(MalformedEvidence, match="maximum"):
        EventLog.from_bytes(b"CTEVLOG1" + bytes(1 << 20))


def test_duplicate_claim_is_malformed():
    log = EventLog((Event.claim("a", 1), Event.claim("a", 2)))
    with pytest.raises(MalformedEvidence, match="twice"):
        log.claims()


def test_bad_event_construction_is_a_value_error():
    with pytest.raises(ValueError, match="event type"):
        Event("Bad Type", b"")
    with pytest.raises(ValueError, match="at most"):
        Event("a", bytes(65537))
