"""Decode step time of Quiver's decoder vs the NF4 floor and transformers, and multi-adapter cost.

    .venv/bin/python -m bench.decode_bench                      # base: batch 1, 8, 32, 128
    .venv/bin/python -m bench.decode_bench --adapters 64        # + 64 rows over 64 LoRA adapters
    .venv/bin/python -m bench.decode_bench --adapters 64 --lora-rank 8 --lora-targets q_proj v_proj

Figures (medians over --reps, same run):
- step:  one decode step of B rows (32-token contexts) through the KV-cache path, incl. metadata
- floor: the step's matmuls alone on the fastest kernels: every NF4 projection (fused CPU
         kernel, merged groups) plus the lm_head matmul, at the same batch
- hf:    transformers + bitsandbytes `generate` (same NF4 config), time per generated token
- multi: B rows over B distinct LoRA adapters (r=16, all seven projections unless --lora-rank /
         --lora-targets say otherwise) / the same rows on the base, and PEFT's mixed-batch
         forward (`adapter_names=`) / PEFT's base forward. "LoRA MB" is what the step must read
         of the adapters' weights (every row its own A and B, fp32 as stored in the slots)
         beside the base's 4-bit weights: distinct adapters make the step memory-bound on them
"""
from __future__ import annotations

import argparse
import sys

import torch

from bench.common import machine_line, median_time, paired_median_times, table, versions_line

CONTEXT = 32


def _quiver(quant: str):
    from runtime.models.base import load_base

    return load_base(None, quant, device="cpu")  # the serving defaults (resolve_precision)


def quiver_step_fn(model, batch: int, slots: list[int] | None = None, registry=None):
    """A closure that runs one decode step for `batch` rows with CONTEXT-token histories, on the
    model's device (cache, tokens and metadata there too; CUDA is synchronized, so a timing is
    the kernels' time): the engine's batch metadata, forward and sampler (greedy rows asking
    for no log-probabilities, the serving default)."""
    from runtime.engine.params import SamplingParams
    from runtime.engine.sampling import sample
    from runtime.nn.adapter_batch import AdapterBatch
    from runtime.nn.attention import AttentionBatch
    from runtime.nn.kv_cache import KVCache, SeqCache

    dev = model.model.norm.weight.device
    cache = KVCache(model.cfg, max_tokens=batch * (CONTEXT + 16), dtype=model.dtype, device=dev)
    seqs = [SeqCache() for _ in range(batch)]
    for s in seqs:
        cache.reserve(s, CONTEXT + 1)
        s.length = CONTEXT  # history rows (values do not matter for timing)
    tokens = torch.randint(0, model.cfg.vocab_size, (batch,), device=dev)
    greedy = [SamplingParams()] * batch
    positions = torch.full((batch,), CONTEXT, device=dev)

    def step():
        with torch.no_grad():
            attn = AttentionBatch.with_cache(cache, seqs, [1] * batch)
            ab = None
            if slots is not None:
                lora, dora, emb = registry.slot_sets()
                ab = AdapterBatch.build(slots, [1] * batch, registry.none_slot, lora_slots=lora,
                                        dora_slots=dora, embedding_slots=emb, device=dev)
            out = sample(model(tokens, positions, attn, ab), greedy, logprobs=False).tokens
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return out

    return step


def floor_fn(model, batch: int):
    """The step's matmuls and nothing else, each on the fastest kernel there is for it: every
    4-bit projection on the model's kernel (q/k/v and gate/up as their one merged call where the
    model merges them, runtime/nn/groups.py) plus the lm_head's raw matmul (int8 / bf16 by
    batch size as runtime/nn/lm_head.py picks, without its exact top-candidate pass; fp32 in
    the exact mode). Where the C++ layers exist the projections' kernels are called back to
    back from C++ on ready bf16 inputs (`DecodeStack.matmul_floor`: the kernels' own time);
    elsewhere through their Python entry (which adds its call overhead to the floor)."""
    from runtime.nn.kernels import fused_matmul
    from runtime.nn.lm_head import INT8_MAX_ROWS

    calls = []  # (in_features, fn)
    native = getattr(model, "native", None)
    if native is not None:
        calls.append((1, lambda x: native.stack.matmul_floor(batch)))
    else:
        for layer in model.model.layers:
            for group, single in ((layer.self_attn.qkv, layer.self_attn.o_proj),
                                  (layer.mlp.gate_up, layer.mlp.down_proj)):
                members = group._members
                if group.merged:
                    calls.append((members[0].base.in_features,
                                  lambda x, g=group: fused_matmul(x, g.weight, g._state)))
                else:
                    calls += [(m.base.in_features, m.base) for m in members]
                calls.append((single.base.in_features, single.base))
    head = model.head
    hidden = model.cfg.hidden_size
    xb = torch.randn(batch, hidden).bfloat16()
    if head.int8 is not None and batch <= INT8_MAX_ROWS:
        calls.append((hidden, lambda x: torch._weight_int8pack_mm(xb, head.int8, head.int8_scale)))
    elif head.bf16 is not None:
        calls.append((hidden, lambda x: torch.nn.functional.linear(xb, head.bf16)))
    else:
        calls.append((hidden, lambda x: torch.nn.functional.linear(x, head.weight)))
    xs = {n: torch.randn(batch, n) for n, _ in calls}

    def run():
        with torch.no_grad():
            for n, fn in calls:
                fn(xs[n])

    return run


def hf_nf4_model(model_dir=None):
    """transformers + bitsandbytes on `model_dir` (default: the embedded model) with Quiver's
    quantization: NF4, double quantization, blocksize 64, fp32 compute."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from runtime.models.embedded import embedded_model_dir

    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                             bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(str(model_dir or embedded_model_dir()), quantization_config=cfg,
                                                device_map="cpu", dtype=torch.float32).eval()


def hf_step_time(hf, batch: int, reps: int) -> float:
    ids = torch.randint(100, 1000, (batch, CONTEXT))
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)

    def gen(n):
        with torch.no_grad():
            hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, **kw)

    t1 = median_time(lambda: gen(1), reps)
    t9 = median_time(lambda: gen(9), reps)
    return (t9 - t1) / 8


def base_rows(args, base, hf) -> list[list[object]]:
    rows = []
    for b in args.batches:
        step = median_time(quiver_step_fn(base.model, b), args.reps)
        floor = median_time(floor_fn(base.model, b), args.reps)
        hf_t = hf_step_time(hf, b, max(1, args.reps // 2)) if hf is not None else float("nan")
        rows.append([b, step * 1e3, floor * 1e3, step / floor, hf_t * 1e3, hf_t / step])
        print(f"batch {b}: step {step*1e3:.1f} ms, floor {floor*1e3:.1f} ms, hf {hf_t*1e3:.1f} ms",
              file=sys.stderr)
    return rows


def random_lora_dir(root, i: int, cfg, rank: int = 16, targets=None) -> str:
    """A PEFT-format LoRA (all seven projections unless `targets`) with random weights
    (bench/adapters.py)."""
    from bench.adapters import PROJECTIONS, write_lora

    path = f"{root}/lora-{i}"
    write_lora(cfg, path, seed=i, rank=rank, targets=targets or PROJECTIONS)
    return path


def lora_megabytes(cfg, rank: int, targets, adapters: int, blocksize: int = 64,
                   weight_bytes: int = 4) -> tuple[float, float]:
    """(MB of LoRA weights a step over `adapters` distinct adapters reads, `weight_bytes` an
    element as the slots hold them; MB of the base's 4-bit projection weights with their bf16
    block scales): the step's two weight streams."""
    lora = base = 0.0
    for name, (fan_in, fan_out) in cfg.linear_shapes().items():
        base += fan_in * fan_out * (0.5 + 2 / blocksize) * cfg.num_layers
        if name in targets:
            lora += rank * (fan_in + fan_out) * weight_bytes * adapters * cfg.num_layers
    return lora / 2**20, base / 2**20


#: the multi-adapter table's columns (rows from `multi_rows`)
MULTI_COLUMNS = ["system", "rows", "multi-adapter ms", "base ms", "base/multi (x of base)", "LoRA MB", "base MB"]


def multi_rows(n: int, reps: int, base, hf, rank: int = 16, targets=None,
               slot_dtypes: tuple[str, ...] = ("float32",)) -> list[list[object]]:
    """n decode rows over n distinct random LoRAs (r=`rank` on `targets`, default all seven)
    vs the same rows on the base: Quiver once per LoRA slot dtype (`--adapter-dtype`), and
    (with `hf`) PEFT: MULTI_COLUMNS."""
    import tempfile

    from bench.adapters import PROJECTIONS
    from runtime.adapters.peft_format import read_adapter
    from runtime.adapters.registry import AdapterRegistry
    from runtime.models.base import DTYPES

    targets = targets or PROJECTIONS
    rows = []
    with tempfile.TemporaryDirectory() as root:
        paths = [random_lora_dir(root, i, base.config, rank, targets) for i in range(n)]
        for name in slot_dtypes:
            dt = DTYPES[name]
            reg = AdapterRegistry(base.model, num_slots=n, max_rank=rank, weight_dtype=dt)
            for i, p in enumerate(paths):
                reg.add(f"a{i}", read_adapter(p, base.config, max_rank=rank))
            slots = [reg.acquire(f"a{i}")[0] for i in range(n)]
            multi, plain = paired_median_times([quiver_step_fn(base.model, n, slots, reg),
                                                quiver_step_fn(base.model, n)], reps)
            lora_mb, base_mb = lora_megabytes(base.config, rank, targets, n, weight_bytes=dt.itemsize)
            system = "quiver" if name == "float32" else f"quiver --adapter-dtype {name}"
            rows.append([system, n, multi * 1e3, plain * 1e3, plain / multi, lora_mb, base_mb])
        base.model.allocate_lora_slots(n, rank)  # back to the default slots for later sections
        if hf is not None:
            rows.append(peft_row(hf, paths, reps) + [lora_mb, ""])
    return rows


def peft_row(hf, paths: list[str], reps: int) -> list[object]:
    import warnings

    from peft import PeftModel
    from transformers import DynamicCache

    warnings.simplefilter("ignore")
    pm = PeftModel.from_pretrained(hf, paths[0], adapter_name="a0")
    for i, p in enumerate(paths[1:], 1):
        pm.load_adapter(p, adapter_name=f"a{i}")
    n = len(paths)
    names = [f"a{i}" for i in range(n)]
    vocab = hf.config.vocab_size  # (a tiny test model's is small)
    ids = torch.randint(0, vocab, (n, CONTEXT))
    with torch.no_grad():
        out = pm(input_ids=ids, use_cache=True, adapter_names=names)
    past = out.past_key_values
    step_ids = torch.randint(0, vocab, (n, 1))

    def step(adapter_names):
        def run():
            cache = DynamicCache.from_legacy_cache(past.to_legacy_cache()) if hasattr(past, "to_legacy_cache") else past
            with torch.no_grad():
                pm(input_ids=step_ids, past_key_values=cache, use_cache=True, adapter_names=adapter_names)
        return run

    multi = median_time(step(names), reps)
    plain = median_time(step(["__base__"] * n), reps)
    return ["peft", n, multi * 1e3, plain * 1e3, plain / multi]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 128])
    p.add_argument("--adapters", type=int, default=0, help="rows/adapters for the multi-adapter run")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--no-hf", action="store_true", help="skip transformers / PEFT peers")
    p.add_argument("--lora-rank", type=int, default=16, help="rank of the multi-adapter run's LoRAs (16)")
    p.add_argument("--adapter-dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"],
                   help="LoRA slot storage of the multi-adapter run, a row each (--adapter-dtype)")
    p.add_argument("--lora-targets", nargs="+", default=None, metavar="PROJ",
                   help="projections they adapt (default: all seven; PEFT's Llama default: q_proj v_proj)")
    args = p.parse_args(argv)
    from bench.adapters import PROJECTIONS

    args.lora_targets = args.lora_targets or PROJECTIONS
    bad = set(args.lora_targets) - set(PROJECTIONS)
    if bad:
        p.error(f"--lora-targets: unknown projection(s) {sorted(bad)}; choose from {PROJECTIONS}")
    torch.manual_seed(0)
    base = _quiver("nf4")
    hf = None if args.no_hf else hf_nf4_model()
    print(f"\n{machine_line()}; {versions_line()}\n")
    print("Decode step, embedded model, NF4 + double quant, serving defaults, 32-token contexts (ms):\n")
    print(table(["batch", "quiver step", "NF4 floor", "step/floor", "transformers", "transformers/quiver"],
                base_rows(args, base, hf)))
    if args.adapters:
        print(f"\nDecode step, {args.adapters} rows over {args.adapters} distinct LoRA adapters "
              f"(r={args.lora_rank}, {' '.join(args.lora_targets)}) vs the same rows on the base (ms):\n")
        print(table(MULTI_COLUMNS, multi_rows(args.adapters, args.reps, base, hf, args.lora_rank,
                                              args.lora_targets, tuple(args.adapter_dtypes))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
