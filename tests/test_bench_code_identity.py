"""The pairing of benchmarks/bench_code_identity.py: a steady drift of the machine's speed
during a round does not move a round's ratio, and every round runs both kinds equally often."""

from __future__ import annotations

import pytest

from benchmarks.bench_code_identity import paired_ratio, round_order


@pytest.mark.parametrize("drift", [0.0, 0.05, -0.03, 0.4])
@pytest.mark.parametrize("i", [0, 1])
def test_a_linear_drift_cancels_out_of_a_rounds_ratio(i: int, drift: float):
    cost = {"checked": 3.6, "unchecked": 3.4, "cold": 4.0}
    runs = [(name, cost[name] * (1 + drift * k)) for k, name in enumerate(round_order(i))
            if name != "cold"]
    assert paired_ratio(runs, "checked") == pytest.approx(3.6 / 3.4, rel=1e-12)


def test_a_single_run_per_kind_would_not_cancel_it():
    runs = [("checked", 3.6), ("unchecked", 3.4 * 1.4)]  # the same drift, one run each
    assert paired_ratio(runs, "checked") != pytest.approx(3.6 / 3.4, rel=1e-3)


def test_rounds_alternate_abba_and_baab_and_end_with_the_cold_run():
    assert round_order(0) == ("checked", "unchecked", "unchecked", "checked", "cold")
    assert round_order(1) == ("unchecked", "checked", "checked", "unchecked", "cold")
    for i in range(4):
        order = round_order(i)
        assert order.count("checked") == order.count("unchecked") == 2
