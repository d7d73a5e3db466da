"""What a fuzz harness is, and the one property every harness checks.

A :class:`Harness` feeds bytes to one parser of untrusted input along the path production
runs (the verifier's ``verify``, the reader's decrypt, the servicer behind the request
interceptor, ...). The property, checked by :func:`check` for every input:

* the parser returns, or raises one of the harness's ``expected`` errors (the module's
  documented error type: ``MalformedEvidence``, ``FormatError``, ``DecryptionError``,
  ``PolicyError``, ...); any other exception is a finding;
* the harness's own ``run`` may add checks (a gRPC status from the error table, never
  INTERNAL; the server still answers afterwards) by raising :class:`PropertyViolation`.

Memory: every parser checks lengths against documented maxima before it allocates. The fuzz
runner caps the process RSS (``-rss_limit_mb``) and the corpus replay (``tests/fuzz``) checks
the peak of Python allocations per input against ``max_alloc``.

This module imports nothing of the project and nothing of atheris: the replay in ``make test``
needs neither a fuzzer nor instrumentation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Harness", "PropertyViolation", "check", "repo_root", "vectors_dir"]


class PropertyViolation(AssertionError):
    """The parser did something its contract forbids (a wrong status, a dead server, ...)."""


@dataclass(frozen=True)
class Harness:
    """One fuzz target.

    ``run(data)`` drives the parser; ``expected`` are the errors it may raise on bad input;
    ``seeds()`` yields ``(name, bytes)`` pairs for the starting corpus (from ../shared/vectors
    and the project's own encoders); ``max_len`` bounds the fuzzer's inputs (above the
    parser's own maximum where it has one, so the size check itself is exercised);
    ``mutator`` is a structure-aware libFuzzer custom mutator ``(data, max_size, seed) ->
    bytes`` where the format has one.
    """

    name: str
    parser: str  # what is fuzzed, for the listing and the report
    run: Callable[[bytes], object]
    expected: tuple[type[BaseException], ...]
    seeds: Callable[[], Iterable[tuple[str, bytes]]]
    max_len: int = 16384
    max_alloc: int = 64 << 20
    mutator: Callable[[bytes, int, int], bytes] | None = None
    notes: str = ""
    setup: Callable[[], None] | None = field(default=None)


def check(harness: Harness, data: bytes) -> None:
    """Run one input; return if the property holds, raise (the finding) if it does not."""
    with contextlib.suppress(*harness.expected):
        harness.run(data)


def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


def vectors_dir() -> Path:
    """``../shared/vectors`` beside the checkout (as in CI), else /work/shared/vectors."""
    here = repo_root().parent / "shared" / "vectors"
    return here if here.is_dir() else Path("/work/shared/vectors")
