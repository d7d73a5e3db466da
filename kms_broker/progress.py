"""Progress of long client operations (upload, rotation) on stderr, with rate and ETA.

    progress = Progress("encrypting", unit="B")
    upload_dataset(..., progress=progress)       # called as progress(done, total)
    progress.close()

On a terminal it is a tqdm bar (redrawn in place, at most ten times a second). Anywhere else
(a pipe, a log file, CI) it prints plain lines, one every ``interval_s`` seconds and one at
the end, that a log keeps readable::

    encrypting: 41% 210 MB of 512 MB, 48.3 MB/s, ETA 00:06

``KMS_BROKER_PROGRESS=plain|bar|off`` overrides the choice. Progress shows counts and names
only, never data.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, TextIO

__all__ = ["Progress"]

_MODES = ("plain", "bar", "off")


class Progress:
    def __init__(self, label: str, *, unit: str = "B", stream: TextIO | None = None,
                 interval_s: float = 5.0, mode: str | None = None,
                 clock: Any = time.monotonic) -> None:
        self.label, self.unit = label, unit
        self._stream = stream or sys.stderr
        self._interval = interval_s
        self._clock = clock
        mode = mode or os.environ.get("KMS_BROKER_PROGRESS") or (
            "bar" if _is_tty(self._stream) else "plain")
        if mode not in _MODES:
            raise ValueError(f"progress mode must be one of {', '.join(_MODES)}, not {mode!r}")
        self.mode = mode
        self._bar: Any = None
        self._start = clock()
        self._last_line = -1.0
        self._done = 0
        self._total = 0
        self._closed = False

    def __call__(self, done: int, total: int) -> None:
        self._done, self._total = done, total
        if self.mode == "off" or self._closed:
            return
        if self.mode == "bar":
            self._update_bar(done, total)
        else:
            now = self._clock()
            if self._last_line < 0 or now - self._last_line >= self._interval or done >= total:
                self._last_line = now
                print(self.line(now), file=self._stream, flush=True)
        if done >= total:
            self.close()

    def line(self, now: float | None = None) -> str:
        """The plain line for the current state (``now``: a value of ``clock``)."""
        from tqdm import tqdm

        elapsed = max((self._clock() if now is None else now) - self._start, 1e-9)
        done, total = self._done, self._total
        rate = done / elapsed
        pct = 100 * done // total if total else 100

        def size(n: float) -> str:
            if self.unit == "B":
                return f"{tqdm.format_sizeof(n, divisor=1000)}B"
            return f"{n:g} {self.unit}"

        eta = tqdm.format_interval((total - done) / rate) if rate > 0 and total else "?"
        speed = f"{size(rate)}/s" if self.unit == "B" else f"{rate:.2f} {self.unit}/s"
        if done >= total:
            return (f"{self.label}: 100% {size(total)} in {tqdm.format_interval(elapsed)}, "
                    f"{speed}")
        return f"{self.label}: {pct}% {size(done)} of {size(total)}, {speed}, ETA {eta}"

    def _update_bar(self, done: int, total: int) -> None:
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=self.label, unit=self.unit,
                             unit_scale=self.unit == "B", unit_divisor=1000,
                             file=self._stream, mininterval=0.1, leave=True)
        if total != self._bar.total:
            self._bar.total = total
        self._bar.update(done - self._bar.n)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
