"""Quiver on Ray Serve (runtime/distributed): replica scaling and adapter affinity. A benchmark,
not a test: it prints a markdown report and writes it to bench/results/<date>-ray.md.

    .venv/bin/python -m bench.ray_bench                       # the README figures
    .venv/bin/python -m bench.ray_bench --requests 96 --affinity-requests 200   # quicker

1. Throughput: the same closed-loop load (--clients concurrent clients, --requests completions
   of --new-tokens tokens over 8 LoRAs) through the ingress on 1 replica, then on 2 replicas
   (1 CPU and 1 torch thread each); generated tokens per second and their ratio.
2. Affinity: 32 LoRAs, 2 replicas of 8 device slots each (Serve's per-replica LRU of 8 ids),
   requests drawn from a Zipf(1) popularity over the 32; the share of requests answered by a
   replica that already held the adapter (the replica's x-quiver-adapter-resident header),
   with adapter routing (Serve's model multiplexing) and with Serve's plain routing.

The model is a small random Llama (word-level tokenizer), unquantized fp32: the point is the
serving layer, not the kernels. A local Ray instance (--cpus) is started and stopped here.
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from bench.common import machine_line, table

SHAPE = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=512, max_position_embeddings=512)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray instance (default 2)")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=192, help="throughput requests per configuration")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--affinity-requests", type=int, default=400)
    p.add_argument("--port", type=int, default=19650, help="the Serve HTTP proxy's port")
    p.add_argument("--out", default=None, help="report path (default bench/results/<date>-ray.md)")
    return p.parse_args(argv)


def make_model(root: Path) -> Path:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    d = root / "model"
    LlamaForCausalLM(LlamaConfig(**SHAPE)).eval().save_pretrained(str(d))
    vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, SHAPE["vocab_size"])}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(str(d))
    return d


def make_adapters(model_dir: Path, root: Path, n: int) -> list[str]:
    from bench.adapters import write_lora
    from runtime.config import ModelConfig

    cfg = ModelConfig.from_hf_dict(json.loads((model_dir / "config.json").read_text()))
    ids = [f"lora-{i:02d}" for i in range(n)]
    for i, adapter_id in enumerate(ids):
        write_lora(cfg, root / adapter_id, seed=i, rank=8)
    return ids


@dataclass
class Load:
    seconds: float
    tokens: int
    resident: int  # answers whose replica held the adapter already
    answered: int


def run_load(url: str, jobs: list[str], clients: int, new_tokens: int, prompt_seed: int = 0) -> Load:
    """Each job: one completion for that adapter id, `clients` at a time."""
    import httpx

    rng = random.Random(prompt_seed)
    prompts = [" ".join(f"w{rng.randrange(1, 500)}" for _ in range(16)) for _ in jobs]
    counts = {"tokens": 0, "resident": 0, "answered": 0}
    lock = threading.Lock()
    local = threading.local()

    def one(i: int) -> None:
        if not hasattr(local, "client"):
            local.client = httpx.Client(timeout=300)
        r = local.client.post(f"{url}/v1/completions", json={
            "model": jobs[i], "prompt": prompts[i], "max_tokens": new_tokens, "temperature": 0,
            "ignore_eos": True})
        r.raise_for_status()
        with lock:
            counts["tokens"] += r.json()["usage"]["completion_tokens"]
            counts["resident"] += r.headers.get("x-quiver-adapter-resident") == "1"
            counts["answered"] += 1

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, range(len(jobs))))
    return Load(time.perf_counter() - t0, counts["tokens"], counts["resident"], counts["answered"])


def deploy(model_dir: Path, store: Path, replicas: int, slots: int, route_by_adapter: bool = True) -> None:
    from ray import serve

    from runtime.config import ServerConfig
    from runtime.distributed.app import RayOptions, build_app

    cfg = ServerConfig(model=str(model_dir), quantize="none", dtype="float32", device="cpu", threads=1,
                       adapter_store=str(store), max_device_adapters=slots, max_lora_rank=8,
                       served_model_name="base", grace_period_s=2)
    serve.run(build_app(cfg, RayOptions(num_replicas=replicas, replica_cpus=1, route_by_adapter=route_by_adapter)),
              name="quiver", route_prefix="/")


def zipf_jobs(ids: list[str], n: int, seed: int = 1) -> list[str]:
    weights = [1 / (k + 1) for k in range(len(ids))]
    return random.Random(seed).choices(ids, weights=weights, k=n)


def main(argv=None) -> int:
    args = parse_args(argv)
    import ray
    from ray import serve

    work = Path(tempfile.mkdtemp(prefix="quiver-ray-bench-"))
    temp = tempfile.mkdtemp(prefix="qrb-", dir="/tmp")
    try:
        model_dir = make_model(work)
        store = work / "adapters"
        ids = make_adapters(model_dir, store, 32)
        ray.init(num_cpus=args.cpus, include_dashboard=False, namespace="quiver-bench", _temp_dir=temp,
                 log_to_driver=False)
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        url = f"http://127.0.0.1:{args.port}"
        jobs = [ids[i % 8] for i in range(args.requests)]
        scaling = {}
        for n in (1, 2):
            deploy(model_dir, store, n, slots=8)
            run_load(url, jobs[: 2 * args.clients], args.clients, args.new_tokens)  # warm-up
            scaling[n] = run_load(url, jobs, args.clients, args.new_tokens)
            serve.delete("quiver")
        affinity = {}
        trace = zipf_jobs(ids, args.affinity_requests)
        for routed in (True, False):
            deploy(model_dir, store, 2, slots=8, route_by_adapter=routed)
            affinity[routed] = run_load(url, trace, 4, 4)
            serve.delete("quiver")
        report = render(args, scaling, affinity)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            shutil.rmtree(work, ignore_errors=True)
            shutil.rmtree(temp, ignore_errors=True)
    print(report)
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / f"{time.strftime('%Y-%m-%d')}-ray.md"
    out.write_text(report)
    return 0


def render(args, scaling: dict[int, Load], affinity: dict[bool, Load]) -> str:
    rows = [[f"{n} replica{'s' * (n > 1)}", f"{r.tokens}", f"{r.seconds:.1f}", f"{r.tokens / r.seconds:.0f}"]
            for n, r in scaling.items()]
    ratio = (scaling[2].tokens / scaling[2].seconds) / (scaling[1].tokens / scaling[1].seconds)
    aff = [[label, f"{r.answered}", f"{100 * r.resident / r.answered:.1f}%"]
           for label, r in (("adapter routing (Serve multiplexing)", affinity[True]),
                            ("plain routing (power of two choices)", affinity[False]))]
    return "\n".join([
        "# Quiver on Ray Serve: replica scaling and adapter affinity",
        "",
        f"Machine: {machine_line()}; Ray {__import__('ray').__version__}, local instance of {args.cpus} CPUs.",
        f"Command: `.venv/bin/python -m bench.ray_bench --clients {args.clients} --requests {args.requests} "
        f"--new-tokens {args.new_tokens} --affinity-requests {args.affinity_requests}`",
        f"Model: random Llama {SHAPE['num_hidden_layers']} layers x {SHAPE['hidden_size']}, fp32, unquantized; "
        "1 CPU and 1 torch thread per replica.",
        "",
        f"## Throughput ({args.clients} clients, {args.requests} requests x {args.new_tokens} tokens over 8 LoRAs)",
        "",
        table(["configuration", "tokens", "seconds", "tokens/s"], rows),
        "",
        f"2 replicas / 1 replica: **{ratio:.2f}x**",
        "",
        f"## Affinity (32 LoRAs, Zipf(1) popularity, {args.affinity_requests} requests, 2 replicas x 8 slots)",
        "",
        table(["routing", "requests", "served by a replica holding the adapter"], aff),
        "",
    ])


if __name__ == "__main__":
    raise SystemExit(main())
