"""One job's Trainer on the server's resident base, advanced in slices between engine steps.

The model is the very DecoderModel the engine serves (no second copy of the base). A slice is
one piece of an optimizer step (or of the job's setup, or of its finish: the final eval and the
export), bounded by a time budget (the scheduler's, scheduler.py): the step runs as a
coroutine on the engine thread that pauses at the model's pause points once the budget is spent
(pieces.py), so a whole step (~0.5 s on the embedded model), or a setup (0.1-0.7 s), never
stands between two serving steps. Each piece runs inside `_piece`, between two engine steps:

    enter   torch's global RNG -> the job's own (dropout, the adapter's init draw from it)
            the adapter attached: the LoRA family points every projection at the method's own
            one-slot tensors (trainer/methods/lora.py), prompt / prefix methods change nothing;
            the pause points installed (at a step's first piece, for the whole step)
    piece   forward / backward / optimizer step through the Python modules (autograd), until
            the budget is spent or the step (and the checkpoint it calls for) is done; the C++
            decode path (runtime/nn/native.py) never takes a training forward (no KV cache)
    exit    the serving slots back, the serving RNG state back (and, once the step is done, the
            hooks gone and eval mode; between its pieces the train flags and the pause points'
            hooks stay, which no served module reads: the serving steps take the C++ decode
            path, which calls no module, and elsewhere a hook is a thread check; the test that
            serving between pieces is unchanged guards it). Setting them for every piece cost
            ~0.3 ms of the ~1.4 ms a piece spends outside the step.

So a serving step never sees a training weight, and serving traffic (sampling draws from the
global RNG too) never moves the job's random stream: a job resumed after a restart replays
exactly the steps an uninterrupted one takes, and a step cut into any number of pieces is the
step `quiver train` takes on the same base, bit for bit (tests/training/test_pieces.py).

Merged projections (the fused CPU kernel's q/k/v and gate/up as one matmul each,
runtime/nn/groups.py) run as their members wherever a gradient must reach the input, so the
served base differentiates as the trainer's own, up to the fused kernel's rounding
(tests/training/test_resident.py).
"""
from __future__ import annotations

import contextlib
import functools
import math
import time
from pathlib import Path

import torch

from runtime.models.base import LoadedBase
from runtime.nn.groups import ProjectionGroup
from runtime.training.pieces import PausePoints, PiecewiseCall
from trainer.config import TrainConfig
from trainer.loop import CHECKPOINTS, STATE_FILE, Trainer


class ResidentRun:
    def __init__(self, cfg: TrainConfig, base: LoadedBase, examples: tuple[list, list]):
        self.cfg = cfg
        # the pieces run on the engine thread, with its OpenMP team (pieces.py)
        self._call = PiecewiseCall()
        # the step's own pause points (trainer/loop.py) are the call's
        self.trainer = Trainer(cfg, base, resident=True, examples=examples, pauses=self._call)
        self._rng: torch.Tensor | None = None
        self._points = PausePoints(pause_modules(base.model), self._call.pause_point)
        self._hooks = None  # the pause points' hooks, installed for the step in flight
        self._tokens_before = 0  # the trainer's token count when the step in flight began
        self._seconds_before = 0.0  # ... and its step seconds
        self._step_s = 0.0  # the pieces' time of the step in flight
        self.ready = False  # set up (`setup` done)
        self.last_step_s = 0.0  # the pieces' time of the last finished step

    @property
    def step(self) -> int:
        return self.trainer.step

    @property
    def total_steps(self) -> int:
        return self.trainer.total_steps

    @property
    def done(self) -> bool:
        return self.trainer.done and not self._call.in_flight

    @property
    def mid_step(self) -> bool:
        return self._call.in_flight

    @property
    def outside_busy(self) -> bool:
        """A piece is waiting on its files (a checkpoint's writes, `PiecewiseCall.outside`)."""
        return self._call.outside_busy

    def wait_outside(self, timeout_s: float) -> None:
        self._call.wait_outside(timeout_s)

    def setup(self, budget_s: float = math.inf, whole: bool = True) -> bool:
        """Build the adapter and optimizer (and restore --resume's checkpoint), in pieces as a
        step is (`advance`: the method's projections are its pause points; measured on the
        embedded model, LoRA r16 all-linear: 0.1-0.7 s whole, which every stream would see as
        one gap); True once done."""
        done, _ = self._in_pieces(self.trainer.setup, budget_s, whole)
        self.ready = done
        return done

    def advance(self, budget_s: float = math.inf, whole: bool = False) -> tuple[float, int] | None:
        """One piece of the optimizer step in flight (or of the next), of about `budget_s`:
        (the step's mean token loss, tokens trained on) once the step is done, else None.
        whole=True (nothing is being served): with no step in flight, the next step runs whole
        here, on the calling (engine) thread with its threads; a step in flight goes on in a
        piece. The same ops in the same order either way. A step waiting on its checkpoint's
        files (`PiecewiseCall.outside`) is not waited for while serving: None at once."""
        if not self._call.in_flight:
            summary = self.trainer.summary
            self._tokens_before, self._seconds_before, self._step_s = summary.tokens, summary.seconds, 0.0
        t0 = time.perf_counter()
        done, loss = self._in_pieces(self.trainer.advance, budget_s, whole)
        self._step_s += time.perf_counter() - t0
        if not done:
            return None
        # the trainer's clock ran through the serving steps between pieces: count the pieces only
        self.trainer.summary.seconds = self._seconds_before + self._step_s
        self.last_step_s = self._step_s
        return loss, self.trainer.summary.tokens - self._tokens_before

    def finish(self, out_dir: Path, budget_s: float = math.inf, whole: bool = True) -> Path | None:
        """The final eval and the adapter's export into `out_dir`, in pieces as a step is (the
        eval's forwards pause at the projections, the files are written `outside`): the
        directory once done, else None."""
        done, path = self._in_pieces(functools.partial(self.trainer.finish, out_dir), budget_s, whole)
        return path if done else None

    def close(self) -> None:
        """Detach for good and drop the adapter, its optimizer state and activations (a step in
        flight is abandoned: it is unwound, pieces.py)."""
        abandoned = self._call.in_flight
        self._call.close()
        self._remove_hooks()
        self.trainer.cleanup()
        if abandoned:  # its pieces left the train flags on (`_piece`)
            self.trainer.model.eval()
        self.trainer.method = self.trainer.optimizer = self.trainer.params = None

    def _in_pieces(self, fn, budget_s: float, whole: bool) -> tuple[bool, object]:
        """One piece of `fn` (setup, a step, finish: one at a time), of about `budget_s`, with
        the pause points' hooks installed from its first piece to its end: (True, its value)
        once it returned, else (False, None). whole=True with nothing in flight: all of `fn`
        here, on the calling (engine) thread with its threads, where the pause points are
        no-ops (the same ops in the same order). Nothing is waited for while `fn` is writing
        files `outside` and the engine is serving: (False, None) at once."""
        if not whole and self._call.outside_busy:
            return False, None
        if not self._call.in_flight:
            self._hooks = self._points.installed()
        with self._piece():
            if whole and not self._call.in_flight:
                with torch.enable_grad():  # (a call in pieces has it on: pieces.py)
                    done, value = True, fn()
            else:
                done, value = self._call.run(fn, budget_s)
        if done:
            self._remove_hooks()
        return done, value

    @contextlib.contextmanager
    def _piece(self):
        with self._job_rng():
            self.trainer.attach()
            try:
                yield
            finally:
                self.trainer.detach(eval_mode=not self._call.in_flight)

    def _remove_hooks(self) -> None:
        if self._hooks is not None:
            self._hooks.remove()
            self._hooks = None

    @contextlib.contextmanager
    def _job_rng(self):
        serving = torch.get_rng_state()
        if self._rng is not None:
            torch.set_rng_state(self._rng)
        try:
            yield
        finally:
            self._rng = torch.get_rng_state()
            torch.set_rng_state(serving)


def pause_modules(model) -> list[torch.nn.Module]:
    """Where the model's forward and backward pause: every decoder projection, and the merged
    q/k/v and gate/up groups (runtime/nn/groups.py): where no gradient reaches a group's input
    (layer 0's q/k/v) it runs merged, calling no member, and its own hook splits the stretch
    from the embedding to o_proj (measured, one core: 4.1-4.8 ms)."""
    groups = [m for m in model.modules() if isinstance(m, ProjectionGroup)]
    return [*model.adapted_linears().values(), *groups]


def latest_checkpoint(output: str | Path) -> Path | None:
    """The newest complete checkpoint under a job's output directory, if any."""
    found = sorted((Path(output) / CHECKPOINTS).glob(f"step-*/{STATE_FILE}"))
    return found[-1].parent if found else None
