"""Local ranks share one TPM quote (trainer/quote_batch.py): two rank processes on one swtpm
get one quote that covers both ranks' sessions and verifies with the real tpm2 verifier; a
leader whose quote fails hands the other requests back. No timing is assumed: the leader's
gather window is a hang guard, and it stops waiting as soon as the other rank's request is in."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from attest.interface import VerificationContext, combined_report_data
from attest.tpm2.node import TpmNode
from attest.tpm2.verifier import Tpm2Verifier
from tests.attest.conftest import ek_ca, swtpm, swtpm_factory  # noqa: F401 - fixtures
from trainer.quote_batch import QuoteBatcher, _decode, _encode

REPO = Path(__file__).resolve().parents[2]
ZERO_BOOT = {i: "00" * 32 for i in range(8)}
HANG_GUARD_S = 300.0

RANK = r"""
import json, sys
from pathlib import Path
from attest.tpm2.agent import collect_evidence
from trainer.quote_batch import QuoteBatcher
directory, tcti, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
items = [bytes([seed, k]) * 16 for k in range(2)]  # this rank's two brokers' sessions
claims = {"node.ksm.enabled": False, "node.swap.enabled": False}
batcher = QuoteBatcher(Path(directory), lambda rd: ("tpm2", collect_evidence(tcti, rd, claims)),
                       expected=2, gather_s=float(sys.argv[4]), wait_at_most_one_quote=False)
ev = batcher(items)
print(json.dumps({"made": batcher.quotes_made, "shared": batcher.quotes_shared,
                  "kind": ev.kind, "payload": ev.payload.hex(),
                  "set": [i.hex() for i in ev.report_data_set],
                  "items": [i.hex() for i in items]}))
"""


@pytest.mark.integration
def test_two_rank_processes_share_one_quote_that_verifies(swtpm, tmp_path) -> None:  # noqa: F811
    directory = tmp_path / "batch"
    ranks = [subprocess.Popen([sys.executable, "-c", RANK, str(directory), swtpm.tcti,
                               str(seed), str(HANG_GUARD_S)], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for seed in (1, 2)]
    outs = []
    for rank in ranks:
        out, err = rank.communicate(timeout=HANG_GUARD_S + 60)
        assert rank.returncode == 0, err
        outs.append(json.loads(out.strip().splitlines()[-1]))
    assert sorted((o["made"], o["shared"]) for o in outs) == [(0, 1), (1, 0)]  # one quote
    assert outs[0]["payload"] == outs[1]["payload"]
    covered = [bytes.fromhex(i) for i in outs[0]["set"]]
    assert outs[0]["set"] == outs[1]["set"] and len(covered) == 4
    for o in outs:
        assert set(o["items"]) <= set(o["set"])
    with TpmNode(swtpm.tcti) as tpm:
        ak = tpm.ak_public()
    result = Tpm2Verifier().verify(bytes.fromhex(outs[0]["payload"]), VerificationContext(
        expected_report_data=combined_report_data(covered), node={"ak_public": ak},
        reference={"boot_pcrs": ZERO_BOOT}))
    assert result.ok, result.failures
    assert result.claims["node.ksm.enabled"] is False


def test_a_failed_leader_hands_the_requests_back(tmp_path) -> None:
    directory = tmp_path / "batch"
    calls: list[bytes] = []
    leader_in = threading.Event()
    release_leader = threading.Event()

    def failing(report_data: bytes) -> tuple[str, bytes]:
        calls.append(report_data)
        leader_in.set()
        release_leader.wait(HANG_GUARD_S)
        raise RuntimeError("TPM gone")

    def working(report_data: bytes) -> tuple[str, bytes]:
        calls.append(report_data)
        return "k", b"evidence over " + report_data

    a_items, b_items = [b"a" * 32], [b"b" * 32]
    outcome: dict[str, object] = {}

    def rank_b() -> None:
        outcome["b"] = QuoteBatcher(directory, working, expected=2, gather_s=0)(b_items)

    def rank_a() -> None:
        try:
            QuoteBatcher(directory, failing, expected=2, gather_s=HANG_GUARD_S,
                         wait_at_most_one_quote=False)(a_items)
        except RuntimeError as exc:
            outcome["a"] = exc

    a = threading.Thread(target=rank_a)
    a.start()
    # A leads once it holds the lock and has taken its own request out; only then start B
    deadline = time.monotonic() + HANG_GUARD_S
    while not ((directory / "lock").exists() and not list(directory.glob("req-*"))):
        assert time.monotonic() < deadline, "rank A never took the lead"
        time.sleep(0.01)
    b = threading.Thread(target=rank_b)
    b.start()  # A (waiting for a second request) takes B's; then its quote fails
    assert leader_in.wait(HANG_GUARD_S)
    release_leader.set()
    a.join(HANG_GUARD_S)
    b.join(HANG_GUARD_S)
    assert isinstance(outcome["a"], RuntimeError)
    got = outcome["b"]
    assert got.report_data_set == () and got.payload == b"evidence over " + b_items[0]
    assert calls[0] == combined_report_data(a_items + b_items)  # A had taken B's request


def test_response_encoding_round_trips_and_rejects_damage() -> None:
    from kms_broker.client import SharedEvidence

    ev = SharedEvidence("tpm2", b"payload", (b"x" * 32, b"y" * 32))
    data = _encode(ev)
    assert _decode(data) == ev
    for bad in (data[:-1], data + b"!", b"KBQ0" + data[4:]):
        with pytest.raises(ValueError):
            _decode(bad)


def test_a_lone_rank_neither_waits_nor_records_its_quote_time(tmp_path) -> None:
    from kms_broker.client import SharedEvidence

    batcher = QuoteBatcher(tmp_path, lambda rd: ("k", rd), expected=1)
    assert batcher([b"a" * 32]) == SharedEvidence("k", b"a" * 32, ())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lock"]  # no quote-seconds, no req


def test_a_leader_waits_no_longer_than_a_quote_takes(tmp_path) -> None:
    from trainer.quote_batch import FIRST_QUOTE_S, GATHER_S

    batcher = QuoteBatcher(tmp_path, lambda rd: ("k", rd), expected=2)
    assert batcher.wait_s(tmp_path) == FIRST_QUOTE_S  # nothing timed yet
    batcher([b"a" * 32])  # leads alone (no other rank) and records its quote's duration
    recorded = float((tmp_path / "quote-seconds").read_text())
    assert batcher.wait_s(tmp_path) == min(GATHER_S, recorded)
    (tmp_path / "quote-seconds").write_text("10")
    assert batcher.wait_s(tmp_path) == GATHER_S
    (tmp_path / "quote-seconds").write_text("junk")
    assert batcher.wait_s(tmp_path) == FIRST_QUOTE_S
    uncapped = QuoteBatcher(tmp_path, lambda rd: ("k", rd), expected=2, gather_s=7.0,
                            wait_at_most_one_quote=False)
    assert uncapped.wait_s(tmp_path) == 7.0
