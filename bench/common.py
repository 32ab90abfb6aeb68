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
