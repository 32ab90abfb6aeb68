"""`make bench` / `make bench-quick`: one report of Quiver against its peers, with plots.

    .venv/bin/python -m bench.run --quick     # < 10 min on 2 cores: smallest sizes
    .venv/bin/python -m bench.run             # the full report (tens of minutes on 2 cores)
    .venv/bin/python -m bench.run --only floor serve   # some sections

Writes bench/results/<date>-<host>.md and PNG plots beside it. Every section runs its peers in
the same run (ratios only mean something within one run on these noisy machines), takes the
median of repetitions, and states its command, sizes and the goal it is judged against.
"""
from __future__ import annotations

import argparse
import datetime
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
from argparse import Namespace
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.adapters import TYPES, write_random_adapter
from bench.common import machine_line, table, versions_line

RESULTS = Path(__file__).parent / "results"


class Report:
    def __init__(self, path: Path, quick: bool):
        self.path, self.quick = path, quick
        self.parts = [f"# Quiver benchmark report ({'quick' if quick else 'full'})", "",
                      f"- machine: {machine_line()}", f"- versions: {versions_line()}",
                      f"- command: `python -m bench.run {' '.join(sys.argv[1:])}`", ""]

    def section(self, title: str, text: str) -> None:
        self.parts += [f"## {title}", "", text, ""]
        self.path.write_text("\n".join(self.parts))
        print(f"\n## {title}\n\n{text}", flush=True)

    def plot(self, name: str, draw) -> str:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.6))
        draw(ax)
        fig.tight_layout()
        out = self.path.with_name(f"{self.path.stem}-{name}.png")
        fig.savefig(out, dpi=110)
        plt.close(fig)
        return f"![{name}]({out.name})"


# ---- a served workload -----------------------------------------------------------------------
def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


class Served:
    """A `quiver serve` subprocess over an adapter dir, and a client."""

    def __init__(self, adapter_dir: Path, slots: int, max_running: int = 64):
        from bench.serve_bench import start_server
        from runtime.server.client import QuiverClient

        args = Namespace(quantize="nf4", clients=slots, rank=16, max_batch_tokens=512, model=None, dtype=None)
        self.proc, self.address = start_server(args, adapter_dir)
        self.client = QuiverClient(self.address, timeout=3600)

    def close(self) -> None:
        self.client.close()
        self.proc.terminate()
        self.proc.wait(timeout=120)


def run_load(client, jobs: list[tuple[str, str]], new_tokens: int) -> dict:
    """Each job (adapter, prompt) is one streamed request; all start at once. Returns figures."""
    ttft, tpot, gaps = [], [], []
    total = [0]
    lock = threading.Lock()

    def one(job):
        t0 = time.perf_counter()
        stamps = []
        for msg in client.generate_stream(job[1], job[0], max_new_tokens=new_tokens, ignore_eos=True):
            if msg.generated_token_count:
                stamps.append(time.perf_counter())
            last = msg
        with lock:
            total[0] += last.generated_token_count
            if stamps:
                ttft.append(stamps[0] - t0)
                if len(stamps) > 1:
                    tpot.append((stamps[-1] - stamps[0]) / (len(stamps) - 1))
                    gaps.extend(b - a for a, b in zip(stamps, stamps[1:]))

    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(jobs)) as pool:
        list(pool.map(one, jobs))
    wall = time.perf_counter() - t0
    return {"tokens_per_s": total[0] / wall, "wall_s": wall, "ttft": ttft, "tpot": tpot, "gaps": gaps}


def prompts(n: int) -> list[str]:
    from bench.serve_bench import prompts as p

    return p(n)


# ---- sections ----------------------------------------------------------------------------------
def sec_floor(rep: Report, cfg, q: bool) -> None:
    from bench.decode_bench import _quiver, base_rows, hf_nf4_model

    base = _quiver("nf4")
    args = Namespace(batches=[1, 8, 32] if q else [1, 8, 32, 128], reps=3 if q else 5)
    rows = base_rows(args, base, hf_nf4_model())
    md = table(["batch", "quiver step ms", "NF4 floor ms", "step/floor", "transformers ms/token",
                "transformers/quiver"], rows)
    img = rep.plot("floor", lambda ax: (
        ax.plot([r[0] for r in rows], [r[1] for r in rows], "o-", label="quiver step"),
        ax.plot([r[0] for r in rows], [r[2] for r in rows], "s--", label="NF4 matmul floor"),
        ax.plot([r[0] for r in rows], [r[4] for r in rows], "^-", label="transformers+bnb"),
        ax.set_xscale("log", base=2), ax.set_xlabel("batch"), ax.set_ylabel("ms per decode step"),
        ax.legend()))
    rep.section("Decode step vs the NF4 floor and transformers",
                "Goal: step <= 1.3x floor at batch 32; faster than transformers at every batch.\n\n"
                + md + "\n\n" + img)


def sec_multi(rep: Report, cfg, q: bool) -> None:
    from bench.decode_bench import _quiver, hf_nf4_model, multi_rows

    n = 8 if q else 64
    rows = multi_rows(Namespace(adapters=n, reps=3), _quiver("nf4"), hf_nf4_model())
    rep.section(f"Decode step, {n} rows over {n} distinct LoRA adapters (r=16, all projections)",
                "Goal: Quiver >= 0.9x of its base step. `base/multi` is the fraction of base-model "
                "speed kept with adapters.\n\n"
                + table(["system", "rows", "multi-adapter ms", "base ms", "base/multi"], rows))


def make_adapters(root: Path, cfg, kinds: list[str]) -> list[str]:
    ids = []
    for i, kind in enumerate(kinds):
        write_random_adapter(cfg, kind, root / f"{kind}-{i}", seed=1000 + i)
        ids.append(f"{kind}-{i}")
    return ids


def sec_serve(rep: Report, cfg, q: bool) -> None:
    counts = [1, 8] if q else [1, 8, 64, 256]
    clients, new_tokens = (8, 16) if q else (64, 32)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ids = make_adapters(Path(tmp), cfg, ["lora"] * max(counts))
        srv = Served(Path(tmp), slots=min(max(counts), 64))
        try:
            texts = prompts(clients)
            for a in ids[: max(counts)]:
                srv.client.generate(texts[0], a, max_new_tokens=1)
            base = run_load(srv.client, [("", t) for t in texts], new_tokens)
            rows.append(["base", clients, base["tokens_per_s"], 1.0])
            for n in counts:
                r = run_load(srv.client, [(ids[i % n], t) for i, t in enumerate(texts)], new_tokens)
                rows.append([f"{n} adapters", clients, r["tokens_per_s"], r["tokens_per_s"] / base["tokens_per_s"]])
        finally:
            srv.close()
        peft = peft_rows(cfg, Path(tmp), ids[: min(8, max(counts))], prompts(min(8, clients)), new_tokens)
    img = rep.plot("throughput", lambda ax: (
        ax.bar([r[0] for r in rows], [r[2] for r in rows]), ax.set_ylabel("generated tokens/s"),
        ax.set_title(f"{clients} concurrent streams, {new_tokens} tokens each")))
    rep.section("Throughput vs number of distinct LoRA adapters (end to end through gRPC)",
                f"Goals: multi-adapter >= 0.9x base; 256 adapters >= 0.85x 1 adapter; >= 10x PEFT "
                f"mixed batch. PEFT is capped at 8 prompts (it is slow here), same prompts and "
                f"adapters.\n\n" + table(["load", "clients", "tokens/s", "x base"], rows)
                + "\n\n" + table(["PEFT", "prompts", "tokens/s"], peft) + "\n\n" + img)


def peft_rows(cfg, adapter_dir: Path, ids: list[str], texts: list[str], new_tokens: int) -> list:
    from bench.serve_bench import bench_peft
    from runtime.models.hf import resolve_model_dir

    args = Namespace(quantize="nf4", dtype=None, requests=1, new_tokens=new_tokens)
    mixed = bench_peft(args, resolve_model_dir(None), adapter_dir, ids, texts)
    one = bench_peft(args, resolve_model_dir(None), adapter_dir, ids[:1], texts[:1])
    return [["mixed batch (adapter_names)", len(texts), mixed.tokens_per_s],
            ["one adapter at a time (1 prompt)", 1, one.tokens_per_s]]


def popularity(kind: str, n_req: int, n_adapters: int, rng: random.Random) -> list[int]:
    if kind == "distinct":
        return list(range(n_req))
    if kind == "identical":
        return [0] * n_req
    if kind == "uniform":
        return [rng.randrange(n_adapters) for _ in range(n_req)]
    weights = [1 / (i + 1) ** 1.5 for i in range(n_adapters)]  # Zipf, s = 1.5
    return rng.choices(range(n_adapters), weights, k=n_req)


def sec_popularity(rep: Report, cfg, q: bool) -> None:
    clients, new_tokens = (8, 16) if q else (32, 32)
    rng = random.Random(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ids = make_adapters(Path(tmp), cfg, ["lora"] * clients)
        srv = Served(Path(tmp), slots=clients)
        try:
            texts = prompts(clients)
            for a in ids:
                srv.client.generate(texts[0], a, max_new_tokens=1)
            for kind in ("distinct", "uniform", "skewed", "identical"):
                pick = popularity(kind, clients, clients, rng)
                r = run_load(srv.client, [(ids[i], t) for i, t in zip(pick, texts)], new_tokens)
                rows.append([kind, len(set(pick)), r["tokens_per_s"], pct(r["ttft"], 0.5) * 1e3])
        finally:
            srv.close()
    rep.section("Adapter popularity (Punica workloads)",
                f"{clients} concurrent streams over up to {clients} LoRA adapters; skewed = Zipf(1.5).\n\n"
                + table(["workload", "distinct adapters", "tokens/s", "TTFT p50 ms"], rows))


def sec_types(rep: Report, cfg, q: bool) -> None:
    clients, new_tokens = (6, 16) if q else (24, 32)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        mixed = make_adapters(Path(tmp), cfg, [TYPES[i % len(TYPES)] for i in range(clients)])
        lora = make_adapters(Path(tmp), cfg, ["lora"] * clients)
        srv = Served(Path(tmp), slots=2 * clients)
        try:
            texts = prompts(clients)
            for a in mixed + lora:
                srv.client.generate(texts[0], a, max_new_tokens=1)
            for name, ids in (("LoRA only", lora), ("all six types mixed", mixed)):
                r = run_load(srv.client, list(zip(ids, texts)), new_tokens)
                rows.append([name, r["tokens_per_s"], pct(r["ttft"], 0.5) * 1e3])
        finally:
            srv.close()
    rep.section("Mixed adapter types in one batch",
                f"LoRA, DoRA, AdaLoRA, prompt tuning, p-tuning and prefix tuning, {clients} streams.\n\n"
                + table(["load", "tokens/s", "TTFT p50 ms"], rows))


def sec_latency(rep: Report, cfg, q: bool) -> None:
    levels, new_tokens = ((2, 8), 16) if q else ((8, 32), 48)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ids = make_adapters(Path(tmp), cfg, ["lora"] * max(levels))
        srv = Served(Path(tmp), slots=max(levels))
        try:
            texts = prompts(max(levels))
            for a in ids:
                srv.client.generate(texts[0], a, max_new_tokens=1)
            for n in levels:
                r = run_load(srv.client, [(ids[i], texts[i]) for i in range(n)], new_tokens)
                rows.append([n] + [pct(r["ttft"], p) * 1e3 for p in (0.5, 0.9, 0.99)]
                            + [pct(r["tpot"], p) * 1e3 for p in (0.5, 0.9, 0.99)])
        finally:
            srv.close()
    rep.section("Latency (ms) at two load levels",
                table(["streams", "TTFT p50", "TTFT p90", "TTFT p99", "TPOT p50", "TPOT p90", "TPOT p99"], rows))


def sec_memory(rep: Report, cfg, q: bool) -> None:
    from bench.decode_bench import _quiver
    from runtime.adapters.peft_format import read_adapter
    from runtime.nn.kv_cache import KVCache

    base = _quiver("nf4")
    nbytes = base.model.base_bytes()
    params = sum(l.base.in_features * l.base.out_features for l in base.model.adapted_linears().values())
    rows = [["decoder projections (NF4 + stats)", nbytes["projections"], nbytes["projections"] / params],
            ["embeddings, norms (tied lm_head)", nbytes["other"], ""]]
    with tempfile.TemporaryDirectory() as tmp:
        for kind in TYPES:
            write_random_adapter(cfg, kind, Path(tmp) / kind, 1)
            rows.append([f"adapter: {kind} (r=16 / 16 virtual tokens)", read_adapter(Path(tmp) / kind, cfg).nbytes, ""])
    rows.append(["KV cache per token", KVCache(cfg, max_tokens=16).bytes_per_token(), ""])
    rep.section("Memory", "Goal: <= 0.6 bytes per parameter for the quantized projections.\n\n"
                + table(["what", "bytes", "bytes/param"], rows))


def sec_hotload(rep: Report, cfg, q: bool) -> None:
    streams, new_tokens, loads = (4, 48, 3) if q else (16, 96, 8)
    with tempfile.TemporaryDirectory() as tmp:
        ids = make_adapters(Path(tmp), cfg, ["lora"] * (streams + loads))
        srv = Served(Path(tmp), slots=streams + loads)
        try:
            texts = prompts(streams)
            for a in ids[:streams]:
                srv.client.generate(texts[0], a, max_new_tokens=1)
            steady = run_load(srv.client, list(zip(ids, texts)), new_tokens)
            load_ms, result = [], {}
            t = threading.Thread(target=lambda: result.update(run_load(srv.client, list(zip(ids, texts)), new_tokens)))
            t.start()
            time.sleep(2.0)
            for a in ids[streams:]:
                t0 = time.perf_counter()
                srv.client.load_adapter(a, str(Path(tmp) / a))
                load_ms.append((time.perf_counter() - t0) * 1e3)
            t.join()
        finally:
            srv.close()
    med_step = statistics.median(steady["gaps"])
    rows = [["LoadAdapter RPC (read + validate, r=16 all projections) p50 ms", statistics.median(load_ms)],
            ["median inter-token gap without loads, ms", med_step * 1e3],
            ["max inter-token gap without loads, ms", max(steady["gaps"]) * 1e3],
            ["max inter-token gap while loading, ms", max(result["gaps"]) * 1e3],
            ["max gap while loading / median step", max(result["gaps"]) / med_step]]
    rep.section("Adapter hot-load", f"Goal: load < 100 ms, no inter-token gap > 2 steps. {loads} loads "
                f"while {streams} streams run.\n\n" + table(["figure", "value"], rows))


def sec_train(rep: Report, cfg, q: bool) -> None:
    try:
        from bench.train_bench import report_rows
    except ImportError:
        rep.section("Training", "bench/train_bench.py is not available in this checkout.")
        return
    rep.section("Training tokens/s vs PEFT QLoRA", report_rows(quick=q))


SECTIONS = {"floor": sec_floor, "multi": sec_multi, "serve": sec_serve, "popularity": sec_popularity,
            "types": sec_types, "latency": sec_latency, "memory": sec_memory, "hotload": sec_hotload,
            "train": sec_train}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smallest sizes (< 10 min on 2 cores)")
    p.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    p.add_argument("--out", default=None, help="report path (default bench/results/<date>-<host>.md)")
    args = p.parse_args(argv)
    from runtime.models.hf import load_model_config, resolve_model_dir

    cfg = load_model_config(resolve_model_dir(None))
    RESULTS.mkdir(exist_ok=True)
    out = Path(args.out) if args.out else RESULTS / f"{datetime.date.today()}-{platform.node()}.md"
    rep = Report(out, args.quick)
    for name, run_section in SECTIONS.items():
        if name in args.only:
            t0 = time.perf_counter()
            run_section(rep, cfg, args.quick)
            print(f"[{name}: {time.perf_counter() - t0:.0f} s]", file=sys.stderr, flush=True)
    print(f"\nreport: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
