"""The report's small pure helpers: goal verdicts, percentiles, popularity draws."""
from __future__ import annotations

import math
import random

import pytest

from bench.common import goal_line
from bench.run import pct, popularity


@pytest.mark.parametrize("value, op, goal, verdict", [
    (0.95, ">=", 0.9, "**met** (0.95x)"),
    (0.9, ">=", 0.9, "**met** (0.9x)"),
    (0.81, ">=", 0.9, "**missed** (0.81x, 10.0% short)"),
    (1.2, "<=", 1.3, "**met** (1.2x)"),
    (1.69, "<=", 1.3, "**missed** (1.69x, 30.0% over)"),
    (100.0, "<", 100, "**missed** (100x, 0.0% over)"),
    (float("nan"), ">=", 0.9, "**not measured**"),
])
def test_goal_line(value, op, goal, verdict):
    line = goal_line("ratio", value, op, goal, "x")
    assert line == f"- Goal ratio {op} {goal:g}x: {verdict}"


def test_goal_line_rejects_unknown_operator():
    with pytest.raises(ValueError):
        goal_line("ratio", 1.0, "==", 1.0)


@pytest.mark.parametrize("xs, q, want", [
    ([3.0, 1.0, 2.0], 0.5, 2.0),
    ([1.0, 2.0, 3.0, 4.0], 0.5, 2.0),
    ([1.0, 2.0, 3.0, 4.0], 0.99, 4.0),
    ([5.0], 0.9, 5.0),
])
def test_pct_is_nearest_rank(xs, q, want):
    assert pct(xs, q) == want


def test_pct_of_nothing_is_nan():
    assert math.isnan(pct([], 0.5))


@pytest.mark.parametrize("kind, distinct", [("distinct", 8), ("identical", 1)])
def test_popularity_fixed_workloads(kind, distinct):
    picks = popularity(kind, 16, 8, random.Random(0))
    assert len(picks) == 16 and len(set(picks)) == distinct


def test_popularity_zipf_favours_the_first_adapter():
    picks = popularity("zipf", 2000, 8, random.Random(0))
    counts = [picks.count(i) for i in range(8)]
    assert counts[0] > counts[1] > counts[7] and all(0 <= p < 8 for p in picks)
