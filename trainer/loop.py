"""The training loop: a Trainer with four verbs (setup, train, save_checkpoint, cleanup).

    setup            load the base (frozen; NF4 by default) and the data, attach the method's
                     adapter, build the optimizer; on --resume, restore a checkpoint
    train            for each optimizer step: grad_accum packed micro-batches, loss = summed
                     token cross-entropy / targets in the whole step (+ the method's regulariser),
                     clip, step, method hook (AdaLoRA's rank allocation); eval and checkpoints
                     on their schedules; finally export the adapter in PEFT format
    save_checkpoint  <output>/checkpoints/step-NNNNNN/: trainer_state.pt (method parameters and
                     state, optimizer, RNG, history) and a servable adapter/ directory
    cleanup          detach the adapter from the model

Resume is exact (bit for bit with the same seed): batches are a pure function of (seed, step)
(trainer/batch.py), the learning rate a pure function of the step, and everything stateful
(parameters, optimizer moments, AdaLoRA importance, torch's RNG used by dropout) is in the
checkpoint. The base model is rebuilt from its files, deterministically.
"""
from __future__ import annotations

import functools
import logging
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from runtime.models.base import LoadedBase, load_base
from runtime.nn.kernels import set_threads
from trainer.batch import PackedBatch, Schedule, eval_batches, pack
from trainer.config import TrainConfig, TrainConfigError
from trainer.data import load_examples
from trainer.export import TrainSummary, export_adapter
from trainer.methods import build_method

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.pt"
CHECKPOINTS = "checkpoints"


class Trainer:
    def __init__(self, config: TrainConfig, base: LoadedBase | None = None):
        """`base`: an already loaded base model to train on (it is restored by `cleanup`)."""
        self.cfg = config
        self.base = base
        self.method = None
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
        set_threads(cfg.threads)
        if self.base is None:
            self.base = load_base(cfg.model, cfg.quantize, cfg.dtype, cfg.device, training=True)
        self.model, self.device = self.base.model, self.base.device
        eos = next(iter(self.base.config.eos_token_ids), None)
        self.train_examples = load_examples(cfg.data, self.base.tokenizer, cfg.max_seq_len, eos)
        self.eval_examples = (load_examples(cfg.eval_data, self.base.tokenizer, cfg.max_seq_len, eos)
                              if cfg.eval_data else [])
        self.schedule = Schedule(len(self.train_examples), cfg.batch_size, cfg.grad_accum, cfg.seed)
        self.total_steps = self.schedule.total_steps(cfg.epochs, cfg.max_steps)
        self.method = build_method(cfg, self.model, self.base.tokenizer, self.total_steps)
        self.params = self.method.adapter_params()
        if not self.params:
            raise TrainConfigError(f"--method {cfg.method} has no trainable parameters with these settings")
        if cfg.gradient_checkpointing:
            _checkpoint_layers(self.model)
        self.optimizer = make_optimizer(cfg, self.params)
        self.summary.total_steps = self.total_steps
        if cfg.resume:
            self._load_checkpoint(resolve_checkpoint(cfg))
        log.info("training %s: %d trainable parameters, %d examples, %d steps", cfg.method,
                 sum(p.numel() for p in self.params), len(self.train_examples), self.total_steps)

    # ---- train --------------------------------------------------------------------------------
    def train(self) -> Path:
        """Run to the last step; returns the output directory (the final PEFT adapter)."""
        cfg = self.cfg
        bar = _progress_bar(cfg, self.total_steps, self.step)
        start = time.perf_counter() - self.summary.seconds  # a resumed run continues the clock
        while self.step < self.total_steps:
            loss, tokens = self.train_step()
            self.summary.tokens += tokens
            self.summary.seconds = time.perf_counter() - start
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{self.summary.tokens_per_second:.0f}",
                            lr=f"{self._lr(self.step - 1):.2e}")
            if cfg.eval_every and self.eval_examples and self.step % cfg.eval_every == 0:
                self._record_eval()
            if cfg.save_every and self.step % cfg.save_every == 0:
                self.save_checkpoint()
        bar.close()
        if self.eval_examples and (not self.eval_history or self.eval_history[-1][0] != self.step):
            self._record_eval()
        return export_adapter(self.method, cfg.output, cfg, self._finish_summary())

    def train_step(self) -> tuple[float, int]:
        """One optimizer step over grad_accum packed micro-batches: (mean token loss, tokens)."""
        batches = [pack([self.train_examples[i] for i in idx]).to(self.device)
                   for idx in self.schedule.step_batches(self.step)]
        num_targets = sum(b.num_targets for b in batches)
        for group in self.optimizer.param_groups:
            group["lr"] = self._lr(self.step)
        self.model.train()
        self.method.train()
        loss_sum = 0.0
        for batch in batches:
            ce = self._loss_sum(batch)
            loss = ce / num_targets
            reg = self.method.regularization()
            if reg is not None:
                loss = loss + reg / len(batches)
            loss.backward()
            loss_sum += ce.item()
        if self.cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        self.optimizer.step()
        self.step += 1
        self.method.after_optimizer_step(self.step)
        self.optimizer.zero_grad(set_to_none=True)
        mean = loss_sum / num_targets
        self.history.append([self.step, mean])
        return mean, sum(b.num_tokens for b in batches)

    def _loss_sum(self, batch: PackedBatch) -> torch.Tensor:
        logits = self.method(self.model, batch)  # [n, vocab]
        return F.cross_entropy(logits.float(), batch.targets, reduction="sum")

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
            logits = self.method(self.model, batch).float()  # [n, vocab]
            total += F.cross_entropy(logits, batch.targets, reduction="sum").item()
            count += batch.num_targets
            wrong = (logits.argmax(-1) != batch.targets).long()  # [n]
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
        """Everything a resumed run needs, plus the adapter as of this step (servable)."""
        path = Path(self.cfg.output) / CHECKPOINTS / f"step-{self.step:06d}"
        path.mkdir(parents=True, exist_ok=True)
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
        tmp = path / f".{STATE_FILE}.tmp"
        torch.save(state, tmp)
        os.replace(tmp, path / STATE_FILE)
        export_adapter(self.method, path / "adapter", self.cfg, self._finish_summary())
        log.info("checkpoint %s", path)
        return path

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
    def cleanup(self) -> None:
        """Give the model back as it was: adapter slots detached, layer forwards unwrapped."""
        if self.method is not None and self.base is not None:
            self.method.detach(self.model)
            for layer in self.model.model.layers:
                layer.__dict__.pop("forward", None)
            self.model.eval()
        self.method = None


def make_optimizer(cfg: TrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if cfg.optim == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


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
