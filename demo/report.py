"""Pure pieces of the demo's summary: parsing service output and drawing it for a terminal.

Nothing here starts a process or reads a file; :mod:`demo.runner` gathers the inputs.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

__all__ = [
    "AuditRow",
    "StoredObject",
    "ascii_plot",
    "audit_rows",
    "human_size",
    "parse_losses",
    "plaintext_hits",
    "progress_line",
]

_STEP = re.compile(r"step (\d+)/(\d+) loss ([0-9.]+)")
_RATE = re.compile(r"samples/s ([0-9.]+)")
# Lines of the tenant's corpus at least this long are searched for in stored objects: long
# enough that a hit cannot be chance.
MIN_NEEDLE = 24


def parse_losses(log: str) -> list[tuple[int, float]]:
    """``(step, loss)`` from the trainer's rank-0 progress lines, in order, one per step."""
    seen: dict[int, float] = {}
    for match in _STEP.finditer(log):
        seen[int(match.group(1))] = float(match.group(3))
    return sorted(seen.items())


def progress_line(line: str) -> tuple[int, int, float, str] | None:
    """``(step, steps, loss, rest)`` of one trainer progress line, else None."""
    match = _STEP.search(line)
    if match is None:
        return None
    rate = _RATE.search(line, match.end())
    rest = f"{rate.group(1)} samples/s" if rate else ""
    return int(match.group(1)), int(match.group(2)), float(match.group(3)), rest


def ascii_plot(points: Sequence[tuple[int, float]], *, width: int = 60, height: int = 10) -> str:
    """A small scatter plot of ``points`` (x ascending) with a labelled y axis."""
    if not points:
        return "(no points)"
    if width < 2 or height < 2:
        raise ValueError("width and height must be at least 2")
    xs = [x for x, _ in points]
    ys = [y for _, y in points]
    x0, x1 = xs[0], xs[-1]
    lo, hi = min(ys), max(ys)
    span_y = (hi - lo) or 1.0
    span_x = (x1 - x0) or 1
    cols = min(width, max(2, x1 - x0 + 1))
    grid = [[" "] * cols for _ in range(height)]
    for x, y in points:
        col = round((x - x0) / span_x * (cols - 1))
        row = round((hi - y) / span_y * (height - 1))
        grid[row][col] = "*"
    label_width = max(len(f"{hi:.2f}"), len(f"{lo:.2f}"))
    lines = []
    for i, row in enumerate(grid):
        label = f"{hi - span_y * i / (height - 1):.2f}" if i % 3 == 0 or i == height - 1 else ""
        lines.append(f"{label:>{label_width}} |{''.join(row)}")
    lines.append(" " * label_width + " +" + "-" * cols)
    left, right = f"step {x0}", f"step {x1}"
    gap = max(1, cols - len(left) - len(right))
    lines.append(" " * (label_width + 2) + left + " " * gap + right)
    return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class AuditRow:
    broker: str
    time_ms: int
    event: str
    actor: str
    subject: str
    outcome: str
    reason: str


def audit_rows(
    records: Mapping[str, Iterable[Mapping[str, object]]], events: Iterable[str]
) -> list[AuditRow]:
    """Records of ``events`` from each broker's audit log (broker -> records), by time."""
    wanted = set(events)
    rows = [
        AuditRow(broker, int(str(r.get("time_ms", 0))), str(r.get("event", "")),
                 str(r.get("actor", "")), str(r.get("subject", "")), str(r.get("outcome", "")),
                 str(r.get("reason", "")))
        for broker, recs in records.items() for r in recs if r.get("event") in wanted
    ]
    rows.sort(key=lambda row: (row.time_ms, row.broker))
    return rows


@dataclass(frozen=True, slots=True)
class StoredObject:
    name: str
    size: int
    kind: str  # manifest | shard | checkpoint | job description


def plaintext_hits(data: bytes, corpus_texts: Iterable[str]) -> int:
    """How many lines (of at least :data:`MIN_NEEDLE` characters) of the corpus ``data``
    contains."""
    hits = 0
    for text in corpus_texts:
        for line in text.splitlines():
            line = line.strip()
            if len(line) >= MIN_NEEDLE and line.encode() in data:
                hits += 1
    return hits


def human_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    raise AssertionError("unreachable")
