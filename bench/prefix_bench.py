"""The prefix cache's goals (issue 14), on the engine in this process (no gRPC in the figures):

    ttft        a shared system prompt (400 tokens) and 16 requests with different user turns:
                the first request alone, then the other 15 at once; TTFT p50 of those 15 with the
                prefix cache vs `--no-prefix-cache` (goal >= 5x lower)
    throughput  requests with no shared prefix: generated tokens/s with vs without the cache
                (goal: not lower, within 3%); median of `reps` alternating runs
    virtual     64 concurrent requests of one 32-virtual-token prefix-tuning adapter: the KV
                bytes held for the virtual rows (goal: one copy), counted from the block tables

    .venv/bin/python -m bench.prefix_bench --quick            # alone; bench.run's `prefix` section
"""
from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class PrefixSizes:
    system_tokens: int = 400
    requests: int = 16
    user_tokens: int = 24
    new_tokens: int = 8
    plain_requests: int = 16  # the no-shared-prefix workload
    plain_prompt: int = 96
    plain_new: int = 16
    reps: int = 3
    virtual_requests: int = 64
    virtual_tokens: int = 32


QUICK = PrefixSizes(plain_requests=8, plain_new=8, reps=3)
SMOKE = PrefixSizes(system_tokens=40, requests=4, user_tokens=4, new_tokens=2, plain_requests=2,
                    plain_prompt=12, plain_new=2, reps=1, virtual_requests=8, virtual_tokens=16)


def engine_for(base, registry, prefix_cache: bool):
    from runtime.engine.engine import Engine, EngineConfig

    return Engine(base.model, base.tokenizer, registry, EngineConfig(prefix_cache=prefix_cache))


def request(ids: list[int], n: int, adapter: str = "", on_output=None):
    from runtime.engine.params import StoppingParams
    from runtime.engine.request import GenerationRequest

    return GenerationRequest(list(ids), adapter_id=adapter, on_output=on_output,
                             stopping=StoppingParams(max_new_tokens=n, ignore_eos=True))


def run_batch(engine, prompts: list[list[int]], n: int, adapter: str = "") -> dict[str, float]:
    """Add every prompt at once, step to the end: {'ttft': [s per request], 'seconds', 'tokens'}."""
    t0 = time.perf_counter()
    first: dict[str, float] = {}
    tokens = [0]

    def seen(out):
        if out.tokens and out.request_id not in first:
            first[out.request_id] = time.perf_counter() - t0
        tokens[0] += len(out.tokens)

    for ids in prompts:
        engine.add(request(ids, n, adapter, seen))
    while engine.has_work():
        engine.step()
    return {"ttft": list(first.values()), "seconds": time.perf_counter() - t0, "tokens": tokens[0]}


def random_ids(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(100, vocab) for _ in range(n)]


def shared_prompt_ttft(base, registry, sz: PrefixSizes, prefix_cache: bool) -> float:
    """TTFT p50 (s) of the requests after the first, which ran alone and filled the cache."""
    rng = random.Random(14)
    vocab = base.config.vocab_size
    system = random_ids(rng, sz.system_tokens, vocab)
    turns = [system + random_ids(rng, sz.user_tokens, vocab) for _ in range(sz.requests)]
    engine = engine_for(base, registry, prefix_cache)
    run_batch(engine, turns[:1], sz.new_tokens)
    return statistics.median(run_batch(engine, turns[1:], sz.new_tokens)["ttft"])


def plain_throughput(base, registry, sz: PrefixSizes) -> tuple[float, float]:
    """Generated tokens/s (with, without the cache) on prompts that share nothing: the median
    of `reps` runs each, alternating, so load drift hits both alike."""
    vocab = base.config.vocab_size
    rates = {True: [], False: []}
    engines = {on: engine_for(base, registry, on) for on in (True, False)}
    for rep in range(sz.reps + 1):  # the first round warms up and is dropped
        for on in (True, False) if rep % 2 else (False, True):
            rng = random.Random(1000 + rep)  # the same prompts for both, new ones each round
            prompts = [random_ids(rng, sz.plain_prompt, vocab) for _ in range(sz.plain_requests)]
            r = run_batch(engines[on], prompts, sz.plain_new)
            if rep:
                rates[on].append(r["tokens"] / r["seconds"])
    return statistics.median(rates[True]), statistics.median(rates[False])


def virtual_kv_bytes(base, registry, adapter_id: str, sz: PrefixSizes) -> tuple[int, int, int]:
    """(bytes of distinct blocks holding the virtual rows, one copy's bytes, requests running)
    once `virtual_requests` requests of the adapter are admitted."""
    engine = engine_for(base, registry, True)
    rng = random.Random(3)
    for _ in range(sz.virtual_requests):
        engine.add(request(random_ids(rng, 8, base.config.vocab_size), 2, adapter_id))
    engine.step()  # admits them all (max_running 64) and prefills
    cache, bs, n = engine.cache, engine.cache.block_size, sz.virtual_tokens
    # block j of a sequence holds virtual rows j*bs .. min(n, (j+1)*bs) - 1; count each distinct
    # block once (a partial last one is each request's own, so it counts once per request)
    held = {(b, min(bs, n - j * bs)) for s in engine.running
            for j, b in enumerate(s.kv.blocks[: -(-n // bs)])}
    running = len(engine.running)
    while engine.has_work():
        engine.step()
    per_row = cache.bytes_per_token()
    return sum(rows for _, rows in held) * per_row, n * per_row, running


def report(base, root: Path, sz: PrefixSizes) -> tuple[list[list[object]], list[str]]:
    """Table rows and goal lines."""
    from bench.adapters import write_prefix
    from bench.common import goal_line
    from runtime.adapters.peft_format import read_adapter
    from runtime.adapters.registry import AdapterRegistry

    registry = AdapterRegistry(base.model, num_slots=base.model.num_slots or 2, max_rank=16)
    write_prefix(base.config, root / "prefix-32", seed=5, n=sz.virtual_tokens)
    registry.add("prefix-32", read_adapter(root / "prefix-32", base.config))
    on = shared_prompt_ttft(base, registry, sz, True)
    off = shared_prompt_ttft(base, registry, sz, False)
    with_cache, without = plain_throughput(base, registry, sz)
    held, one, running = virtual_kv_bytes(base, registry, "prefix-32", sz)
    rows = [[f"TTFT p50, {sz.requests - 1} requests after the first, {sz.system_tokens}-token "
             f"system prompt, ms: --prefix-cache", on * 1e3],
            ["  the same, --no-prefix-cache, ms", off * 1e3],
            ["  ratio (no cache / cache)", off / on],
            [f"tokens/s, {sz.plain_requests} x {sz.plain_prompt}-token prompts sharing nothing, "
             f"{sz.plain_new} new each: --prefix-cache", with_cache],
            ["  the same, --no-prefix-cache", without],
            ["  ratio (cache / no cache)", with_cache / without],
            [f"KV bytes held for the virtual rows, {running} requests of one "
             f"{sz.virtual_tokens}-virtual-token prefix adapter", held],
            ["  one copy of them", one],
            ["  copies held", held / one]]
    goals = [goal_line("TTFT p50 no cache / cache (shared system prompt)", off / on, ">=", 5, "x"),
             goal_line("throughput cache / no cache (no shared prefix)", with_cache / without, ">=", 0.97, "x"),
             goal_line("virtual-token KV copies for 64 requests", held / one, "<=", 1, "x")]
    return rows, goals


def main(argv=None) -> int:
    from bench.common import table
    from runtime.models.base import load_base

    p = argparse.ArgumentParser(prog="python -m bench.prefix_bench", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--model", default=None)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    base = load_base(args.model, "nf4", device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        rows, goals = report(base, Path(tmp), QUICK if args.quick else PrefixSizes())
    print(table(["figure", "value"], rows) + "\n\n" + "\n".join(goals))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
