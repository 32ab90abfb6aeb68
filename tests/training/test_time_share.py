"""TimeShare: while requests wait, training takes at most --train-share of the engine thread's
time (whatever a slice costs against a serving step); idle, it takes all of it."""
from __future__ import annotations

import pytest

from runtime.training.scheduler import IDLE_SLICE_S, MIN_SLICE_S, WHOLE_AFTER_S, TimeShare


def _busy_share(share: float, step_s: float, slice_s: float, rounds: int = 20_000) -> float:
    """The engine loop's calls under constant traffic: after each serving step the hook is asked;
    the fraction of time that went to training."""
    ts = TimeShare(share)
    served = trained = 0.0
    for _ in range(rounds):
        served += step_s
        ts.served(step_s)
        if ts.may_train(busy=True):
            trained += slice_s
            ts.trained(True, slice_s)
    return trained / (trained + served)


def _traffic(ts: TimeShare, steps: int, step_s: float, fixed_cost_s: float = 0.0) -> tuple[float, list[float]]:
    """`steps` serving steps of `step_s`, a slice after each one the credit allows, each taking
    its budget plus `fixed_cost_s`: (time served, the slices' wall times)."""
    served, walls = 0.0, []
    for _ in range(steps):
        ts.served(step_s)
        served += step_s
        if ts.may_train(busy=True):
            walls.append(ts.budget(busy=True) + fixed_cost_s)
            ts.trained(True, walls[-1])
    return served, walls


@pytest.mark.parametrize("share, step_s, slice_s", [
    (0.3, 0.010, 0.030),   # slices longer than a step: one slice every few steps
    (0.3, 0.010, 0.002),   # slices shorter than a step: capped by the credit, not by the count
    (0.1, 0.030, 3.5),     # SmolLM2-sized optimizer steps against decode steps
    (0.5, 0.020, 0.020),
])
def test_busy_share_converges_to_train_share(share, step_s, slice_s):
    """At most one slice follows each serving step, so very short slices take less than the share."""
    expected = min(share, slice_s / (slice_s + step_s))
    assert _busy_share(share, step_s, slice_s) == pytest.approx(expected, abs=0.01)


def test_a_step_a_slice_slows_down_is_charged_to_training():
    """Each slice makes the serving step after it `slowdown` longer: slices and slowdowns
    together stay within the share, and the budget follows the usual step, not the slow one."""
    share, step_s, slowdown = 0.3, 0.005, 0.010
    ts = TimeShare(share)
    served = trained = 0.0
    after = False
    for _ in range(20_000):
        took = step_s + (slowdown if after else 0.0)
        served += step_s
        trained += took - step_s
        ts.served(took)
        after = ts.may_train(busy=True)
        if after:
            budget = ts.budget(busy=True)
            trained += budget
            ts.trained(True, budget)
    assert trained / (trained + served) <= share + 0.01
    assert ts.budget(busy=True) == pytest.approx(0.0025, rel=0.05)


def test_short_slices_never_exceed_the_share():
    for slice_s in (0.0001, 0.002, 0.01, 0.05, 1.0):
        assert _busy_share(0.3, 0.010, slice_s) <= 0.3 + 0.01


def test_idle_slices_are_short_and_traffic_then_earns_a_half_step_slice_first():
    ts = TimeShare(0.3)
    for _ in range(5):
        assert ts.may_train(busy=False) and ts.budget(busy=False) == IDLE_SLICE_S
        ts.trained(False, IDLE_SLICE_S)
    served = 0.0
    while not ts.may_train(busy=True):  # a request arrived: served until a slice is earned
        ts.served(0.01)
        served += 0.01
    assert ts.budget(busy=True) == pytest.approx(0.005)  # the slice: half a serving step
    assert served == pytest.approx(0.005 * 0.7 / 0.3, abs=0.011)


def test_idle_pieces_last_as_long_as_the_quiet_so_far_and_steps_run_whole_only_after_a_while():
    """Right after traffic an idle piece is a busy slice (half a step), then as long as the
    engine has been idle, up to IDLE_SLICE_S; whole steps once idle WHOLE_AFTER_S; traffic
    starts it over. So a request that comes while training runs waits about its quiet at most."""
    now = [100.0]
    ts = TimeShare(0.3, clock=lambda: now[0])
    for _ in range(10):
        ts.served(0.005)
    assert ts.budget(busy=False) == pytest.approx(0.0025) and not ts.whole(busy=False)
    now[0] += 0.02
    assert ts.budget(busy=False) == pytest.approx(0.02)
    now[0] += 0.5
    assert ts.budget(busy=False) == IDLE_SLICE_S and not ts.whole(busy=False)
    now[0] += WHOLE_AFTER_S
    assert ts.whole(busy=False) and not ts.whole(busy=True)
    ts.served(0.005)
    assert ts.budget(busy=False) == pytest.approx(0.0025) and not ts.whole(busy=False)
    assert TimeShare(0.3).whole(busy=False)  # never served: idle for ever


def test_a_burst_gets_half_step_slices_at_most_the_share_of_its_time():
    """48 decode steps of 5 ms after idle training (the embedded model's figures): slices of half
    a step's budget, together at most the share of the burst's time."""
    ts = TimeShare(0.3)
    ts.trained(False, IDLE_SLICE_S)
    served, budgets = _traffic(ts, 48, 0.005)
    assert budgets and all(b == pytest.approx(0.0025) for b in budgets)
    assert sum(budgets) / (sum(budgets) + served) <= 0.3 + 0.01


def test_the_budget_follows_recent_steps_not_one_long_prefill():
    ts = TimeShare(0.3)
    for _ in range(20):
        ts.served(0.005)
    ts.served(0.200)  # one prefill step
    assert ts.budget(busy=True) < 0.07
    for _ in range(20):
        ts.served(0.005)
    assert ts.budget(busy=True) == pytest.approx(0.0025, rel=0.05)
    tiny = TimeShare(0.3)
    tiny.served(1e-6)
    assert tiny.budget(busy=True) == MIN_SLICE_S


def test_a_slices_fixed_cost_comes_off_its_budget():
    """Slices that take 1 ms beyond the time they are given (attach, hand-offs): the budget
    shrinks by that much, so a slice's wall time is the half step it should be; a cost above
    the whole slice leaves MIN_PIECE_S, and the share still holds."""
    from runtime.training.scheduler import MIN_PIECE_S

    ts = TimeShare(0.3)
    served, walls = _traffic(ts, 2000, 0.006, fixed_cost_s=0.001)
    assert ts.budget(busy=True) == pytest.approx(0.002, rel=0.02)
    assert walls[-1] == pytest.approx(0.003, rel=0.02)  # half of a 6 ms step, all costs in
    assert sum(walls) / (sum(walls) + served) <= 0.3 + 0.01
    heavy = TimeShare(0.3)
    for _ in range(50):
        heavy.served(0.004)
        heavy.trained(True, heavy.budget(busy=True) + 0.005)
    assert heavy.budget(busy=True) == MIN_PIECE_S


def test_the_slice_is_the_given_part_of_a_step():
    ts = TimeShare(0.3, slice_steps=1.0)
    ts.served(0.01)
    assert ts.budget(busy=True) == pytest.approx(0.01)


def test_share_one_trains_after_every_step_and_bad_shares_are_refused():
    ts = TimeShare(1.0)
    ts.served(0.01)
    assert ts.may_train(busy=True)
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError):
            TimeShare(bad)
