"""The in-repo fuzz corpus and every regression input, replayed (no fuzzing, no atheris).

Each input goes through its harness once (fuzz/harnesses): the parser returns or raises its
documented error, request handlers answer with a status from the error table, and the peak
of Python allocations stays under the harness's bound. ``python -m fuzz run`` is what fuzzes;
this keeps what earlier runs found from coming back.
"""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import pytest

from fuzz.__main__ import corpus_dir, regression_dir
from fuzz.base import check
from fuzz.harnesses import all_harnesses

HARNESSES = all_harnesses()


def _inputs(name: str) -> list[Path]:
    return sorted(corpus_dir(name).glob("*")) + sorted(regression_dir(name).glob("*"))


@pytest.mark.parametrize("name", sorted(HARNESSES))
def test_corpus_replays_within_the_property(name: str) -> None:
    harness = HARNESSES[name]
    inputs = _inputs(name)
    assert any(p.name.startswith("seed-") for p in inputs), f"{name} has no seed corpus"
    for path in inputs:
        data = path.read_bytes()
        assert len(data) <= max(harness.max_len, 1 << 20), path
        tracemalloc.start()
        try:
            check(harness, data)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak <= harness.max_alloc, f"{path}: {peak} bytes allocated"


def test_every_regression_input_belongs_to_a_harness() -> None:
    root = regression_dir("x").parent
    assert {p.name for p in root.iterdir() if p.is_dir()} <= set(HARNESSES)


def test_a_violation_is_reported() -> None:
    """The replay would see a finding: an error outside the documented ones escapes."""
    from fuzz.base import Harness

    def parser(data: bytes) -> None:
        if data == b"boom":
            raise KeyError("not the documented error")
        raise ValueError("documented")

    h = Harness("t", "t", parser, (ValueError,), lambda: ())
    check(h, b"fine")
    with pytest.raises(KeyError):
        check(h, b"boom")


def test_broker_harness_reports_internal_and_a_dead_broker(monkeypatch) -> None:
    """The request harness's own checks can fail: an exception escaping the domain becomes
    INTERNAL (a finding), and so does a broker that stops answering afterwards."""
    from fuzz.base import PropertyViolation
    from fuzz.harnesses import broker
    from kms_broker._proto.kmsbroker.v1 import broker_pb2 as pb
    from kms_broker.domain.admin import Admin
    from kms_broker.domain.node_flow import NodeFlow

    b = broker._broker()
    index = next(i for i, m in enumerate(b.methods) if m[0].endswith("/Challenge"))
    data = bytes([index]) + pb.ChallengeRequest(node_id="n1", job_id="j").SerializeToString()
    broker._run(data)  # fine as it is

    def boom(*args, **kwargs):
        raise RuntimeError("a bug")

    with monkeypatch.context() as m:
        m.setattr(NodeFlow, "challenge", boom)
        with pytest.raises(PropertyViolation, match="INTERNAL"):
            broker._run(data)
    with monkeypatch.context() as m:
        m.setattr(Admin, "list_datasets", boom)
        with pytest.raises(PropertyViolation, match=r"after .*ListDatasets ended INTERNAL"):
            broker._run(data)
