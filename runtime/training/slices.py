"""One job's Trainer on the server's resident base, advanced one optimizer step per slice.

The model is the very DecoderModel the engine serves (no second copy of the base). Each slice
runs inside `_scope`, on the engine thread, between two engine steps:

    enter   torch's global RNG -> the job's own (dropout, the adapter's init draw from it)
            the adapter attached: the LoRA family points every projection at the method's own
            one-slot tensors (trainer/methods/lora.py), prompt / prefix methods change nothing
    step    forward + backward + optimizer step through the Python modules (autograd); the C++
            decode path (runtime/nn/native.py) never takes a training forward (no KV cache)
    exit    the serving slots back, eval mode, the serving RNG state back

So a serving step never sees a training weight, and serving traffic (sampling draws from the
global RNG too) never moves the job's random stream: a job resumed after a restart replays
exactly the steps an uninterrupted one takes.

Merged projections (the fused CPU kernel's q/k/v and gate/up as one matmul each,
runtime/nn/groups.py) run as their members wherever a gradient must reach the input, so the
served base differentiates as the trainer's own, up to the fused kernel's rounding
(tests/training/test_resident.py).
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from runtime.models.base import LoadedBase
from trainer.config import TrainConfig
from trainer.loop import CHECKPOINTS, STATE_FILE, Trainer


class ResidentRun:
    def __init__(self, cfg: TrainConfig, base: LoadedBase, examples: tuple[list, list]):
        self.cfg = cfg
        self.trainer = Trainer(cfg, base, resident=True, examples=examples)
        self._rng: torch.Tensor | None = None

    @property
    def step(self) -> int:
        return self.trainer.step

    @property
    def total_steps(self) -> int:
        return self.trainer.total_steps

    @property
    def done(self) -> bool:
        return self.trainer.done

    def setup(self) -> None:
        """Build the adapter and optimizer (and restore --resume's checkpoint)."""
        with self._scope():
            self.trainer.setup()

    def advance(self) -> tuple[float, int]:
        """One optimizer step: (its mean token loss, tokens trained on)."""
        before = self.trainer.summary.tokens
        with self._scope():
            loss = self.trainer.advance()
        return loss, self.trainer.summary.tokens - before

    def finish(self, out_dir: Path) -> Path:
        with self._scope():
            return self.trainer.finish(out_dir)

    def close(self) -> None:
        """Detach for good and drop the adapter, its optimizer state and activations."""
        self.trainer.cleanup()
        self.trainer.method = self.trainer.optimizer = self.trainer.params = None

    @contextlib.contextmanager
    def _scope(self):
        serving = torch.get_rng_state()
        if self._rng is not None:
            torch.set_rng_state(self._rng)
        self.trainer.attach()
        try:
            with torch.enable_grad():
                yield
        finally:
            self.trainer.detach()
            self._rng = torch.get_rng_state()
            torch.set_rng_state(serving)


def latest_checkpoint(output: str | Path) -> Path | None:
    """The newest complete checkpoint under a job's output directory, if any."""
    found = sorted((Path(output) / CHECKPOINTS).glob(f"step-*/{STATE_FILE}"))
    return found[-1].parent if found else None
