"""Serving figures on a GPU: a SmolLM2-135M-shaped base with random weights, 64 LoRA adapters.

    python3 -m bench.gpu_figures --device cuda --out "$OUT/gpu-figures.md"   # scripts/gpu_check.sh
    .venv/bin/python -m bench.gpu_figures --device cpu --tiny --out /tmp/gpu-smoke.md   # smoke check

The lent GPU machine has no network and no model hub, so the base is built here: a Llama with
SmolLM2-135M's exact shape (`.gpu-wheels/smollm2-config/config.json`, copied from Quiver's
converted embedded model by `scripts/gpu_check.sh --fetch`) and random weights, saved as an HF
directory next to the real tokenizer. Speed does not depend on the weights' values: every figure
is greedy with ignore_eos, so every request generates exactly its token count. `--tiny` swaps in a
2-layer, 64-wide config of the same family (the CPU smoke check); `--model DIR` serves an existing
HF directory instead.

Figures, through gRPC against a real `quiver serve --device D` subprocess (bench/run.py's run_load
/ run_phases drive the streams; phases interleaved, medians of --reps):
- batch-1 streaming decode: one request, --decode-tokens tokens; tokens/s = 1 / median TPOT, and
  end to end (TTFT included);
- 64 concurrent requests x --tokens tokens on the base, and the same over 64 distinct LoRA
  adapters (r=16, all seven projections, bench/adapters.py write_lora): tokens/s, ratio to base;
- in-process decode step time (one engine-shaped step, 32-token histories) at batch 1 and 64, and
  64 rows over 64 adapters (the step bench/decode_bench.py quiver_step_fn times, on the device).
"""
from __future__ import annotations

import argparse
import datetime
import json
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from bench.peers import free_port

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / ".gpu-wheels" / "smollm2-config"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                   "generation_config.json", "special_tokens_map.json")
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)
PORTS = range(18800, 18900)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_figures", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--out", required=True, help="markdown file to write")
    p.add_argument("--model", default=None, help="an existing HF model dir (default: build one)")
    p.add_argument("--tiny", action="store_true", help="a tiny config of the same family (smoke check)")
    p.add_argument("--config-dir", default=str(CONFIG_DIR),
                   help="config.json + tokenizer files to build from (default .gpu-wheels/smollm2-config; "
                        "falls back to the embedded model's directory)")
    p.add_argument("--work", default=None, help="scratch dir for the model and adapters (default: a temp dir)")
    p.add_argument("--adapters", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--tokens", type=int, default=32, help="tokens per request of the concurrent phases")
    p.add_argument("--decode-tokens", type=int, default=128, help="tokens of the batch-1 stream")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--server-timeout", type=float, default=150, help="seconds to wait for the server")
    return p.parse_args(argv)


# ---- the model and adapters --------------------------------------------------------------------
def config_source(config_dir: str) -> Path:
    """Where config.json and the tokenizer come from: --config-dir if it has them, else the
    embedded model's converted directory (present on a Quiver dev machine, not on the GPU box)."""
    d = Path(config_dir)
    if (d / "config.json").is_file() and (d / "tokenizer.json").is_file():
        return d
    from runtime.models.embedded import embedded_model_dir

    fallback = Path(embedded_model_dir())
    if not (fallback / "config.json").is_file():
        raise SystemExit(f"no config.json + tokenizer.json under {d} or {fallback}: "
                         "run `bash scripts/gpu_check.sh --fetch` first")
    return fallback


def build_model(src: Path, dest: Path, tiny: bool) -> Path:
    """A random-weight Llama of src's config.json (TINY overrides with --tiny), saved as bf16
    safetensors with src's tokenizer files beside it."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    raw = json.loads((src / "config.json").read_text())
    if raw.get("model_type") not in (None, "llama"):
        raise SystemExit(f"{src}/config.json is a {raw.get('model_type')!r} model, not llama")
    cfg = LlamaConfig(**{**raw, **(TINY if tiny else {})})
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.device("cpu"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(dest))
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, dest / name)
    n = sum(p.numel() for p in model.parameters())
    print(f"built a random {cfg.num_hidden_layers}-layer llama ({n / 1e6:.1f}M params) in "
          f"{time.perf_counter() - t0:.1f}s at {dest}", file=sys.stderr, flush=True)
    return dest


def write_adapters(model_dir: Path, root: Path, n: int) -> list[str]:
    from bench.adapters import write_lora
    from runtime.models.hf import load_model_config

    cfg = load_model_config(model_dir)
    t0 = time.perf_counter()
    for i in range(n):
        write_lora(cfg, root / f"a{i}", seed=1000 + i, rank=16)
    print(f"wrote {n} LoRA adapters (r=16, 7 projections) in {time.perf_counter() - t0:.1f}s",
          file=sys.stderr, flush=True)
    return [f"a{i}" for i in range(n)]


# ---- the server ----------------------------------------------------------------------------------
def start_server(model_dir: Path, adapter_dir: Path, device: str, slots: int, streams: int,
                 timeout: float) -> tuple[subprocess.Popen, str]:
    """`quiver serve` as a subprocess; returns once it prints its "quiver serving on" line."""
    port = free_port(PORTS)
    cmd = [sys.executable, "-m", "runtime.cli", "serve", "--model", str(model_dir), "--device", device,
           "--adapter-dir", str(adapter_dir), "--max-device-adapters", str(slots),
           "--max-running", str(max(64, streams)), "--port", str(port), "--metrics-port", "-1",
           "--http-port", "-1"]
    print("server:", " ".join(cmd), file=sys.stderr, flush=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    ready: list[str] = []
    lines: list[str] = []

    def pump():
        for line in proc.stdout:
            if not ready and line.startswith("quiver serving on "):
                ready.append(line.split()[3])
            elif not ready:
                lines.append(line.rstrip())
                print("  server:", line.rstrip(), file=sys.stderr, flush=True)

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout
    while not ready:
        if proc.poll() is not None:
            raise RuntimeError(f"quiver serve exited with {proc.returncode}: " + " | ".join(lines[-5:]))
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"quiver serve not ready after {timeout:.0f}s")
        time.sleep(0.1)
    return proc, ready[0]


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---- measurements --------------------------------------------------------------------------------
def served_figures(address: str, ids: list[str], args) -> dict:
    from bench.run import run_load, run_phases
    from bench.serve_bench import prompts
    from runtime.server.client import QuiverClient

    client = QuiverClient(address, timeout=600)
    try:
        texts = prompts(args.concurrency)
        run_load(client, [("", texts[0])], 4, 1)  # warm-up: first-call allocations
        run_load(client, [(a, t) for a, t in zip(ids, prompts(len(ids)))], 1, args.concurrency)  # loads
        singles = [run_load(client, [("", texts[0])], args.decode_tokens, 1) for _ in range(args.reps)]
        phases = {"base": [("", t) for t in texts],
                  "adapters": [(ids[i % len(ids)], t) for i, t in enumerate(texts)]}
        res = run_phases(client, phases, args.tokens, args.concurrency, args.reps)
    finally:
        client.close()
    tpot = statistics.median(s["tpot"][0] for s in singles if s["tpot"])
    return {"decode_tps": 1 / tpot, "e2e_tps": statistics.median(s["tokens_per_s"] for s in singles),
            "ttft_ms": statistics.median(s["ttft"][0] for s in singles) * 1e3,
            "base_tps": res["base"]["tokens_per_s"], "adapters_tps": res["adapters"]["tokens_per_s"]}


def step_figures(model_dir: Path, adapter_dir: Path, ids: list[str], device: str, reps: int) -> dict:
    from bench.common import median_time
    from bench.decode_bench import quiver_step_fn
    from runtime.adapters.peft_format import read_adapter
    from runtime.adapters.registry import AdapterRegistry
    from runtime.models.base import load_base

    base = load_base(str(model_dir), "nf4", device=device)  # the serving defaults on this device
    reps = max(5, 3 * reps)
    out = {"kernels": base.kernel_line(), "dtype": str(base.dtype).removeprefix("torch.")}
    for b in (1, 64):
        out[f"step_{b}_ms"] = median_time(quiver_step_fn(base.model, b), reps, warmup=2) * 1e3
    reg = AdapterRegistry(base.model, num_slots=len(ids), max_rank=16)
    for a in ids:
        reg.add(a, read_adapter(adapter_dir / a, base.config, max_rank=16))
    slots = sorted(reg.acquire(a)[0] for a in ids)
    n = len(ids)
    out["multi_rows"] = n
    out["step_multi_ms"] = median_time(quiver_step_fn(base.model, n, slots, reg), reps, warmup=2) * 1e3
    out["step_multi_base_ms"] = median_time(quiver_step_fn(base.model, n), reps, warmup=2) * 1e3
    return out


# ---- the report ----------------------------------------------------------------------------------
def device_line(device: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    vers = []
    for pkg in ("bitsandbytes", "transformers", "grpcio"):
        try:
            vers.append(f"{pkg} {version(pkg)}")
        except PackageNotFoundError:
            vers.append(f"{pkg} missing")
    cuda = f" (CUDA {torch.version.cuda})" if device == "cuda" else ""
    return f"{name}; torch {torch.__version__}{cuda}, {', '.join(vers)}"


def report(args, model_desc: str, served: dict | None, steps: dict | None, errors: list[str]) -> str:
    from bench.common import table

    lines = [f"# Quiver on {args.device}: serving figures", "",
             f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
             f"- device: {device_line(args.device)}",
             f"- model: {model_desc}; NF4 + double quant, `quiver serve --device {args.device}` defaults",
             f"- command: `python -m bench.gpu_figures {' '.join(sys.argv[1:])}`", ""]
    if served:
        n = args.adapters
        rows = [["batch-1 stream, decode (1 / TPOT)", f"1 x {args.decode_tokens}", round(served["decode_tps"]), ""],
                ["batch-1 stream, end to end", f"1 x {args.decode_tokens}", round(served["e2e_tps"]),
                 f"TTFT {served['ttft_ms']:.0f} ms"],
                ["base", f"{args.concurrency} x {args.tokens}", round(served["base_tps"]), "1.00x"],
                [f"{n} distinct LoRA adapters", f"{args.concurrency} x {args.tokens}", round(served["adapters_tps"]),
                 f"{served['adapters_tps'] / served['base_tps']:.2f}x base"]]
        lines += ["## Through gRPC (streamed, greedy, ignore_eos)", "",
                  f"Medians of {args.reps}; the concurrent phases interleaved; LoRA r=16 on all seven "
                  f"projections, {n} device slots, warm (each adapter loaded once before timing).", "",
                  table(["load", "requests x tokens", "tokens/s", "note"], rows), ""]
    if steps:
        n = steps["multi_rows"]
        rows = [[1, "base", steps["step_1_ms"]], [64, "base", steps["step_64_ms"]],
                [n, f"{n} distinct adapters", steps["step_multi_ms"]], [n, "base (same rows)", steps["step_multi_base_ms"]]]
        lines += ["## In-process decode step (32-token histories)", "",
                  f"{steps['kernels']}; median of several steps"
                  f"{' (each synchronized)' if args.device == 'cuda' else ''}.", "",
                  table(["rows", "adapters", "ms per step"], rows), ""]
    if errors:
        lines += ["## Failures", ""] + [f"- {e}" for e in errors] + [""]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout`: still stop the server
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="quiver-gpu-figures-"))
    shutil.rmtree(work / "adapters", ignore_errors=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if args.model:
        model_dir, desc = Path(args.model), f"{args.model} (as given)"
    else:
        src = config_source(args.config_dir)
        model_dir = build_model(src, work / "model", args.tiny)
        desc = (f"random weights, {'tiny test' if args.tiny else 'SmolLM2-135M'} shape "
                f"(config from {src})")
    ids = write_adapters(model_dir, work / "adapters", args.adapters)
    served = steps = None
    errors: list[str] = []
    proc = None
    try:
        proc, address = start_server(model_dir, work / "adapters", args.device, args.adapters,
                                     args.concurrency, args.server_timeout)
        served = served_figures(address, ids, args)
    except Exception as e:  # the step figures still run; the report says what failed
        errors.append(f"served figures: {type(e).__name__}: {e}")
    finally:
        if proc is not None:
            stop_server(proc)
    out.write_text(report(args, desc, served, None, errors))
    try:
        steps = step_figures(model_dir, work / "adapters", ids, args.device, args.reps)
    except Exception as e:
        errors.append(f"step figures: {type(e).__name__}: {e}")
    text = report(args, desc, served, steps, errors)
    out.write_text(text)
    print(text)
    print(f"bench.gpu_figures: {time.perf_counter() - t0:.0f}s, wrote {out}", file=sys.stderr)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
