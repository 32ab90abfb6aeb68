"""A base stream's time per token before and after a hot load, in one `quiver serve`.

    .venv/bin/python -m bench.load_slowdown                  # rank 64, all projections, 3 servers
    .venv/bin/python -m bench.load_slowdown --rank 16 --servers 2

Each round starts a fresh `quiver serve` on the embedded model (a subprocess, free ports),
streams greedy base-model completions over HTTP (--stream-tokens each, --streams of them),
hot-loads one random LoRA (bench/adapters.py; rank --rank on all seven projections) through
vLLM's load route, and streams again. The figure is the median TPOT after / before.

Why: a parallel torch op on any thread but the engine's starts an OpenMP team of its own, and
libgomp then throttles the barriers of every team in the process for the rest of its life
(runtime/nn/kernels.py::helper_thread). A rank-64 adapter's B tensors ([out, 64]) are above
ATen's grain, so its load on the loader thread ran such an op.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from bench.common import machine_line, table, versions_line


def measure(rank: int, stream_tokens: int, streams: int, port: int) -> tuple[float, float]:
    """(median TPOT s before, after) the hot load, in one fresh server."""
    import httpx

    from bench import train_bench
    from bench.adapters import write_lora
    from runtime.config import ModelConfig
    from runtime.models.embedded import embedded_model_dir

    with tempfile.TemporaryDirectory() as root:
        cfg = ModelConfig.from_hf_dict(json.loads((embedded_model_dir() / "config.json").read_text()))
        adapter = Path(root) / "load-probe"
        write_lora(cfg, adapter, seed=0, rank=rank)
        srv = train_bench.ServeProcess(str(Path(root) / "data"), None, 0.3, port,
                                       extra_args=("--allow-adapter-root", root, "--max-lora-rank", str(max(rank, 16))))
        try:
            srv.stream(8)  # warm
            before = [train_bench.stream_figures(srv.stream(stream_tokens))[0] for _ in range(streams)]
            r = httpx.post(f"{str(srv.client.base_url).rstrip('/')}/load_lora_adapter", timeout=120,
                           json={"lora_name": "load-probe", "lora_path": str(adapter)},
                           headers={"Authorization": f"Bearer {train_bench.ADMIN}"})
            if r.status_code != 200:
                raise RuntimeError(f"the load was refused: {r.status_code} {r.text}")
            time.sleep(0.5)
            after = [train_bench.stream_figures(srv.stream(stream_tokens))[0] for _ in range(streams)]
        finally:
            srv.close()
    return statistics.median(before), statistics.median(after)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--servers", type=int, default=3, help="fresh servers, one load each")
    p.add_argument("--stream-tokens", type=int, default=128)
    p.add_argument("--streams", type=int, default=4, help="streams before and after the load")
    p.add_argument("--port", type=int, default=19780)
    a = p.parse_args(argv)
    rows = []
    for i in range(a.servers):
        before, after = measure(a.rank, a.stream_tokens, a.streams, a.port)
        rows.append([i + 1, f"{before * 1e3:.2f}", f"{after * 1e3:.2f}", f"{after / before:.2f}x"])
        print(f"server {i + 1}: TPOT {before * 1e3:.2f} ms -> {after * 1e3:.2f} ms after the load", flush=True)
    ratios = [float(r[3][:-1]) for r in rows]
    print(f"\n## A base stream before and after a hot load (LoRA rank {a.rank}, all projections)\n")
    print(machine_line() + "  \n" + versions_line() + "\n")
    print(table(["server", "TPOT before (ms)", "TPOT after (ms)", "after / before"], rows))
    print(f"\nmedian after / before: {statistics.median(ratios):.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
