"""Serving benchmark: many LoRA adapters vs the base alone, end to end through gRPC, and PEFT.

    .venv/bin/python -m bench.serve_bench --clients 8 --new-tokens 16            # quick
    .venv/bin/python -m bench.serve_bench --clients 64 --new-tokens 128 --requests 4   # issue 4

One run, one machine, three measurements on the same prompts:

  quiver-adapters  N concurrent clients, client i streams its requests with adapter a{i}: N LoRA
                   adapters (rank --rank, all seven projections) in one continuous batch.
  quiver-base      the same N clients and prompts, adapter_id "" (base model), same server.
  peft-mixed       Hugging Face PEFT on transformers (+ bitsandbytes NF4 when --quantize nf4):
                   all N prompts as one `generate(..., adapter_names=[a0..aN-1])` batch, greedy,
                   exactly --new-tokens each, repeated --requests times.

The server is a real `quiver serve` subprocess on loopback (the clients here are threads in this
process, so they never share a GIL with the engine). Every request is greedy with ignore_eos, so
each generates exactly --new-tokens tokens. Throughput = generated tokens / wall time of the
phase; TTFT = request sent -> first streamed token, per request (PEFT does not stream: n/a).
Adapters are random (B != 0) and written in PEFT's format by runtime.adapters.write_adapter, so
PEFT loads exactly the same files. Prints a markdown table with date, machine and versions.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from runtime.config import ModelConfig
from runtime.models.hf import load_model_config, resolve_model_dir

TOPICS = ["the ocean", "a quiet library", "mountain weather", "old computers", "city gardens",
          "night trains", "bread baking", "chess openings", "desert plants", "jazz records",
          "river bridges", "winter birds", "paper maps", "street food", "lighthouses", "clocks"]


@dataclass
class PhaseResult:
    name: str
    requests: int
    tokens: int
    wall_s: float
    ttft_s: list[float]

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s

    def ttft(self, q: float) -> str:
        if not self.ttft_s:
            return "n/a"
        xs = sorted(self.ttft_s)
        return f"{xs[min(len(xs) - 1, int(q * len(xs)))] * 1e3:.0f} ms"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.serve_bench", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="HF model dir (default: the embedded SmolLM2-135M)")
    p.add_argument("--quantize", default="nf4", choices=("nf4", "fp4", "none"))
    p.add_argument("--dtype", default=None)
    p.add_argument("--clients", type=int, default=8, help="concurrent clients = LoRA adapters")
    p.add_argument("--requests", type=int, default=1, help="requests per client (sequential)")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--max-batch-tokens", type=int, default=512)
    p.add_argument("--skip-peft", action="store_true")
    p.add_argument("--out", default=None, help="also append the table to this markdown file")
    return p.parse_args(argv)


# ---- adapters and prompts ------------------------------------------------------------------------
def make_adapters(cfg: ModelConfig, root: Path, n: int, rank: int) -> list[str]:
    """n random LoRA adapters on every projection of every layer, in PEFT's on-disk format."""
    from bench.adapters import write_lora

    for i in range(n):
        write_lora(cfg, root / f"a{i}", seed=1000 + i, rank=rank)
    return [f"a{i}" for i in range(n)]


def prompts(n: int) -> list[str]:
    return [f"Write a short paragraph about {TOPICS[i % len(TOPICS)]} (variation {i}):" for i in range(n)]


# ---- the Quiver server -----------------------------------------------------------------------------
def start_server(args, adapter_dir: Path) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "runtime.cli", "serve", "--port", "0", "--metrics-port", "-1",
           "--http-port", "-1",
           "--quantize", args.quantize, "--adapter-dir", str(adapter_dir),
           "--max-device-adapters", str(args.clients), "--max-lora-rank", str(args.rank),
           "--max-running", str(max(64, args.clients)), "--max-batch-tokens", str(args.max_batch_tokens),
           "--max-queue", str(4 * args.clients), "--grpc-workers", str(max(64, 2 * args.clients))]
    for flag, value in (("--model", args.model), ("--dtype", args.dtype)):
        if value:
            cmd += [flag, value]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if line.startswith("quiver serving on "):
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
            return proc, line.split()[3]
        print("  server:", line.rstrip(), file=sys.stderr)
    raise RuntimeError(f"quiver serve exited with {proc.wait()}")


def run_phase(client, name: str, jobs: list[tuple[str, str]], requests: int, new_tokens: int) -> PhaseResult:
    """len(jobs) concurrent clients; client i sends `requests` streams of jobs[i] in a row."""
    ttfts: list[float] = []
    tokens = [0]
    lock = threading.Lock()

    def one_client(job):
        adapter_id, prompt = job
        for _ in range(requests):
            t0 = time.perf_counter()
            first, last = None, None
            for msg in client.generate_stream(prompt, adapter_id, max_new_tokens=new_tokens, ignore_eos=True):
                if first is None and msg.generated_token_count:
                    first = time.perf_counter() - t0
                last = msg
            with lock:
                ttfts.append(first)
                tokens[0] += last.generated_token_count

    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(jobs)) as pool:
        list(pool.map(one_client, jobs))
    return PhaseResult(name, len(jobs) * requests, tokens[0], time.perf_counter() - t0, ttfts)


def bench_quiver(args, adapter_dir: Path, adapter_ids: list[str], texts: list[str]) -> list[PhaseResult]:
    from runtime.server.client import QuiverClient

    proc, address = start_server(args, adapter_dir)
    try:
        with QuiverClient(address, timeout=3600) as q:
            for a in ["", *adapter_ids]:  # warm-up: loads every adapter, touches every code path
                q.generate(texts[0], a, max_new_tokens=2)
            results = [
                run_phase(q, "quiver-adapters", list(zip(adapter_ids, texts)), args.requests, args.new_tokens),
                run_phase(q, "quiver-base", [("", t) for t in texts], args.requests, args.new_tokens),
            ]
    finally:
        proc.terminate()
        proc.wait(timeout=120)
    return results


# ---- PEFT ------------------------------------------------------------------------------------------
class PeftServer:
    """Hugging Face PEFT on transformers (+ bitsandbytes when quantized) with several adapters
    loaded once; `generate` runs one greedy batch, row i with adapter_ids[i] (`adapter_names=`)."""

    def __init__(self, args, model_dir: Path, adapter_dir: Path, adapter_ids: list[str]):
        import warnings

        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(args.dtype, torch.float32)
        if self.device == "cuda" and args.dtype is None:
            dtype = torch.bfloat16
        quant = None
        if args.quantize != "none":
            quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=args.quantize,
                                       bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
        self.tok = AutoTokenizer.from_pretrained(str(model_dir))
        self.tok.padding_side = "left"
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token or self.tok.unk_token  # a tiny test tokenizer has no EOS
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            base = AutoModelForCausalLM.from_pretrained(str(model_dir), quantization_config=quant,
                                                        dtype=dtype, device_map=self.device)
            self.model = PeftModel.from_pretrained(base, str(adapter_dir / adapter_ids[0]),
                                                   adapter_name=adapter_ids[0])
            for a in adapter_ids[1:]:
                self.model.load_adapter(str(adapter_dir / a), adapter_name=a)
        self.model.eval()

    def generate(self, texts: list[str], adapter_ids: list[str], new_tokens: int) -> int:
        """Exactly new_tokens greedy tokens per row; returns the generated token count."""
        batch = self.tok(texts, return_tensors="pt", padding=True).to(self.device)
        with torch.no_grad():
            out = self.model.generate(**batch, adapter_names=adapter_ids, max_new_tokens=new_tokens,
                                      min_new_tokens=new_tokens, do_sample=False,
                                      pad_token_id=self.tok.pad_token_id)
        return (out.shape[1] - batch["input_ids"].shape[1]) * out.shape[0]

    def phase(self, name: str, texts: list[str], adapter_ids: list[str], new_tokens: int,
              requests: int = 1, warmup: bool = True) -> PhaseResult:
        """A 2-token warm-up (unless warmup=False), then `requests` timed batches of all texts."""
        if warmup:
            self.generate(texts, adapter_ids, 2)
        t0 = time.perf_counter()
        tokens = sum(self.generate(texts, adapter_ids, new_tokens) for _ in range(requests))
        return PhaseResult(name, len(texts) * requests, tokens, time.perf_counter() - t0, [])


def bench_peft(args, model_dir: Path, adapter_dir: Path, adapter_ids: list[str], texts: list[str]) -> PhaseResult:
    """peft-mixed: all prompts in one batch, prompt i with adapter i, --requests times."""
    peft = PeftServer(args, model_dir, adapter_dir, adapter_ids)
    return peft.phase("peft-mixed", texts, adapter_ids, args.new_tokens, args.requests)


# ---- report ----------------------------------------------------------------------------------------
def _v(pkg: str) -> str:
    try:
        return version(pkg)
    except PackageNotFoundError:
        return "-"


def machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {gpu}"


def table(args, results: list[PhaseResult], model_name: str) -> str:
    by = {r.name: r for r in results}
    base = by["quiver-base"].tokens_per_s
    lines = [
        f"### serve_bench {dt.datetime.now().strftime('%Y-%m-%d %H:%M')}",
        "",
        f"- machine: {machine()}; python {platform.python_version()}",
        f"- versions: quiver {_v('quiver')}, torch {torch.__version__}, transformers {_v('transformers')}, "
        f"peft {_v('peft')}, bitsandbytes {_v('bitsandbytes')}, grpcio {_v('grpcio')}",
        f"- model {model_name}, quantize {args.quantize}; {args.clients} clients x {args.requests} "
        f"requests, {args.new_tokens} new tokens each (greedy, ignore_eos); LoRA r={args.rank} on "
        f"all 7 projections, one adapter per client",
        f"- command: `python -m bench.serve_bench {' '.join(sys.argv[1:])}`",
        "",
        "| setup | requests | tokens | wall s | tokens/s | vs quiver-base | TTFT p50 | TTFT p99 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(f"| {r.name} | {r.requests} | {r.tokens} | {r.wall_s:.2f} | {r.tokens_per_s:.1f} | "
                     f"{r.tokens_per_s / base:.2f}x | {r.ttft(0.5)} | {r.ttft(0.99)} |")
    if "peft-mixed" in by:
        lines += ["", f"quiver-adapters / peft-mixed throughput: "
                      f"{by['quiver-adapters'].tokens_per_s / by['peft-mixed'].tokens_per_s:.1f}x"]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    model_dir = resolve_model_dir(args.model)
    cfg = load_model_config(model_dir)
    texts = prompts(args.clients)
    with tempfile.TemporaryDirectory(prefix="quiver-bench-") as tmp:
        adapter_dir = Path(tmp)
        print(f"writing {args.clients} LoRA adapters (r={args.rank}) ...", file=sys.stderr)
        ids = make_adapters(cfg, adapter_dir, args.clients, args.rank)
        print("quiver phases ...", file=sys.stderr)
        results = bench_quiver(args, adapter_dir, ids, texts)
        if not args.skip_peft:
            print("peft phase ...", file=sys.stderr)
            results.append(bench_peft(args, model_dir, adapter_dir, ids, texts))
    report = table(args, results, cfg.name or model_dir.name)
    print(report)
    if args.out:
        with open(args.out, "a") as f:
            f.write(report + "\n\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
