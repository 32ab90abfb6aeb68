"""The decode step of an engine stepping on a thread of its own (`start(engine_thread=True)`,
as a Ray replica runs it), with the model loaded on the caller's thread vs on a passing one.

    .venv/bin/python -m bench.engine_thread                 # 2 processes of each, alternately

Each measurement is a fresh process (the embedded model, NF4, the server's defaults, no ports
but gRPC's): one warm request, then a 300-token greedy base stream; the figure is the median
engine step of the stream. Why it differs: runtime/nn/kernels.py::on_passing_thread.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys

from bench.common import machine_line, table, versions_line

PROBE = """
import statistics, sys, time
from runtime.config import ServerConfig
from runtime.engine.engine import Engine
from runtime.engine.params import StoppingParams
from runtime.nn.kernels import on_passing_thread
from runtime.server.app import build_server
from runtime.server.core import GenerateCall, Prompt

steps = []
step = Engine.step
def timed(self):
    t0 = time.perf_counter(); out = step(self); steps.append((time.perf_counter() - t0, out.rows)); return out
Engine.step = timed
cfg = ServerConfig(port=0, metrics_port=None, http_port=None)
srv = (on_passing_thread(build_server, cfg) if sys.argv[1] == "passing" else build_server(cfg)).start(engine_thread=True)
def stream(n):
    call = GenerateCall("", Prompt(text="Tell me a long story about a river."),
                        stopping=StoppingParams(max_new_tokens=n, ignore_eos=True))
    for _ in srv.core.submit(call):
        pass
stream(16)
steps.clear()
stream(300)
print(statistics.median(s for s, rows in steps if rows == 1))
srv.shutdown(grace_s=1)
"""


def measure(where: str) -> float:
    out = subprocess.run([sys.executable, "-c", PROBE, where], capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return float(out.stdout.split()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2)
    a = p.parse_args(argv)
    got: dict[str, list[float]] = {"caller": [], "passing": []}
    for _ in range(a.rounds):
        for where in got:
            got[where].append(measure(where))
            print(f"model loaded on the {where} thread: step {got[where][-1] * 1e3:.2f} ms", flush=True)
    print("\n## Decode step with the engine on its own thread\n")
    print(machine_line() + "  \n" + versions_line() + "\n")
    print(table(["model loaded on", "median step (ms)", "runs (ms)"],
                [[f"the {w} thread", f"{statistics.median(v) * 1e3:.2f}", " ".join(f"{x * 1e3:.2f}" for x in v)]
                 for w, v in got.items()]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
