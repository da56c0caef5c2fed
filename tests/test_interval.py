"""orchestrator.training.interval: the Young-Daly checkpoint interval and the goodput model.

    .venv/bin/python -m pytest tests/test_interval.py -q
"""

from __future__ import annotations

import math
import random

import pytest

from orchestrator.training import interval


def test_young_daly_interval_in_seconds_and_steps():
    # C = 10 s, MTBF = 2 h: sqrt(2 * 10 * 7200) = 379.47 s; at 1 s per step, 379 steps
    assert interval.young_daly_seconds(10.0, 2.0) == pytest.approx(math.sqrt(2 * 10 * 7200))
    assert interval.young_daly_steps(10.0, 1.0, 2.0) == 379
    assert interval.young_daly_steps(10.0, 0.5, 2.0) == 759
    # clamped: never below min_steps, never above max_steps (e.g. the phase length)
    assert interval.young_daly_steps(0.01, 60.0, 0.01, min_steps=5) == 5
    assert interval.young_daly_steps(10.0, 1.0, 2.0, max_steps=100) == 100
    # four times the stall or the MTBF doubles the interval
    assert interval.young_daly_steps(40.0, 1.0, 2.0) == pytest.approx(2 * 379, abs=1)


@pytest.mark.parametrize("args, match", [((0.0, 1.0, 2.0), "stall"), ((10.0, 0.0, 2.0), "step time"),
                                         ((10.0, 1.0, -1.0), "mtbf_hours"), ((math.nan, 1.0, 2.0), "stall"),
                                         ((10.0, 1.0, math.inf), "mtbf_hours")])
def test_bad_inputs_name_what_is_wrong(args, match):
    with pytest.raises(ValueError, match=match):
        interval.young_daly_steps(*args)
    with pytest.raises(ValueError, match="min_steps"):
        interval.young_daly_steps(10.0, 1.0, 2.0, min_steps=10, max_steps=5)


def test_the_young_daly_interval_maximises_the_expected_goodput():
    stall, restart, mtbf = 30.0, 120.0, 5.0
    best = interval.young_daly_seconds(stall, mtbf)
    grid = [best * f for f in (0.25, 0.5, 0.8, 0.9, 0.95, 1.0, 1.05, 1.1, 1.25, 2.0, 4.0)]
    goodputs = [interval.expected_goodput(stall, t, restart, mtbf) for t in grid]
    at_best = goodputs[grid.index(best)]
    assert at_best > max(goodputs) - 2e-4  # the first-order optimum is within 0.02 points of the best
    assert at_best > interval.expected_goodput(stall, best / 2, restart, mtbf) + 5e-3
    assert at_best > interval.expected_goodput(stall, best * 2, restart, mtbf) + 5e-3
    # at the optimum the waste is about sqrt(2 C / M) + R / M
    m = mtbf * 3600
    assert 1 - at_best == pytest.approx(math.sqrt(2 * stall / m) + restart / m, rel=0.05)
    assert interval.job_mtbf_hours(100.0, 4) == 25.0
    with pytest.raises(ValueError):
        interval.job_mtbf_hours(100.0, 0)


def test_a_seeded_simulation_agrees_with_the_first_order_goodput():
    """Exponential failures, lost work since the last checkpoint, restarts: within half a point of the
    formula while the period and the restart are small against the MTBF."""
    stall, restart, mtbf = 20.0, 300.0, 3.0
    for t in (interval.young_daly_seconds(stall, mtbf), 120.0, 30.0):
        sim = interval.simulate_goodput(stall, t, restart, mtbf, work_s=3.0e7, rng=random.Random(0))
        assert sim == pytest.approx(interval.expected_goodput(stall, t, restart, mtbf), abs=0.005)
    # and it can tell a bad interval from the optimum
    good = interval.simulate_goodput(stall, interval.young_daly_seconds(stall, mtbf), restart, mtbf,
                                     work_s=3.0e7, rng=random.Random(1))
    bad = interval.simulate_goodput(stall, 30.0, restart, mtbf, work_s=3.0e7, rng=random.Random(1))
    assert good > bad + 0.1


def test_scale_table_rows():
    rows = [{"gpus": 64, "gpus_per_node": 8, "step_s": 1.0, "stall_s": 5.0, "node_mtbf_hours": 80.0}]
    (row,) = interval.scale_table(rows, (30.0, 300.0), every_steps=1000)
    assert row["job_mtbf_hours"] == 10.0 and row["auto_steps"] == round(math.sqrt(2 * 5 * 36000))
    assert len(row["goodput_auto"]) == 2 and row["goodput_auto"][0] > row["goodput_auto"][1]
    assert 0 < row["goodput_fixed"] < 1
