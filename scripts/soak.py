"""Soak test: hours of a busy day in minutes. Exits 1 if anything leaked or went wrong.

    python scripts/soak.py                       # 200 streams x 10 min over 50 adapters, embedded model
    python scripts/soak.py --tiny --streams 20 --duration 40 --adapters 8     # a quick look, no model files
    python scripts/soak.py --model DIR --quantize none --dtype float32 ...    # any HF Llama-family dir

A Quiver server runs in this process (`build_server`, the code `quiver serve` runs) over an adapter
directory of random LoRA, prompt-tuning and prefix-tuning adapters made for the base, with fewer
device slots than adapters so that eviction is always in play. Then:

    warm-up    every adapter used once, then full traffic for --warmup seconds; resident memory
               (process_resident_memory_bytes from /metrics) is taken as the reference
    traffic    --streams client threads, each sending GenerateStream requests back to back with
               random adapters, lengths, sampling, stop sequences and time limits; some are
               cancelled after a few messages, some get a short deadline
    churn      meanwhile, adapters of the pool are unloaded (the next request lazily loads them
               again), adapters from an allowed root are loaded, used and unloaded, and a broken
               adapter is requested (INVALID_ARGUMENT expected: the provoked failures)

Checks at the end (each one printed, PASS / FAIL):
    outcomes   every request the soak neither cancelled nor cut by a deadline finished with a stop
               reason its parameters allow (MAX_TOKENS exactly at max_new_tokens, EOS_TOKEN,
               STOP_SEQUENCE only with stop sequences, TIME_LIMIT only with a time limit), one
               final message, and token counts that add up
    memory     resident memory back within --rss-tolerance (10%) of the post-warm-up level
               (printed once a minute, `--sample-interval`, beside what could grow: the KV
               pool's bytes, resident memory without them, live Python objects, threads,
               metric series and cached prefix blocks)
    gauges     quiver_requests_running and quiver_requests_waiting back to 0 (scraped over HTTP)
    log        no ERROR log line (the provoked failures log WARNINGs)

`run(argv)` returns the report (tests/server/test_hardening_soak.py runs a short one in the suite).
"""
from __future__ import annotations

import argparse
import gc
import logging
import random
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a file from a source checkout
    sys.path.insert(0, str(REPO_ROOT))

import grpc  # noqa: E402

log = logging.getLogger("soak")

ADAPTER_KINDS = ("lora", "prompt", "prefix")
STOP_WORDS = ("w1", "w2", "w3", "\n", " the")


# ---- the adapters and the base ------------------------------------------------------------------
def make_adapters(model_cfg, root: Path, ids: list[str], seed: int) -> None:
    """Random adapters of three kinds (LoRA q/v r=4, prompt tuning 4 tokens, prefix tuning 3
    tokens), in PEFT's on-disk format, one directory per id."""
    import torch

    from runtime.adapters.peft_format import write_adapter

    g = torch.Generator().manual_seed(seed)
    for i, adapter_id in enumerate(ids):
        kind = ADAPTER_KINDS[i % len(ADAPTER_KINDS)]
        config, tensors = _adapter_files(model_cfg, kind, g)
        write_adapter(root / adapter_id, config, tensors)


def _adapter_files(m, kind: str, g) -> tuple[dict, dict]:
    import torch

    def rand(*shape, scale=0.05):
        return torch.randn(*shape, generator=g) * scale

    if kind == "lora":
        r, shapes = 4, m.linear_shapes()
        tensors = {}
        for layer in range(m.num_layers):
            for leaf in ("q_proj", "v_proj"):
                base = f"base_model.model.model.layers.{layer}.self_attn.{leaf}"
                fan_in, fan_out = shapes[leaf]
                tensors[f"{base}.lora_A.weight"] = rand(r, fan_in)
                tensors[f"{base}.lora_B.weight"] = rand(fan_out, r)
        return (dict(peft_type="LORA", task_type="CAUSAL_LM", r=r, lora_alpha=8,
                     target_modules=["q_proj", "v_proj"]), tensors)
    if kind == "prompt":
        n = 4
        return (dict(peft_type="PROMPT_TUNING", task_type="CAUSAL_LM", num_virtual_tokens=n,
                     token_dim=m.hidden_size, num_transformer_submodules=1),
                {"prompt_embeddings": rand(n, m.hidden_size, scale=0.5)})
    n = 3
    return (dict(peft_type="PREFIX_TUNING", task_type="CAUSAL_LM", num_virtual_tokens=n,
                 token_dim=m.kv_dim, num_layers=m.num_layers, num_attention_heads=m.num_kv_heads,
                 num_transformer_submodules=1),
            {"prompt_embeddings": rand(n, m.num_layers * 2 * m.kv_dim, scale=0.5)})


def make_broken_adapter(root: Path, adapter_id: str) -> None:
    """A LoRA config whose weights file is garbage: its loads fail, on purpose."""
    d = root / adapter_id
    d.mkdir(parents=True, exist_ok=True)
    (d / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"]}')
    (d / "adapter_model.safetensors").write_bytes(b"\x00" * 64)


def make_tiny_model_dir(path: Path) -> Path:
    """A random two-layer Llama with a word-level tokenizer over w0..w127 (seconds to make)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=256)
    LlamaForCausalLM(cfg).eval().save_pretrained(str(path))
    vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, 128)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(str(path))
    return path


# ---- what one request asks, and whether its answer is right --------------------------------------
@dataclass
class Plan:
    adapter_id: str
    text: str
    params: dict
    cancel_after: int | None = None  # cancel once this many messages arrived
    deadline_s: float | None = None


def random_plan(rng: random.Random, adapter_ids: list[str], args) -> Plan:
    adapter_id = "" if rng.random() < 0.1 else rng.choice(adapter_ids)
    text = " ".join(f"w{rng.randint(3, 120)}" for _ in range(rng.randint(1, 24)))
    params = dict(max_new_tokens=rng.randint(1, args.max_new_tokens), return_token_ids=True,
                  ignore_eos=rng.random() < 0.5)
    if rng.random() < 0.5:
        params.update(temperature=rng.choice((0.7, 1.0)), top_p=0.9, top_k=rng.choice((0, 20)),
                      seed=rng.randint(0, 2**32))
    if rng.random() < 0.15:
        params["stop_sequences"] = [rng.choice(STOP_WORDS)]
    if rng.random() < 0.05:
        params["time_limit_seconds"] = rng.uniform(0.01, 0.5)
    plan = Plan(adapter_id, text, params)
    if rng.random() < args.cancel_p:
        plan.cancel_after = rng.randint(0, 3)
    elif rng.random() < args.deadline_p:
        plan.deadline_s = rng.uniform(0.05, 2.0)
    return plan


def check_stream(plan: Plan, messages: list) -> str | None:
    """None if a completed stream's messages are right for its plan, else what is wrong."""
    from runtime.server.stubs import generation_pb2 as gpb

    if not messages:
        return "no message"
    last, p = messages[-1], plan.params
    if any(m.stop_reason != gpb.STOP_REASON_UNSPECIFIED for m in messages[:-1]):
        return "a stop reason before the last message"
    n, reason = last.generated_token_count, last.stop_reason
    if sum(len(m.tokens) for m in messages) != n:
        return f"{sum(len(m.tokens) for m in messages)} tokens streamed, generated_token_count {n}"
    allowed = {gpb.STOP_REASON_MAX_TOKENS: n == p["max_new_tokens"],
               gpb.STOP_REASON_EOS_TOKEN: not p["ignore_eos"] and 0 < n <= p["max_new_tokens"],
               gpb.STOP_REASON_STOP_SEQUENCE: bool(p.get("stop_sequences")),
               gpb.STOP_REASON_TIME_LIMIT: "time_limit_seconds" in p}
    if not allowed.get(reason, False):
        return f"stop reason {gpb.StopReason.Name(reason)} with {n} tokens for {p}"
    return None


# ---- the run ------------------------------------------------------------------------------------
@dataclass
class Tally:
    """What the traffic saw; every method is thread-safe."""

    completed: Counter = field(default_factory=Counter)  # stop reason name -> count
    cancelled: int = 0  # cancelled by the soak (finished first or not)
    deadline: int = 0  # cut by their deadline
    retried: int = 0  # FAILED_PRECONDITION while their adapter was being unloaded
    provoked: int = 0  # broken-adapter requests refused as expected
    churn: Counter = field(default_factory=Counter)  # unloads, dynamic loads
    failures: list = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, what: str, n: int = 1) -> None:
        with self.lock:
            setattr(self, what, getattr(self, what) + n)

    def fail(self, message: str) -> None:
        with self.lock:
            self.failures.append(message)
        log.warning("soak failure: %s", message)


class ErrorLog(logging.Handler):
    """Collects ERROR (and worse) records of every logger."""

    def __init__(self):
        super().__init__(level=logging.ERROR)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.name}: {record.getMessage()}")


#: A client that meets FAILED_PRECONDITION ("being unloaded") retries with backoff for this long;
#: under heavy load the unloading adapter's queued requests can take several seconds to finish.
RETRY_FOR_S = 60.0


def one_request(client, plan: Plan, tally: Tally) -> None:
    from runtime.server.stubs import generation_pb2 as gpb

    give_up, backoff = time.monotonic() + RETRY_FOR_S, 0.05
    while time.monotonic() < give_up:
        stream = client.generate_stream(plan.text, plan.adapter_id, timeout=plan.deadline_s or 300,
                                        **plan.params)
        messages = []
        try:
            for msg in stream:
                messages.append(msg)
                if plan.cancel_after is not None and len(messages) > plan.cancel_after:
                    stream.cancel()
        except grpc.RpcError as e:
            code = e.code()
            if code == grpc.StatusCode.CANCELLED and plan.cancel_after is not None:
                tally.add("cancelled")
            elif code == grpc.StatusCode.DEADLINE_EXCEEDED and plan.deadline_s is not None:
                tally.add("deadline")
            elif code == grpc.StatusCode.FAILED_PRECONDITION and "being unloaded" in e.details():
                tally.add("retried")
                time.sleep(backoff)
                backoff = min(2 * backoff, 1.0)
                continue
            else:
                tally.fail(f"{plan.adapter_id or 'base'}: {code.name}: {e.details()}")
            return
        if plan.cancel_after is not None:
            tally.add("cancelled")  # it finished before the cancel took effect
            return
        problem = check_stream(plan, messages)
        if problem:
            tally.fail(f"{plan.adapter_id or 'base'}: {problem}")
        else:
            with tally.lock:
                tally.completed[gpb.StopReason.Name(messages[-1].stop_reason)] += 1
        return
    tally.fail(f"{plan.adapter_id}: still being unloaded after {RETRY_FOR_S:.0f} s of retries")


def traffic(client, adapter_ids, args, tally: Tally, stop: threading.Event, seed: int) -> None:
    rng = random.Random(seed)
    while not stop.is_set():
        one_request(client, random_plan(rng, adapter_ids, args), tally)


def churn(client, adapter_ids, dyn_sources, broken_ids, args, tally: Tally, stop: threading.Event) -> None:
    """Unload pool adapters, load / use / unload dynamic ones, and provoke broken loads."""
    rng = random.Random(args.seed + 1)
    i = 0
    while not stop.wait(args.churn_interval):
        i += 1
        try:
            victim = rng.choice(adapter_ids)
            if any(a.adapter_id == victim for a in client.list_adapters()):
                client.unload_adapter(victim)
                tally.churn["unload"] += 1
            dyn_id = f"soak-dyn/{i}"
            client.load_adapter(dyn_id, source=rng.choice(dyn_sources))
            client.generate("w5 w6", dyn_id, max_new_tokens=2)
            client.unload_adapter(dyn_id)
            tally.churn["dynamic"] += 1
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.NOT_FOUND:  # the victim went between list and unload
                tally.fail(f"churn: {e.code().name}: {e.details()}")
        try:
            client.generate("w5", rng.choice(broken_ids), max_new_tokens=1)
            tally.fail("a broken adapter served a request")
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
                tally.add("provoked")
            else:
                tally.fail(f"broken adapter: {e.code().name}: {e.details()}")


def scrape(metrics_port: int) -> dict[str, float]:
    """Unlabelled samples of /metrics, by name (the gauges and process metrics checked here)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30).read().decode()
    return {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples
            if not s.labels}


def warm_up(client, adapter_ids, dyn_sources, broken_ids, args, tally, metrics_port) -> float:
    """Every adapter once, then full traffic and churn for args.warmup seconds (every path the
    soak takes, so that its first-use costs land before the reference); returns resident bytes."""
    for adapter_id in adapter_ids:
        client.generate("w5 w6", adapter_id, max_new_tokens=2)
    stop = threading.Event()
    with ThreadPoolExecutor(args.streams + 1) as pool:
        for k in range(args.streams):
            pool.submit(traffic, client, adapter_ids, args, tally, stop, args.seed * 100_003 + k)
        pool.submit(churn, client, adapter_ids, dyn_sources, broken_ids, args, tally, stop)
        time.sleep(args.warmup)
        stop.set()
    return settled_rss(metrics_port)


def settled_rss(metrics_port: int) -> float:
    """Resident memory once the server is idle (gauges at 0) and garbage is collected."""
    wait_idle(metrics_port, 30)
    gc.collect()
    time.sleep(0.5)
    return scrape(metrics_port)["process_resident_memory_bytes"]


def wait_idle(metrics_port: int, timeout: float) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = scrape(metrics_port)
        if (m.get("quiver_requests_running") == 0 and m.get("quiver_requests_waiting") == 0) \
                or time.monotonic() > deadline:
            return m
        time.sleep(0.25)


def sample_memory(metrics_port: int, t0: float) -> dict[str, float]:
    """One row of the memory table: resident memory and each suspect of its growth. The server
    runs in this process, so Python objects and threads are counted here directly."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30).read().decode()
    from prometheus_client.parser import text_string_to_metric_families

    series, m = 0, {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            series += 1
            if not s.labels:
                m[s.name] = s.value
    rss, kv = m["process_resident_memory_bytes"], m.get("quiver_kv_cache_bytes", 0.0)
    return {"t": time.monotonic() - t0, "rss": rss, "kv": kv, "rss_wo_kv": rss - kv,
            "objects": len(gc.get_objects()), "threads": threading.active_count(),
            "series": series, "prefix_blocks": m.get("quiver_prefix_cache_blocks", 0.0)}


def memory_row(s: dict[str, float]) -> str:
    return (f"{s['t']:7.0f} s  RSS {s['rss'] / 2**20:8.1f} MiB  KV pool {s['kv'] / 2**20:7.1f} MiB  "
            f"RSS-KV {s['rss_wo_kv'] / 2**20:8.1f} MiB  objects {s['objects']:8d}  threads "
            f"{s['threads']:4d}  series {s['series']:5d}  prefix blocks {s['prefix_blocks']:6.0f}")


@dataclass
class Report:
    tally: Tally
    rss_warm: float
    rss_end: float
    rss_peak: float
    gauges: dict
    errors: list
    checks: dict  # name -> (ok, detail)
    seconds: float
    memory: list = field(default_factory=list)  # sample_memory rows: warm-up, each interval, end

    @property
    def ok(self) -> bool:
        return all(ok for ok, _ in self.checks.values())

    def summary(self) -> str:
        t = self.tally
        lines = [f"soak: {self.seconds:.0f} s, {sum(t.completed.values())} completed "
                 f"({dict(t.completed)}), {t.cancelled} cancelled, {t.deadline} cut by deadline, "
                 f"{t.retried} retried while unloading, {t.provoked} provoked failures, churn {dict(t.churn)}",
                 f"memory: {self.rss_warm / 2**20:.1f} MiB after warm-up, {self.rss_end / 2**20:.1f} MiB "
                 f"at the end, {self.rss_peak / 2**20:.1f} MiB peak"]
        if self.memory:
            lines.append("memory per interval (first row: after warm-up, last: idle at the end):")
            lines += ["  " + memory_row(s) for s in self.memory]
        lines += [f"  {'PASS' if ok else 'FAIL'} {name}: {detail}" for name, (ok, detail) in self.checks.items()]
        lines.append("soak: " + ("PASSED" if self.ok else "FAILED"))
        return "\n".join(lines)


def soak(client, metrics_port: int, adapter_ids, dyn_sources, broken_ids, args, errors: ErrorLog) -> Report:
    """Warm up, run traffic + churn for args.duration seconds, then check (module docstring)."""
    t0 = time.monotonic()
    tally = Tally()
    rss_warm = warm_up(client, adapter_ids, dyn_sources, broken_ids, args, tally, metrics_port)
    memory = [sample_memory(metrics_port, t0)]
    log.warning("memory %s", memory_row(memory[0]))
    stop, peak = threading.Event(), [rss_warm]
    with ThreadPoolExecutor(args.streams + 1) as pool:
        for k in range(args.streams):
            pool.submit(traffic, client, adapter_ids, args, tally, stop, args.seed * 7919 + k)
        pool.submit(churn, client, adapter_ids, dyn_sources, broken_ids, args, tally, stop)
        end = time.monotonic() + args.duration
        next_sample = time.monotonic() + args.sample_interval
        while time.monotonic() < end:
            time.sleep(min(5.0, max(0.0, end - time.monotonic())))
            peak[0] = max(peak[0], scrape(metrics_port)["process_resident_memory_bytes"])
            if time.monotonic() >= next_sample:
                memory.append(sample_memory(metrics_port, t0))
                log.warning("memory %s", memory_row(memory[-1]))
                next_sample += args.sample_interval
        stop.set()
    rss_end = settled_rss(metrics_port)
    memory.append(sample_memory(metrics_port, t0))
    gauges = wait_idle(metrics_port, 10)
    checks = {
        "outcomes": (not tally.failures and sum(tally.completed.values()) > 0,
                     f"{len(tally.failures)} wrong: {tally.failures[:5]}" if tally.failures
                     else f"{sum(tally.completed.values())} completed requests all right"),
        "memory": (rss_end <= rss_warm * (1 + args.rss_tolerance),
                   f"{100 * (rss_end / rss_warm - 1):+.1f}% vs post-warm-up (limit +{100 * args.rss_tolerance:.0f}%)"),
        "gauges": (gauges.get("quiver_requests_running") == 0 and gauges.get("quiver_requests_waiting") == 0,
                   f"running {gauges.get('quiver_requests_running')}, waiting {gauges.get('quiver_requests_waiting')}"),
        "log": (not errors.lines, f"{len(errors.lines)} ERROR lines {errors.lines[:5]}"),
    }
    return Report(tally, rss_warm, rss_end, peak[0], gauges, list(errors.lines), checks,
                  time.monotonic() - t0, memory)


# ---- command line -------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/soak.py", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="HF model directory (default: the embedded SmolLM2)")
    p.add_argument("--tiny", action="store_true", help="a tiny random Llama made on the spot")
    p.add_argument("--quantize", default="nf4", choices=("nf4", "fp4", "none"))
    p.add_argument("--dtype", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--streams", type=int, default=200, help="concurrent client streams (default 200)")
    p.add_argument("--duration", type=float, default=600, help="seconds of traffic after warm-up (600)")
    p.add_argument("--warmup", type=float, default=30, help="seconds of traffic before the reference (30)")
    p.add_argument("--adapters", type=int, default=50, help="adapters in the pool (50)")
    p.add_argument("--device-slots", type=int, default=16, help="device adapter slots (16; eviction in play)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="largest max_new_tokens asked (48)")
    p.add_argument("--cancel-p", type=float, default=0.1, help="share of requests cancelled (0.1)")
    p.add_argument("--deadline-p", type=float, default=0.1, help="share with a short deadline (0.1)")
    p.add_argument("--churn-interval", type=float, default=2.0, help="seconds between adapter churns (2)")
    p.add_argument("--rss-tolerance", type=float, default=0.10, help="memory growth allowed (0.10)")
    p.add_argument("--sample-interval", type=float, default=60,
                   help="seconds between rows of the memory table (60)")
    p.add_argument("--kv-preallocate", action="store_true",
                   help="the server allocates its whole KV budget at start-up (serve --kv-preallocate)")
    p.add_argument("--kv-cache-tokens", type=int, default=None, help="serve --kv-cache-tokens (default its own)")
    p.add_argument("--no-prefix-cache", action="store_true", help="serve --no-prefix-cache")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def run(argv=None) -> Report:
    """Set up (base, adapters, server), soak, shut down; returns the report."""
    args = parse_args(argv)
    from runtime.config import ServerConfig
    from runtime.server.app import build_server
    from runtime.server.client import QuiverClient

    errors = ErrorLog()
    logging.getLogger().addHandler(errors)
    with tempfile.TemporaryDirectory(prefix="quiver-soak-") as tmp:
        tmp = Path(tmp)
        model = str(make_tiny_model_dir(tmp / "model")) if args.tiny else args.model
        server = build_server(ServerConfig(
            model=model, quantize=args.quantize, dtype=args.dtype, device=args.device, port=0,
            metrics_port=0, adapter_dir=str(tmp / "adapters"), allow_adapter_roots=[str(tmp / "dyn")],
            max_device_adapters=args.device_slots, max_lora_rank=8,
            max_queue=max(512, 2 * args.streams), grpc_workers=max(256, args.streams + 16),
            grace_period_s=30, kv_preallocate=args.kv_preallocate,
            prefix_cache=not args.no_prefix_cache,
            **({"kv_cache_tokens": args.kv_cache_tokens} if args.kv_cache_tokens else {})))
        base_cfg = server.core.base.config
        adapter_ids = [f"soak/{i:03d}" for i in range(args.adapters)]
        make_adapters(base_cfg, tmp / "adapters", adapter_ids, args.seed)
        make_adapters(base_cfg, tmp / "dyn", list(ADAPTER_KINDS), args.seed + 1)
        broken_ids = ["broken/0"]
        make_broken_adapter(tmp / "adapters", broken_ids[0])
        server.start()
        try:
            with QuiverClient(server.address, timeout=300) as client:
                return soak(client, server.metrics_port, adapter_ids,
                            [str(tmp / "dyn" / k) for k in ADAPTER_KINDS], broken_ids, args, errors)
        finally:
            server.shutdown(grace_s=30)
            logging.getLogger().removeHandler(errors)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    report = run(argv)
    print(report.summary(), flush=True)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
