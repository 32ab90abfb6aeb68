"""llama.cpp peer (llama-cpp-python), run by bench/peers with the peers' own interpreter:

    .venv-peers/bin/python bench/peers/run_llamacpp.py JOB.json

Standard library and llama_cpp only: this file never imports Quiver, torch or bench. JOB.json:

    {"model": GGUF path, "threads": 2, "n_ctx": 1024, "reps": 3,
     "decode_ids": [...], "decode_tokens": 128,      # batch-1 decode after this prompt
     "prompt_ids": [...],                            # prompt processing of these tokens
     "lora": GGUF LoRA path or null}                 # the same two figures with it applied

Prints progress on stderr and one result line `PEER-JSON {...}` on stdout (bench/peers parses
the last such line): tokens/s figures as medians over `reps` (base and LoRA interleaved), the
per-repetition values beside them. Decode tokens/s = (n - 1) generated tokens / time from the
first to the n-th token (the prompt's evaluation excluded), greedy, EOS not stopping it. Prompt
tokens/s = prompt tokens / time of one `eval` of the whole prompt from an empty KV cache (logits
of the last token only).
Exit status 3 with {"missing": ...} when llama_cpp is not importable.
"""
from __future__ import annotations

import json
import statistics
import sys
import time

MARK = "PEER-JSON "


def emit(obj: dict) -> None:
    print(MARK + json.dumps(obj), flush=True)


def decode(llm, ids: list[int], n: int) -> tuple[float, list[int]]:
    """Greedy decode of n tokens: (tokens/s after the first, the tokens)."""
    llm.reset()
    stamps, out = [], []
    for tok in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=False):
        stamps.append(time.perf_counter())
        out.append(tok)
        if len(stamps) == n:
            break
    return (len(stamps) - 1) / (stamps[-1] - stamps[0]), out


def prompt_rate(llm, ids: list[int]) -> float:
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(ids)
    return len(ids) / (time.perf_counter() - t0)


def measure(llms: dict, job: dict) -> dict:
    """Both figures for every model in `llms`, repetitions interleaved (base, lora, base, ...),
    so a drifting machine load hits all alike."""
    for llm in llms.values():  # warm-up: first-call allocations, page faults
        decode(llm, job["decode_ids"], 8)
        prompt_rate(llm, job["prompt_ids"][:64])
    dec = {k: [] for k in llms}
    pp = {k: [] for k in llms}
    first = {}
    for _ in range(job["reps"]):
        for k, llm in llms.items():
            rate, toks = decode(llm, job["decode_ids"], job["decode_tokens"])
            dec[k].append(rate)
            first.setdefault(k, toks[:16])  # shows whether the LoRA changed the output
        for k, llm in llms.items():
            pp[k].append(prompt_rate(llm, job["prompt_ids"]))
    return {k: {"decode_tokens_per_s": statistics.median(dec[k]), "decode_runs": dec[k],
                "prompt_tokens_per_s": statistics.median(pp[k]), "prompt_runs": pp[k],
                "first_tokens": first[k]} for k in llms}


def main(argv: list[str]) -> int:
    try:
        import llama_cpp
    except ImportError as e:
        emit({"peer": "llama.cpp", "missing": f"llama_cpp ({e})"})
        return 3
    job = json.loads(open(argv[1]).read())
    common = dict(n_threads=job["threads"], n_threads_batch=job["threads"], n_ctx=job["n_ctx"],
                  n_batch=max(512, len(job["prompt_ids"])), verbose=False)
    out = {"peer": "llama.cpp", "version": f"llama-cpp-python {llama_cpp.__version__}",
           "threads": job["threads"], "prompt_tokens": len(job["prompt_ids"]),
           "decode_prompt_tokens": len(job["decode_ids"]), "decode_tokens": job["decode_tokens"]}
    llms = {"base": llama_cpp.Llama(model_path=job["model"], **common)}
    if job.get("lora"):
        try:
            llms["lora"] = llama_cpp.Llama(model_path=job["model"], lora_path=job["lora"], **common)
        except Exception as e:  # an adapter llama.cpp refuses: report it, keep the base figures
            out["lora_error"] = f"{type(e).__name__}: {e}"
    print(f"llama.cpp: measuring {', '.join(llms)}", file=sys.stderr, flush=True)
    out.update(measure(llms, job))
    emit(out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
