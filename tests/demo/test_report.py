"""The demo's summary pieces: parsing trainer output and drawing it."""

from __future__ import annotations

import pytest

from demo.report import (
    ascii_plot,
    audit_rows,
    human_size,
    parse_losses,
    plaintext_hits,
    progress_line,
)

LOG = """\
node-a | 2026-11-23 12:00:01 INFO trainer: step 5/20 loss 5.2000 lr 3.0e-03 samples/s 10.0
node-a | 2026-11-23 12:00:02 INFO trainer: step 10/20 loss 3.1000 lr 2.0e-03 samples/s 11.0
node-a | noise step x/y loss z
node-a | 2026-11-23 12:00:03 INFO trainer: step 20/20 loss 1.0500 lr 3.0e-04 samples/s 12.0
"""


def test_parse_losses_reads_progress_lines_in_order():
    assert parse_losses(LOG) == [(5, 5.2), (10, 3.1), (20, 1.05)]
    assert parse_losses("nothing here") == []


def test_ascii_plot_puts_the_extremes_on_the_first_and_last_rows():
    plot = ascii_plot([(5, 5.2), (10, 3.1), (20, 1.05)], height=5).splitlines()
    assert plot[0].startswith("5.20 |*")  # highest loss, first column
    assert plot[4].startswith("1.05 |") and plot[4].endswith("*")  # lowest, last column
    assert sum(line.count("*") for line in plot) == 3
    assert "step 5" in plot[-1] and "step 20" in plot[-1]


def test_ascii_plot_handles_flat_and_empty_series():
    assert ascii_plot([]) == "(no points)"
    flat = ascii_plot([(1, 2.0), (2, 2.0)], height=3)
    assert flat.count("*") == 2
    with pytest.raises(ValueError, match="at least 2"):
        ascii_plot([(1, 1.0)], height=1)


def test_audit_rows_filters_events_and_orders_by_time():
    records = {
        "provider": [{"time_ms": 30, "event": "release", "actor": "node:node-a",
                      "subject": "dataset:acme/corpus@v1", "outcome": "allowed", "reason": ""},
                     {"time_ms": 5, "event": "put_policy", "actor": "tenant:acme"}],
        "tenant": [{"time_ms": 10, "event": "attest", "actor": "node:node-b",
                    "subject": "job:job-1", "outcome": "denied", "reason": "ksm-off"}],
    }
    rows = audit_rows(records, ("attest", "release"))
    assert [(r.broker, r.event, r.outcome) for r in rows] == [
        ("tenant", "attest", "denied"), ("provider", "release", "allowed")]


def test_plaintext_hits_counts_only_long_corpus_lines():
    corpus = ["The lighthouse keeper wrote the weather in a small book.\nshort line\n"]
    assert plaintext_hits(b"xx The lighthouse keeper wrote the weather in a small book. yy",
                          corpus) == 1
    assert plaintext_hits(b"short line, and ciphertext \x8f\x01", corpus) == 0


def test_human_size():
    assert human_size(512) == "512 B"
    assert human_size(2048) == "2.0 KiB"
    assert human_size(3 << 20) == "3.0 MiB"


def test_progress_line_reads_step_loss_and_rate():
    line = "rank 0 INFO trainer: step 5/40 loss 4.7517 lr 3.00e-03 samples/s 28.5 tokens/s 1824"
    assert progress_line(line) == (5, 40, 4.7517, "28.5 samples/s")
    assert progress_line("checkpoint ckpt-0000000020.ctck written (encrypted)") is None


def test_audit_verify_status_from_json() -> None:
    from demo.summary import _verify_status

    doc = '{"status": "OK", "ok": true, "detail": "1 records, anchored up to record 1"}'
    assert _verify_status(doc, "") == "OK: 1 records, anchored up to record 1"
    assert _verify_status('{"error": "no audit log", "exit_status": 1}', "x") == "no audit log"
    assert _verify_status("", "kms-broker: error: boom\n") == "kms-broker: error: boom"


def test_a_long_phase_says_it_is_still_waiting_and_stops_when_done():
    import threading

    from demo.runner import heartbeat

    lines: list[str] = []
    said = threading.Event()

    def say(line: str) -> None:
        lines.append(line)
        said.set()

    with heartbeat(say, "enrol", interval_s=0.05):
        assert said.wait(timeout=60), "no heartbeat line within 60 s"
    count = len(lines)
    assert lines[0].strip().startswith("enrol: still waiting (") and lines[0].endswith("so far)")
    stopped = threading.Event()
    stopped.wait(0.2)  # several intervals after the phase ended: nothing more is said
    assert len(lines) == count
