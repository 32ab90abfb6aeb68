"""Shared pieces of the benchmarks: timing, machine facts, markdown tables.

Every figure is the median of several repetitions, and ratios are taken within one run: these
machines are noisy, so only same-run comparisons mean anything.
"""
from __future__ import annotations

import datetime
import os
import platform
import statistics
import time
from typing import Callable


def median_time(fn: Callable[[], object], reps: int = 5, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def paired_median_times(fns: list[Callable[[], object]], reps: int = 5, warmup: int = 1) -> list[float]:
    """median_time of each fn, timed in turns (a, b, a, b, ...): on a shared VM the machine's
    pace drifts by 10-20% between seconds, which back-to-back runs would put into the ratio."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) for ts in times]


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_line() -> str:
    import torch

    dev = "cuda " + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return (f"{datetime.date.today().isoformat()}, {platform.node()}, {os.cpu_count()} cores, "
            f"{cpu_model()}, {dev}, torch {torch.__version__}, python {platform.python_version()}")


def versions_line() -> str:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for pkg in ("transformers", "bitsandbytes", "peft", "grpcio"):
        try:
            out.append(f"{pkg} {version(pkg)}")
        except PackageNotFoundError:
            pass
    return ", ".join(out)


def table(headers: list[str], rows: list[list[object]]) -> str:
    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def goal_line(what: str, value: float, op: str, goal: float, unit: str = "") -> str:
    """One verdict line: met, or missed and by how much (relative to the goal).

        goal_line("multi-adapter / base", 0.83, ">=", 0.9, "x")
        -> "- Goal multi-adapter / base >= 0.9x: **missed** (0.83x, 7.8% short)"
    """
    if op not in (">=", "<=", "<", ">"):
        raise ValueError(f"op must be one of >=, <=, <, >; got {op!r}")
    head = f"- Goal {what} {op} {goal:g}{unit}:"
    if value != value:  # NaN: nothing was measured
        return f"{head} **not measured**"
    met = {">=": value >= goal, ">": value > goal, "<=": value <= goal, "<": value < goal}[op]
    if met:
        return f"{head} **met** ({value:.3g}{unit})"
    off = abs(value - goal) / abs(goal) * 100 if goal else float("inf")
    return f"{head} **missed** ({value:.3g}{unit}, {off:.1f}% {'short' if op[0] == '>' else 'over'})"
