"""The training loop: a Trainer with four verbs (setup, train, save_checkpoint, cleanup).

    setup            load the base (frozen; NF4 by default) and the data, attach the method's
                     adapter, build the optimizer; on --resume, restore a checkpoint
    train            `advance` to the last step, then `finish`:
      advance        one optimizer step: grad_accum packed micro-batches, loss = summed token
                     cross-entropy / targets in the whole step (+ the method's regulariser), clip,
                     step, method hook (AdaLoRA's rank allocation); eval and checkpoint when
                     their schedules say so
      finish         the final eval, and the adapter exported in PEFT format
    save_checkpoint  <output>/checkpoints/step-NNNNNN/: trainer_state.pt (method parameters and
                     state, optimizer, RNG, history) and a servable adapter/ directory, written
                     whole under a temporary name and renamed into place (a kill mid-write leaves
                     the previous checkpoints as they were, and no half-written one)
    cleanup          detach the adapter from the model

`quiver train` calls `train`; a fine-tuning job inside the server (runtime/training) runs
`advance` in pieces between engine steps, with the adapter attached (`attach`) only for each
piece, on the server's own base (`resident=True`: the server's thread settings are kept).

Pause points (`pauses`): a step calls `pauses.pause_point()` between its parts, so that a job in
the server can hand the engine thread back there (runtime/training/pieces.py), and runs the
blocking writes of a checkpoint through `pauses.outside(fn)`; `setup` (between the projections
the method builds) and `finish` (the final eval, the export's writes) do the same. For `quiver train` both are plain
(`NoPauses`). The parts are small on purpose: the loss over the vocabulary a slice at a time
(trainer/loss.py), clipping and the optimizer step a chunk of parameters at a time
(trainer/optim.py), the checkpoint's state file a record at a time. None of it changes what is
computed, and `quiver train` runs the same code: a step is the same bits either way.

Resume is exact (bit for bit with the same seed): batches are a pure function of (seed, step)
(trainer/batch.py), the learning rate a pure function of the step, and everything stateful
(parameters, optimizer moments, AdaLoRA importance, torch's RNG used by dropout) is in the
checkpoint. The base model is rebuilt from its files, deterministically.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import pickle
import shutil
import time
import types
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint

from runtime.models.base import LoadedBase, load_base
from runtime.nn.kernels import set_threads
from trainer.batch import PackedBatch, Schedule, eval_batches, pack
from trainer.config import TrainConfig, TrainConfigError
from trainer.data import load_examples
from trainer.export import TrainSummary, export_adapter
from trainer.loss import cross_entropy_sum, loss_and_argmax
from trainer.methods import build_method
from trainer.optim import clip_grad_norm_in_chunks, step_in_chunks

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.pt"
CHECKPOINTS = "checkpoints"


class NoPauses:
    """A step's pause points for a run that is never cut (`quiver train`). A job in the server
    passes its PiecewiseCall instead (runtime/training/pieces.py), which has the same two methods."""

    def pause_point(self) -> None:
        """Where the step may hand its thread back."""

    def outside(self, fn):
        """Run `fn`, blocking work that reads no tensor the server's engine writes (a checkpoint's
        file writes), where the engine may run beside it."""
        return fn()


class Trainer:
    def __init__(self, config: TrainConfig, base: LoadedBase | None = None, resident: bool = False,
                 examples: tuple[list, list] | None = None, pauses=None):
        """`base`: an already loaded base model to train on (it is restored by `cleanup`).
        `resident`: `base` is a serving model; torch's thread settings are left alone.
        `examples`: (train, eval) already tokenized from config.data / eval_data (a server
        tokenizes off its engine thread), instead of reading them in `setup`.
        `pauses`: the step's pause points (module docstring; default `NoPauses`)."""
        self.cfg = config
        self.base = base
        self.resident = resident
        self._examples = examples
        self.pauses = pauses or NoPauses()
        self.method = None
        self.last_loss: float | None = None
        self._attached = False
        self.step = 0
        self.history: list[list[float]] = []  # [step, train loss] per optimizer step
        self.eval_history: list[list[float]] = []  # [step, eval loss, eval exact match]
        self.summary = TrainSummary()

    # ---- setup --------------------------------------------------------------------------------
    def setup(self) -> None:
        """Everything before the first step. Seeds torch's global RNG with --seed (dropout and the
        adapter's initial weights draw from it), so a caller's own RNG state is not preserved."""
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        if not self.resident:
            set_threads(cfg.threads)
        if self.base is None:
            self.base = load_base(cfg.model, cfg.quantize, cfg.dtype, cfg.device, training=True)
        self.model, self.device = self.base.model, self.base.device
        self.train_examples, self.eval_examples = self._examples or read_examples(cfg, self.base)
        self.schedule = Schedule(len(self.train_examples), cfg.batch_size, cfg.grad_accum, cfg.seed)
        self.total_steps = self.schedule.total_steps(cfg.epochs, cfg.max_steps)
        pause = self.pauses.pause_point  # between the method's projections and the phases here
        self.method = build_method(cfg, self.model, self.base.tokenizer, self.total_steps, pause)
        self.params = self.method.adapter_params()
        if not self.params:
            raise TrainConfigError(f"--method {cfg.method} has no trainable parameters with these settings")
        pause()
        self.attach()
        self.optimizer = make_optimizer(cfg, self.params, self.device)
        self.summary.total_steps = self.total_steps
        if cfg.resume:
            pause()
            self._load_checkpoint(resolve_checkpoint(cfg))
        log.info("training %s: %d trainable parameters, %d examples, %d steps", cfg.method,
                 sum(p.numel() for p in self.params), len(self.train_examples), self.total_steps)

    # ---- train --------------------------------------------------------------------------------
    def train(self) -> Path:
        """Run to the last step; returns the output directory (the final PEFT adapter)."""
        bar = _progress_bar(self.cfg, self.total_steps, self.step)
        while not self.done:
            loss = self.advance()
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{self.summary.tokens_per_second:.0f}",
                            lr=f"{self._lr(self.step - 1):.2e}")
        bar.close()
        return self.finish()

    @property
    def done(self) -> bool:
        return self.step >= self.total_steps

    def advance(self) -> float:
        """One optimizer step, then the eval / checkpoint its step number calls for; the loss.

        `summary.seconds` counts the steps themselves (a resumed run continues the sum), so
        tokens/s is the training rate whatever else shares the process."""
        cfg = self.cfg
        t0 = time.perf_counter()
        loss, tokens = self.train_step()
        self.summary.tokens += tokens
        self.summary.seconds += time.perf_counter() - t0
        self.last_loss = loss
        if cfg.eval_every and self.eval_examples and self.step % cfg.eval_every == 0:
            self._record_eval()
        if cfg.save_every and self.step % cfg.save_every == 0:
            self.save_checkpoint()
        return loss

    def finish(self, out_dir: str | Path | None = None) -> Path:
        """The final eval (if there is eval data) and the PEFT adapter, to `out_dir` (default
        --output); returns the directory written."""
        if self.eval_examples and (not self.eval_history or self.eval_history[-1][0] != self.step):
            self._record_eval()
        self.pauses.pause_point()
        return export_adapter(self.method, out_dir or self.cfg.output, self.cfg, self._finish_summary(),
                              self.pauses.outside)

    def train_step(self) -> tuple[float, int]:
        """One optimizer step over grad_accum packed micro-batches: (mean token loss, tokens)."""
        batches = [pack([self.train_examples[i] for i in idx]).to(self.device)
                   for idx in self.schedule.step_batches(self.step)]
        num_targets = sum(b.num_targets for b in batches)
        for group in self.optimizer.param_groups:
            group["lr"] = self._lr(self.step)
        pause = self.pauses.pause_point
        pause()
        train_mode([self.model, self.method], pause)
        loss_sum = 0.0
        for batch in batches:
            ce = self._loss_sum(batch)
            loss = ce / num_targets
            reg = self.method.regularization()
            if reg is not None:
                loss = loss + reg / len(batches)
            loss.backward()
            loss_sum += ce.item()
            pause()
            del ce, loss, reg  # the micro-batch's autograd graph: ~3 ms to free (measured), a stretch of its own
            pause()
        if self.cfg.max_grad_norm > 0:
            clip_grad_norm_in_chunks(self.params, self.cfg.max_grad_norm, pause=pause)
        step_in_chunks(self.optimizer, pause)
        self.step += 1
        self.method.after_optimizer_step(self.step)
        pause()
        self.optimizer.zero_grad(set_to_none=True)
        mean = loss_sum / num_targets
        self.history.append([self.step, mean])
        return mean, sum(b.num_tokens for b in batches)

    def _loss_sum(self, batch: PackedBatch) -> torch.Tensor:
        """Summed token cross-entropy of one micro-batch (differentiable; trainer/loss.py)."""
        hidden = self.method.hidden(self.model, batch)  # [n, hidden]
        return cross_entropy_sum(hidden, self.model.lm_head_weight, batch.targets, self.pauses.pause_point)

    def _lr(self, step: int) -> float:
        """Learning rate of 0-based optimizer step `step`: warm-up, then the schedule to 0."""
        cfg, total = self.cfg, self.total_steps
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
        if cfg.lr_schedule == "linear":
            return cfg.lr * (1.0 - progress)
        if cfg.lr_schedule == "cosine":
            return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
        return cfg.lr

    @torch.no_grad()
    def evaluate(self) -> tuple[float, float]:
        """(mean token cross-entropy, exact-match rate) over the eval set; dropout off, no RNG.

        An example matches when every target token is the argmax given the gold tokens before
        it, which is exactly when greedy decoding reproduces its completion.
        """
        self.model.eval()
        self.method.eval()
        total, count, matched = 0.0, 0, 0
        for batch in eval_batches(self.eval_examples, self.cfg.batch_size):
            batch = batch.to(self.device)
            hidden = self.method.hidden(self.model, batch)  # [n, hidden]
            loss, argmax = loss_and_argmax(hidden, self.model.lm_head_weight, batch.targets, self.pauses.pause_point)
            total += loss.item()
            count += batch.num_targets
            wrong = (argmax != batch.targets).long()  # [n]
            wrong_per_row = torch.zeros(len(batch.row_lens), dtype=torch.long, device=wrong.device)
            matched += int((wrong_per_row.index_add_(0, batch.loss_row_of, wrong) == 0).sum())
        return total / count, matched / len(self.eval_examples)

    def _record_eval(self) -> None:
        loss, accuracy = self.evaluate()
        self.eval_history.append([self.step, loss, accuracy])
        self.summary.eval_loss, self.summary.eval_accuracy = loss, accuracy
        log.info("step %d: eval loss %.4f, exact match %.3f", self.step, loss, accuracy)

    def _finish_summary(self) -> TrainSummary:
        s = self.summary
        s.steps = self.step
        losses = [loss for _, loss in self.history]
        s.first_loss = losses[0] if losses else None
        s.final_loss = sum(losses[-10:]) / len(losses[-10:]) if losses else None
        s.extra = self.method.summary_facts()
        return s

    # ---- checkpoints --------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """Everything a resumed run needs, plus the adapter as of this step (servable).

        Written into `.step-NNNNNN.tmp` and renamed to `step-NNNNNN` once complete: `resume`
        only ever finds whole checkpoints (and a stale temporary one is removed here). The
        state file goes out a record at a time with a pause point after each (measured: ~80 MB,
        60-90 ms for the embedded model's LoRA and AdamW state); the adapter files and the
        fsyncs (~50 ms of waiting on the disk) run through `pauses.outside`: they read only
        the method's parameters, which nothing but this step writes."""
        self.pauses.pause_point()
        root = Path(self.cfg.output) / CHECKPOINTS
        final = root / f"step-{self.step:06d}"
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".step-*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        path = root / f".{final.name}.tmp"
        path.mkdir()
        state = {
            "step": self.step,
            "config": self.cfg.to_dict(),
            "method": self.method.state_dict(),
            "method_extra": self.method.extra_state(),
            "optimizer": self.optimizer.state_dict(),
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else [],
            "history": self.history,
            "eval_history": self.eval_history,
            "tokens": self.summary.tokens,
            "seconds": self.summary.seconds,
        }
        self.pauses.pause_point()
        with open(path / STATE_FILE, "wb") as f:
            save_in_pieces(state, f, self.pauses.pause_point)
        self.pauses.pause_point()
        export_adapter(self.method, path / "adapter", self.cfg, self._finish_summary(), self.pauses.outside)
        self.pauses.outside(lambda: _fsync_tree(path))
        if final.exists():  # a run resumed from an older checkpoint passes this step again
            shutil.rmtree(final)
        os.replace(path, final)
        log.info("checkpoint %s", final)
        return final

    def _load_checkpoint(self, path: Path) -> None:
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
        mismatches = self.cfg.resume_mismatches(state["config"])
        if mismatches:
            raise TrainConfigError(f"--resume {path}: the checkpoint was trained with other settings "
                                   f"({'; '.join(mismatches[:5])}); resume with the same arguments")
        self.method.load_state_dict(state["method"])
        self.method.load_extra_state(state["method_extra"])
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        if state["cuda_rng"]:
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.step, self.history = state["step"], state["history"]
        self.eval_history, self.summary.tokens = state["eval_history"], state["tokens"]
        self.summary.seconds = state["seconds"]
        log.info("resumed from %s at step %d", path, self.step)

    # ---- cleanup ------------------------------------------------------------------------------
    def attach(self) -> None:
        """The adapter into the model's forward (and, with --gradient-checkpointing, each
        layer's forward wrapped); idempotent."""
        if self._attached or self.method is None:
            return
        self.method.attach(self.model)
        if self.cfg.gradient_checkpointing:
            _checkpoint_layers(self.model)
        self._attached = True

    def detach(self, eval_mode: bool = True) -> None:
        """The model as it was before `attach`: serving slots back, forwards unwrapped, eval mode.

        `eval_mode=False` leaves the modules' train flags as they are (~1 ms less): between the
        pieces of an in-server step (runtime/training/slices.py), where no served module reads
        them (runtime/nn has none that depends on the mode; the method's dropouts leave with its
        slots), and the step's end sets eval mode again."""
        if not self._attached:
            return
        self.method.detach(self.model)
        for layer in self.model.model.layers:
            layer.__dict__.pop("forward", None)
        if eval_mode:
            self.model.eval()
        self._attached = False

    def cleanup(self) -> None:
        """Give the model back as it was: adapter slots detached, layer forwards unwrapped."""
        if self.method is not None and self.base is not None:
            self.detach()
        self.method = None


def read_examples(cfg: TrainConfig, base: LoadedBase, each_row=contextlib.nullcontext) -> tuple[list, list]:
    """(train, eval) examples of cfg.data / cfg.eval_data, tokenized by the base's tokenizer
    (`each_row`: trainer.data.load_examples)."""
    eos = next(iter(base.config.eos_token_ids), None)
    train = load_examples(cfg.data, base.tokenizer, cfg.max_seq_len, eos, each_row)
    evals = load_examples(cfg.eval_data, base.tokenizer, cfg.max_seq_len, eos, each_row) if cfg.eval_data else []
    return train, evals


def make_optimizer(cfg: TrainConfig, params: list[torch.nn.Parameter],
                   device: torch.device | None = None) -> torch.optim.Optimizer:
    """AdamW: torch's, or bitsandbytes' 8-bit, paged (CUDA) or not.

    Paged optimizers keep their state in CUDA unified memory, which pages out to host memory
    under pressure instead of failing (the QLoRA recipe). Off CUDA there is nothing to page:
    `paged_adamw` falls back to torch's AdamW and `paged_adamw8bit` to AdamW8bit, with a warning.
    """
    kind = cfg.optim
    if kind.startswith("paged_") and (device is None or device.type != "cuda"):
        log.warning("--optim %s pages optimizer state through CUDA unified memory; on %s it "
                    "falls back to the unpaged %s", kind, device or "this device", kind[len("paged_"):])
        kind = kind[len("paged_"):]
    if kind != "adamw":
        import bitsandbytes as bnb

        cls = {"adamw8bit": bnb.optim.AdamW8bit, "paged_adamw": bnb.optim.PagedAdamW,
               "paged_adamw8bit": bnb.optim.PagedAdamW8bit}[kind]
        return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def train_mode(modules: list[torch.nn.Module], pause, every: int = 256) -> None:
    """`m.train()` for each of `modules`: every submodule's flag set, `pause()` after each
    `every`. With an adapter attached the served model is ~2000 modules, ~5 ms to set at once
    on one core (measured); no module here overrides `train`, so the flags are all it does."""
    seen = 0
    for root in modules:
        for m in root.modules():
            m.training = True
            seen += 1
            if seen % every == 0:
                pause()


def save_in_pieces(obj, f, pause) -> None:
    """`torch.save(obj, f)`, the same bytes, with `pause()` after each object pickled (a tensor's
    reduction: ~15 us) and each record written (a storage).

    torch.save pickles the whole object before it writes anything (~20 ms for 1260 tensors,
    measured), so pausing at writes alone would leave that in one stretch; a Pickler whose
    `reducer_override` pauses and declines (NotImplemented: pickled as ever) splits it too."""

    class Pickler(pickle.Pickler):
        def reducer_override(self, obj):
            pause()
            return NotImplemented

    module = types.ModuleType("quiver_pausing_pickle")  # torch.save reads pickle_module.__name__
    module.Pickler = Pickler
    torch.save(obj, _PausingWriter(f, pause), pickle_module=module)


class _PausingWriter:
    """A file for `torch.save` that calls `pause()` after every write (one per record)."""

    def __init__(self, f, pause):
        self._f, self._pause = f, pause

    def write(self, data) -> int:
        n = self._f.write(data)
        self._pause()
        return n

    def flush(self) -> None:
        self._f.flush()


def _fsync_tree(path: Path) -> None:
    """Flush every file under `path` (and the directories) to disk before the rename publishes it."""
    for f in [*path.rglob("*"), path]:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def resolve_checkpoint(cfg: TrainConfig) -> Path:
    """--resume PATH, or "latest": the newest checkpoint under <output>/checkpoints."""
    if cfg.resume != "latest":
        path = Path(cfg.resume)
        if not (path / STATE_FILE).is_file():
            raise TrainConfigError(f"--resume {path}: no {STATE_FILE} there (not a quiver train checkpoint)")
        return path
    found = sorted((Path(cfg.output) / CHECKPOINTS).glob(f"step-*/{STATE_FILE}"))
    if not found:
        raise TrainConfigError(f"--resume: no checkpoint under {Path(cfg.output) / CHECKPOINTS}")
    return found[-1].parent


def _checkpoint_layers(model) -> None:
    """Gradient checkpointing: each decoder layer's activations are recomputed in backward.

    The layer's bound forward is wrapped on the instance (undone by `cleanup`), so the model
    code stays the served code; dropout masks replay identically (RNG state is preserved).
    """
    for layer in model.model.layers:
        layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)


def _progress_bar(cfg: TrainConfig, total: int, initial: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=not cfg.progress, unit="step",
                desc=f"quiver train {cfg.method}", dynamic_ncols=True)
