"""Training throughput: `quiver train` LoRA vs PEFT + bitsandbytes QLoRA, same data, same run.

    .venv/bin/python -m bench.train_bench                        # 3 timed steps per peer, batch 8
    .venv/bin/python -m bench.train_bench --steps 5 --threads 1
    .venv/bin/python -m bench.train_bench --to-accuracy          # whole learning task per peer (slow)
    .venv/bin/python -m bench.train_bench --in-server            # a job inside `quiver serve` (below)

Both sides train LoRA r=16, alpha 32, all-linear, on the embedded SmolLM2-135M-Instruct stored
as NF4 (double quantization, blocksize 64) with fp32 compute, AdamW with the trainer's linear
decay and clipping, on the same batches of the learning task's training set
(tests/data/facts_train.jsonl, chat template). Peers:

- quiver:          trainer.loop.Trainer (packed rows, logits only where the loss is taken)
- peft (ckpt):     transformers AutoModelForCausalLM + BitsAndBytesConfig(nf4) + get_peft_model
                   after prepare_model_for_kbit_training: the QLoRA recipe, gradient checkpointing on
- peft (no ckpt):  the same without gradient checkpointing

Peers are built first and then stepped in turn (one step of each, round robin, on the same
batches), so a load change on a shared machine hits all of them alike. tokens/s counts the real
(unpadded) tokens of each step, the same for every peer; figures are medians over the timed steps
(the first step of each peer is a warm-up). Both wall time and this process's CPU time are
reported: on a busy shared machine the CPU-time figure is the stable one. --to-accuracy runs every
peer through the whole task (the slow test's settings) and adds the held-out exact-match accuracy
(greedy, via teacher forcing) and the summed wall time of the training steps.

--in-server measures issue 15's goals against `quiver serve` (a subprocess, embedded model,
fused kernel, --train-share): a fine-tuning job with OpenAI's "auto" settings (LoRA r16
all-linear, batch 4, lr 3e-3, a checkpoint per epoch) cut to --steps optimizer steps, and
`quiver train` with the same settings in this process, alternately (--rounds each: the machine
is shared); tokens / seconds of the optimizer steps on both sides (the job's from its metrics
events: the time of its slices), medians. Then base-model streams (--stream-tokens, greedy)
without a job and with one running, alternately: mean time per output token and the largest
inter-token gap, the latter in decode steps (a step = the median TPOT without a job); and the
largest gap of streams run back to back across a one-step job's start and end (its setup,
finish and publishing).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings

import torch

from bench.common import goal_line, machine_line, table, versions_line

DATA, TEST = "tests/data/facts_train.jsonl", "tests/data/facts_test.jsonl"
RANK, ALPHA = 16, 32
#: the learning test's settings (tests/trainer/test_learning_task.py)
TASK = dict(lr=3e-3, epochs=3, batch_size=4, seed=0)


class QuiverPeer:
    def __init__(self, model_dir: str, out: str, batch_size: int, max_steps: int | None):
        from trainer import TrainConfig
        from trainer.loop import Trainer

        cfg = TrainConfig(method="lora", data=DATA, eval_data=TEST, output=out, model=model_dir, quantize="nf4",
                          dtype="float32", device="cpu", rank=RANK, alpha=ALPHA, targets="all-linear",
                          progress=False, lr=TASK["lr"], epochs=TASK["epochs"], seed=TASK["seed"],
                          batch_size=batch_size, max_steps=max_steps)
        self.trainer = Trainer(cfg)
        self.trainer.setup()
        self.total_steps = self.trainer.total_steps

    def step(self) -> int:
        return self.trainer.train_step()[1]

    def accuracy(self) -> float:
        return self.trainer.evaluate()[1]


class PeftPeer:
    """PEFT on the trainer's own batches, learning-rate schedule and clipping."""

    def __init__(self, model_dir: str, checkpointing: bool, batch_size: int, max_steps: int | None):
        from transformers import AutoTokenizer

        from trainer.batch import Schedule
        from trainer.data import load_examples

        self.model = _peft_model(model_dir, checkpointing)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.examples = load_examples(DATA, self.tokenizer, 512)
        self.schedule = Schedule(len(self.examples), batch_size, 1, seed=TASK["seed"])
        self.total_steps = max_steps or self.schedule.total_steps(TASK["epochs"], None)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=TASK["lr"])
        self.done = 0

    def step(self) -> int:
        (idx,) = self.schedule.step_batches(self.done)
        batch = _padded([self.examples[i] for i in idx], self.tokenizer.pad_token_id)
        for group in self.optimizer.param_groups:
            group["lr"] = TASK["lr"] * (1 - self.done / self.total_steps)
        self.model.train()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.done += 1
        return int(batch["attention_mask"].sum())

    @torch.no_grad()
    def accuracy(self) -> float:
        """Share of test examples whose every target token is the argmax (greedy reproduces it)."""
        from trainer.data import load_examples

        self.model.eval()
        examples, matched = load_examples(TEST, self.tokenizer, 512), 0
        for i in range(0, len(examples), 8):
            batch = _padded(examples[i: i + 8], self.tokenizer.pad_token_id)
            logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            pred, labels = logits[:, :-1].argmax(-1), batch["labels"][:, 1:]
            matched += int(((pred == labels) | (labels == -100)).all(dim=1).sum())
        return matched / len(examples)


def _peft_model(model_dir: str, checkpointing: bool):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=bnb, device_map="cpu",
                                                     dtype=torch.float32)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)
        return get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules="all-linear",
                                                lora_dropout=0.0, task_type="CAUSAL_LM"))


def _padded(examples, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids / attention_mask / labels (-100 off the loss), as HF collators make."""
    width = max(len(ex.ids) for ex in examples)
    ids = torch.full((len(examples), width), pad_id)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), -100)
    for i, ex in enumerate(examples):
        n = len(ex.ids)
        ids[i, :n] = torch.tensor(ex.ids)
        mask[i, :n] = 1
        labels[i, :n] = torch.where(torch.tensor(ex.labels), torch.tensor(ex.ids), -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def run_round_robin(peers: dict) -> dict[str, dict]:
    """Step every peer in turn until each has done its steps; per-step times and tokens."""
    stats = {name: {"times": [], "cpu": [], "tokens": []} for name in peers}
    for k in range(max(p.total_steps for p in peers.values())):
        for name, peer in peers.items():
            if k < peer.total_steps:
                t0, c0 = time.perf_counter(), time.process_time()
                tokens = peer.step()
                stats[name]["times"].append(time.perf_counter() - t0)
                stats[name]["cpu"].append(time.process_time() - c0)
                stats[name]["tokens"].append(tokens)
        print(f"step {k + 1}: " + ", ".join(f"{n} {s['times'][-1]:.1f} s ({s['cpu'][-1]:.1f} CPU)"
                                           for n, s in stats.items()), flush=True)
    return stats


def _rate(s: dict, clock: str = "times") -> float:
    """Median tokens per second of the timed steps, by wall ("times") or CPU ("cpu") clock."""
    return statistics.median(t / sec for t, sec in zip(s["tokens"][1:], s[clock][1:]))


def measure(batch: int, steps: int | None, no_ckpt_peer: bool = True,
            to_accuracy: bool = False) -> tuple[dict[str, dict], dict[str, float]]:
    """Build the peers, step them round robin; (per-peer step stats, held-out accuracy if asked).
    `steps` counts the warm-up step; None = the whole learning task."""
    from transformers.utils import logging as hf_logging

    from runtime.models.embedded import embedded_model_dir

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    model_dir = str(embedded_model_dir())
    with tempfile.TemporaryDirectory() as out:
        peers = {"quiver train": QuiverPeer(model_dir, out, batch, steps),
                 "peft + bnb (grad ckpt)": PeftPeer(model_dir, True, batch, steps)}
        if no_ckpt_peer:
            peers["peft + bnb (no ckpt)"] = PeftPeer(model_dir, False, batch, steps)
        stats = run_round_robin(peers)
        accuracy = {name: peer.accuracy() for name, peer in peers.items()} if to_accuracy else {}
    return stats, accuracy


def result_table(stats: dict[str, dict], accuracy: dict[str, float]) -> str:
    ours, ours_cpu = _rate(stats["quiver train"]), _rate(stats["quiver train"], "cpu")
    rows = []
    for name, s in stats.items():
        row = [name, f"{statistics.median(s['times'][1:]):.2f}", f"{_rate(s):.1f}", f"{ours / _rate(s):.2f}x",
               f"{statistics.median(s['cpu'][1:]):.2f}", f"{_rate(s, 'cpu'):.1f}", f"{ours_cpu / _rate(s, 'cpu'):.2f}x"]
        rows.append(row + ([f"{sum(s['times']):.0f}", f"{accuracy[name]:.1%}"] if accuracy else []))
    headers = ["peer", "wall s / step", "tokens / s", "quiver speed-up", "CPU s / step", "tokens / CPU s",
               "quiver speed-up (CPU)"] + (["task wall s", "held-out acc"] if accuracy else [])
    return table(headers, rows)


def report_rows(quick: bool = False, plot=None) -> str:
    """The report's training section (bench/run.py): the main() peers, round robin, as markdown
    with its command, sizes, table and a verdict on the goal (quiver >= 1.5x PEFT tokens/s).
    `plot(name, draw)` -> markdown image link (bench.run.Report.plot), or None for no figure."""
    batch, timed = (8, 3) if quick else (8, 6)  # quick: main()'s defaults
    stats, _ = measure(batch, timed + 1)
    ours = _rate(stats["quiver train"])
    verdicts = [goal_line(f"quiver tokens/s / {name} tokens/s", ours / _rate(s), ">=", 1.5, "x")
                for name, s in stats.items() if name != "quiver train"]
    text = (f"Command: `python -m bench.train_bench --batch-size {batch} --steps {timed}` (same peers, "
            f"round robin). LoRA r={RANK} alpha {ALPHA} all-linear on the NF4 embedded model, fp32 "
            f"compute, batch {batch}, median of {timed} timed steps after one warm-up step; "
            f"{torch.get_num_threads()} torch threads. Goal: quiver >= 1.5x PEFT QLoRA tokens/s "
            f"(wall clock; the CPU-clock column is the steadier one on a shared machine).\n\n"
            + result_table(stats, {}) + "\n\n" + "\n".join(verdicts))
    if plot is not None:
        names = list(stats)
        text += "\n\n" + plot("train", lambda ax: (
            ax.bar(names, [_rate(stats[n]) for n in names]), ax.set_ylabel("training tokens/s (wall)"),
            ax.set_title(f"LoRA r={RANK}, NF4 base, batch {batch}"), ax.tick_params(axis="x", labelsize=8)))
    return text


# ---- --in-server: a fine-tuning job inside `quiver serve` against `quiver train` -------------------
ADMIN = "bench-admin-token"


class ServeProcess:
    """`quiver serve` on the embedded model as a subprocess (free ports, a fresh data dir)."""

    def __init__(self, data_dir: str, threads: int | None, share: float, port: int = 0,
                 extra_args: tuple[str, ...] = ()):
        import subprocess
        import sys
        import threading

        http = port + 1 if port else 0
        args = [sys.executable, "-m", "runtime.cli", "serve", "--port", str(port), "--http-port", str(http),
                "--metrics-port", "-1", "--data-dir", data_dir, "--admin-token", ADMIN,
                "--train-share", str(share), *(["--threads", str(threads)] if threads else []), *extra_args]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        ready = threading.Event()

        def read():
            for line in self.proc.stdout:
                self.lines.append(line)
                if line.startswith("quiver serving on "):
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(600) or self.proc.poll() is not None:
            self.proc.kill()
            raise RuntimeError("quiver serve did not start:\n" + "".join(self.lines[-30:]))
        line = next(x for x in self.lines if x.startswith("quiver serving on "))
        port = line.split(" and http :")[1].split()[0]
        import openai

        self.client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=ADMIN, max_retries=0,
                                    timeout=600)
        self.model = self.client.models.list().data[0].id
        self.file = self.client.files.create(file=open(DATA, "rb"), purpose="fine-tune").id

    def create_job(self, max_steps: int | None, epochs: int = TASK["epochs"]) -> str:
        quiver = {"max_steps": max_steps} if max_steps else {}
        job = self.client.fine_tuning.jobs.create(
            model=self.model, training_file=self.file, seed=TASK["seed"],
            hyperparameters={"n_epochs": epochs}, extra_body={"quiver": quiver})
        return job.id

    def wait(self, job_id: str, statuses: tuple[str, ...]) -> str:
        while True:
            status = self.client.fine_tuning.jobs.retrieve(job_id).status
            if status in statuses or status in ("succeeded", "failed", "cancelled"):
                return status
            time.sleep(0.2)

    def step_stats(self, job_id: str) -> tuple[list[int], list[float]]:
        """(tokens, seconds) of each optimizer step, from the job's metrics events (auto-paged)."""
        events = [e for e in self.client.fine_tuning.jobs.list_events(job_id, limit=100) if e.type == "metrics"]
        events.sort(key=lambda e: e.data["step"])
        return [e.data["tokens"] for e in events], [e.data["seconds"] for e in events]

    def stream(self, tokens: int) -> list[float]:
        """One greedy base-model stream of `tokens` tokens: each token's arrival time.

        This process's cyclic collector is off while it reads: the process has trained too
        (`quiver train`), and a full collection over that heap stalls the reader for
        milliseconds, which would be timed as the server's inter-token gaps."""
        import gc

        times = []
        gc.collect()
        gc.disable()
        try:
            chunks = self.client.chat.completions.create(
                model=self.model, messages=[{"role": "user", "content": "Tell me a long story about a river."}],
                max_tokens=tokens, temperature=0, stream=True, extra_body={"ignore_eos": True})
            for chunk in chunks:
                if chunk.choices and chunk.choices[0].delta.content:
                    times.append(time.perf_counter())
        finally:
            gc.enable()
        return times

    def close(self) -> None:
        self.client.close()
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except Exception:  # noqa: BLE001 - a bench cleans up as it can
            self.proc.kill()


def quiver_train_rate(steps: int, threads: int | None) -> float:
    """`quiver train` with the job's settings (auto: LoRA r16 all-linear, batch 4, lr 3e-3, a
    checkpoint per epoch) on its own base: tokens / seconds of its optimizer steps."""
    import math

    from runtime.training.jobs import AUTO_BATCH_SIZE, AUTO_LORA_LR, AUTO_RANK
    from trainer import TrainConfig
    from trainer.loop import Trainer

    with tempfile.TemporaryDirectory() as out:
        rows = sum(1 for line in open(DATA) if line.strip())
        cfg = TrainConfig(method="lora", data=DATA, output=out, rank=AUTO_RANK, lr=AUTO_LORA_LR,
                          batch_size=AUTO_BATCH_SIZE, epochs=TASK["epochs"], seed=TASK["seed"], max_steps=steps,
                          save_every=math.ceil(rows / AUTO_BATCH_SIZE), progress=False, threads=threads)
        trainer = Trainer(cfg)
        trainer.setup()
        while not trainer.done:
            trainer.advance()
        s = trainer.summary
        return s.tokens / s.seconds


def server_rate(srv: ServeProcess, steps: int) -> float:
    job = srv.create_job(steps)
    assert srv.wait(job, ()) == "succeeded"
    tokens, seconds = srv.step_stats(job)
    return sum(tokens) / sum(seconds)


def stream_figures(times: list[float]) -> tuple[float, float]:
    """(TPOT s, largest gap s) of one stream, from its second token on."""
    gaps = [b - a for a, b in zip(times[1:], times[2:])]
    return statistics.mean(gaps), max(gaps)


def gap_across_a_job(srv: ServeProcess, stream_tokens: int) -> float:
    """The largest inter-token gap (s) of base streams run back to back from before a one-step
    job is created until after it succeeded: its setup, its step, its finish and publishing
    all fall inside some stream (each stream `stream_tokens` long, so none grows the KV pool)."""
    import threading

    done, gaps = threading.Event(), []

    def pump():
        while not done.is_set():
            gaps.append(stream_figures(srv.stream(stream_tokens))[1])

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    time.sleep(0.3)
    job = srv.create_job(1)
    srv.wait(job, ())
    time.sleep(0.3)
    done.set()
    reader.join()
    return max(gaps)


def measure_in_server(rounds: int, steps: int, stream_tokens: int, threads: int | None, share: float,
                      port: int = 0) -> dict:
    """A/B interleaved: per round, `quiver train` then the same job in the server, no traffic;
    then base streams without a job and with one running, alternately."""
    out = {"train": [], "server": [], "tpot": [], "tpot_job": [], "gap": [], "gap_job": [], "gap_edges": []}
    with tempfile.TemporaryDirectory() as data_dir:
        srv = ServeProcess(data_dir, threads, share, port)
        try:
            srv.stream(8)  # warm
            for r in range(rounds):
                out["train"].append(quiver_train_rate(steps, threads))
                out["server"].append(server_rate(srv, steps))
                print(f"round {r + 1}: quiver train {out['train'][-1]:.0f} tok/s, in-server job "
                      f"{out['server'][-1]:.0f} tok/s", flush=True)
            for r in range(rounds):
                tpot, gap = stream_figures(srv.stream(stream_tokens))
                out["tpot"].append(tpot)
                out["gap"].append(gap)
                job = srv.create_job(None, epochs=50)
                srv.wait(job, ("running",))
                time.sleep(2.0)  # past the job's setup: its steps are running
                tpot, gap = stream_figures(srv.stream(stream_tokens))
                out["tpot_job"].append(tpot)
                out["gap_job"].append(gap)
                srv.client.fine_tuning.jobs.cancel(job)
                srv.wait(job, ("cancelled",))
                out["gap_edges"].append(gap_across_a_job(srv, stream_tokens))
                print(f"stream round {r + 1}: TPOT {out['tpot'][-1] * 1e3:.1f} ms -> {tpot * 1e3:.1f} ms with a "
                      f"job; largest gap {out['gap'][-1] * 1e3:.1f} ms -> {gap * 1e3:.1f} ms; across a job's "
                      f"start and end {out['gap_edges'][-1] * 1e3:.1f} ms", flush=True)
        finally:
            srv.close()
    return out


def in_server_report(out: dict, share: float) -> str:
    med = {k: statistics.median(v) for k, v in out.items()}
    step = med["tpot"]  # a decode step: the TPOT without a job
    bound = 1 / (1 - share) * 1.1 if share < 1 else float("inf")
    lines = [
        table(["figure", "median", "runs"], [
            ["quiver train tokens/s", f"{med['train']:.0f}", " ".join(f"{x:.0f}" for x in out["train"])],
            ["in-server job tokens/s (no traffic)", f"{med['server']:.0f}", " ".join(f"{x:.0f}" for x in out["server"])],
            ["base stream TPOT, no job (ms)", f"{med['tpot'] * 1e3:.1f}", " ".join(f"{x * 1e3:.1f}" for x in out["tpot"])],
            ["base stream TPOT, job running (ms)", f"{med['tpot_job'] * 1e3:.1f}",
             " ".join(f"{x * 1e3:.1f}" for x in out["tpot_job"])],
            ["largest inter-token gap, no job (steps)", f"{med['gap'] / step:.1f}",
             " ".join(f"{x / step:.1f}" for x in out["gap"])],
            ["largest inter-token gap, job running (steps)", f"{med['gap_job'] / step:.1f}",
             " ".join(f"{x / step:.1f}" for x in out["gap_job"])],
            ["largest inter-token gap across a job's start and end (steps)", f"{med['gap_edges'] / step:.1f}",
             " ".join(f"{x / step:.1f}" for x in out["gap_edges"])],
        ]), "",
        goal_line("in-server job tokens/s / quiver train tokens/s", med["server"] / med["train"], ">=", 0.9, "x"),
        goal_line("TPOT with a job / TPOT without", med["tpot_job"] / med["tpot"], "<=", bound, "x"),
        goal_line("largest inter-token gap with a job (decode steps)", med["gap_job"] / step, "<=", 3, ""),
        goal_line("largest inter-token gap across a job's start and end (decode steps)", med["gap_edges"] / step,
                  "<=", 3, ""),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3, help="timed steps per peer (after one warm-up step)")
    p.add_argument("--batch-size", type=int, default=8, help="examples per step (--to-accuracy: 4, the test's)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--skip-peft-no-ckpt", action="store_true", help="only the QLoRA-recipe PEFT peer")
    p.add_argument("--to-accuracy", action="store_true", help="train each peer through the whole task")
    p.add_argument("--in-server", action="store_true", help="a job inside quiver serve vs quiver train")
    p.add_argument("--rounds", type=int, default=3, help="--in-server: A/B rounds of each measurement")
    p.add_argument("--stream-tokens", type=int, default=128, help="--in-server: tokens per base stream")
    p.add_argument("--train-share", type=float, default=0.3, help="--in-server: the server's --train-share")
    p.add_argument("--port", type=int, default=0,
                   help="--in-server: the server's gRPC port, HTTP on the next one (default: any free)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.in_server:
        out = measure_in_server(args.rounds, args.steps, args.stream_tokens, args.threads, args.train_share,
                                args.port)
        print(f"\n## Fine-tuning in the server: {args.steps} steps a job, --train-share {args.train_share}\n")
        print(f"{machine_line()}, {torch.get_num_threads()} torch threads  \n{versions_line()}\n")
        print(in_server_report(out, args.train_share))
        return 0
    full = args.to_accuracy
    batch, steps = (TASK["batch_size"], None) if full else (args.batch_size, args.steps + 1)
    stats, accuracy = measure(batch, steps, not args.skip_peft_no_ckpt, full)
    print(f"\n## Training: LoRA r={RANK} all-linear, NF4 base, fp32 compute, batch {batch}\n")
    print(f"{machine_line()}, {torch.get_num_threads()} torch threads  \n{versions_line()}\n")
    print(result_table(stats, accuracy))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
