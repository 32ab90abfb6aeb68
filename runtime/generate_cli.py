"""`quiver generate` (local, or against a server) and `quiver info` (what the base costs).

Local generation loads the base, optionally one adapter directory, and runs all prompts as one
continuous batch through the same engine the server uses.
"""
from __future__ import annotations

import argparse
import json
import sys


def add_parser(sub) -> None:
    from runtime.cli import add_model_options
    from runtime.server.client_options import add_connection_options

    g = sub.add_parser("generate", help="generate continuations for prompts (one batch)")
    add_model_options(g)
    g.add_argument("prompts", nargs="+", metavar="PROMPT")
    g.add_argument("--adapter", default=None,
                   help="PEFT adapter directory (local), or adapter id (with --server)")
    g.add_argument("--server", default=None, help="HOST:PORT of a running `quiver serve`")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--chat", action="store_true",
                   help="wrap each prompt as one user message with the model's chat template")
    g.add_argument("--json", action="store_true", help="one JSON object per prompt and line")
    add_connection_options(g)
    g.set_defaults(run=run_generate)

    i = sub.add_parser("info", help="base model shape and resident memory")
    add_model_options(i)
    i.set_defaults(run=run_info)


def run_generate(args: argparse.Namespace) -> int:
    if args.server:
        from runtime.server.client import generate_remote

        results = generate_remote(args)
    else:
        results = _generate_local(args)
    for r in results:
        if args.json:
            print(json.dumps(r, ensure_ascii=False))
        else:
            print(r["text"])
    return 0


def chat_prompt_ids(tokenizer, prompt: str, chat: bool) -> list[int]:
    if chat:
        return list(tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                  add_generation_prompt=True, tokenize=True,
                                                  return_dict=False))
    return tokenizer(prompt, add_special_tokens=True)["input_ids"]


def _generate_local(args) -> list[dict]:
    from runtime.adapters.peft_format import read_adapter
    from runtime.adapters.registry import AdapterRegistry
    from runtime.engine.engine import Engine
    from runtime.engine.params import SamplingParams, StoppingParams
    from runtime.engine.request import GenerationRequest
    from runtime.models.base import load_base

    from runtime.nn.kernels import set_threads

    set_threads(args.threads)
    base = load_base(args.model, args.quantize, args.dtype, args.device, args.nf4_kernel)
    adapter = read_adapter(args.adapter, base.config) if args.adapter else None
    registry = AdapterRegistry(base.model, num_slots=1, max_rank=max(16, adapter.rank if adapter else 0))
    if adapter is not None:
        registry.add("cli", adapter)
    engine = Engine(base.model, base.tokenizer, registry)
    sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                              seed=args.seed)
    stopping = StoppingParams(max_new_tokens=args.max_new_tokens)
    sampling.validate()
    stopping.validate()
    reqs = [GenerationRequest(chat_prompt_ids(base.tokenizer, p, args.chat),
                              adapter_id="cli" if adapter else "", sampling=sampling, stopping=stopping)
            for p in args.prompts]
    done = engine.generate(reqs)
    return [{"prompt": p, "text": c.text, "tokens": c.token_ids,
             "stop_reason": c.stop_reason.name if c.stop_reason else None}
            for p, c in zip(args.prompts, done)]


def run_info(args: argparse.Namespace) -> int:
    from runtime.models.base import load_base

    base = load_base(args.model, args.quantize, args.dtype, args.device, args.nf4_kernel)
    cfg, model = base.config, base.model
    proj_params = sum(lin.base.in_features * lin.base.out_features
                      for lin in model.adapted_linears().values())
    nbytes = model.base_bytes()
    info = {**base.describe(), "kernels": base.kernel_line(), "model_dir": base.model_dir, "architecture": cfg.architecture,
            "layers": cfg.num_layers, "hidden": cfg.hidden_size, "heads": cfg.num_heads,
            "kv_heads": cfg.num_kv_heads, "vocab": cfg.vocab_size,
            "projection_params": proj_params, "projection_bytes": nbytes["projections"],
            "projection_bytes_per_param": round(nbytes["projections"] / proj_params, 4),
            "other_bytes": nbytes["other"], "lm_head_copy_bytes": nbytes["lm_head_copies"]}
    json.dump(info, sys.stdout, indent=2)
    print()
    return 0
