"""kms_broker.progress: plain periodic lines with rate and ETA off a terminal, a tqdm bar on
one (kms-broker dataset upload, dataset rotate)."""

from __future__ import annotations

import io
import re

import pytest

from kms_broker.progress import Progress


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_plain_lines_every_interval_with_rate_and_eta() -> None:
    out, clock = io.StringIO(), Clock()
    progress = Progress("encrypting", stream=out, interval_s=5.0, clock=clock)
    assert progress.mode == "plain"  # a StringIO is no terminal
    progress(0, 100_000_000)
    clock.now += 1
    progress(10_000_000, 100_000_000)  # within the interval: no line
    clock.now += 4
    progress(50_000_000, 100_000_000)  # 5 s in: 10 MB/s, 5 s to go
    clock.now += 5
    progress(100_000_000, 100_000_000)
    progress(100_000_000, 100_000_000)  # after the end: nothing more
    lines = out.getvalue().splitlines()
    assert len(lines) == 3, lines
    assert lines[1] == "encrypting: 50% 50.0MB of 100MB, 10.0MB/s, ETA 00:05"
    assert lines[2] == "encrypting: 100% 100MB in 00:10, 10.0MB/s"
    assert "\r" not in out.getvalue()


def test_counts_that_are_not_bytes() -> None:
    out, clock = io.StringIO(), Clock()
    progress = Progress("rotating", unit="broker", stream=out, clock=clock)
    progress(0, 2)
    clock.now += 2
    progress(2, 2)
    assert out.getvalue().splitlines()[-1] == "rotating: 100% 2 broker in 00:02, 1.00 broker/s"


def test_a_terminal_gets_a_tqdm_bar() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Tty()
    progress = Progress("encrypting", stream=out)
    assert progress.mode == "bar"
    progress(500, 1000)
    progress(1000, 1000)
    text = out.getvalue()
    assert "encrypting: 100%" in text and "\r" in text
    assert re.search(r"1\.00k/1\.00k", text), text


def test_mode_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KMS_BROKER_PROGRESS", "off")
    out = io.StringIO()
    progress = Progress("encrypting", stream=out)
    progress(5, 5)
    assert out.getvalue() == ""
    monkeypatch.setenv("KMS_BROKER_PROGRESS", "sideways")
    with pytest.raises(ValueError, match="plain, bar, off"):
        Progress("encrypting", stream=out)
