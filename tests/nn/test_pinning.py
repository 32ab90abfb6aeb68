"""The engine's OpenMP team pinned one thread per CPU (runtime/nn/kernels.py::bind_threads).

Each case runs on a thread of its own: a team belongs to the thread that starts it, and the
pinning to the team's threads, so the test process's own threads stay as they were."""
from __future__ import annotations

import os
import threading

import pytest
import torch

from runtime.nn import kernels, native

pytestmark = pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or native.bind_threads_kernel() is None,
                                reason="needs Linux CPU affinity and the native extension")


def _on_a_thread(threads: int, fn):
    out = {}

    def run():
        torch.set_num_threads(threads)
        out["value"], out["mine"] = fn(), os.sched_getaffinity(0)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    return out["value"], out["mine"]


def test_the_team_is_pinned_one_thread_per_cpu_the_caller_on_the_first():
    cpus = sorted(os.sched_getaffinity(0))
    before = os.sched_getaffinity(0)
    bound, mine = _on_a_thread(len(cpus), kernels.bind_threads)
    assert bound == cpus
    assert mine == {cpus[0]}
    assert os.sched_getaffinity(0) == before  # the calling test thread is untouched


@pytest.mark.parametrize("extra", [1, -1])
def test_a_team_other_than_the_cpus_is_not_pinned(extra):
    """More threads than CPUs: no CPU per thread; fewer: the other CPUs are someone else's (Ray
    replicas of one CPU each on one machine must not all land on the first)."""
    cpus = os.sched_getaffinity(0)
    if len(cpus) + extra < 1:
        pytest.skip("one CPU: no smaller team")
    bound, mine = _on_a_thread(len(cpus) + extra, kernels.bind_threads)
    assert bound is None and mine == cpus
