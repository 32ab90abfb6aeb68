"""The engine loop's background work: fine-tuning jobs, one at a time, between engine steps.

    EngineLoop (runtime/engine/loop.py) calls  scheduler(busy, step_s) -> did work
        after every engine step (busy=True, step_s = that step's wall time) and whenever the
        engine is idle (busy=False); every call runs on the engine thread.

A call does at most one of: pick up the next queued job, run one slice of it (of bounded time:
slices.py, pieces.py), or end it. A job's slices are, in order, the pieces of its files'
tokenizing (the `validating_files` phase, a row at a time: `_prepare`), of its setup (adapter
+ optimizer built, or restored from its last checkpoint), of each optimizer step, and of its
finish (the final eval, the adapter exported into the store); then the helper thread registers the adapter and publishes it to the store
while the engine serves on, and the job is recorded and let go. No part of a job runs whole
on the engine thread while requests are waiting (measured before, embedded model: the setup
and the end were gaps of ~20 decode steps in every stream). Which job: the oldest pending one
in SQLite; a restarted server picks its running job up again and resumes it.

Time share (`TimeShare`): while requests are waiting or running, training may take at most
--train-share of the engine thread's time, in slices of half a serving step. Every serving
step earns training credit `step_s * share / (1 - share)`; a slice runs once the credit covers
a slice's budget (half the recent serving step time) and spends what it took. So a stream
beside a job sees at most one slice between two of its tokens, and its TPOT grows by at most
1 / (1 - share). Why half a step: a token's gap is the slice, the ~1 ms a slice spends outside
the step (attaching the adapter, the hand-off) and the next step, and the stream's largest gap
is the unluckiest of those; measured (bench.train_bench --in-server, embedded model, 2 shared
cores, two A/B runs): the largest gap 7.5 and 5.0 decode steps with one-step slices, 3.3 and 3.6
with half-step ones, the same share of the engine's time.

With no traffic training takes all of the engine's time, in pieces that grow with the quiet:
each idle piece may last as long as the engine has been idle so far (at least a busy slice, at
most IDLE_SLICE_S), so a request that comes while training runs waits at most about as long as
the quiet before it. Back-to-back requests (a client's next stream a few ms after its last, a
chat's next turn) therefore wait a step or so, not a whole optimizer step (~0.2-0.5 s on the
embedded model, ~20-100 decode steps). Once the engine has been idle WHOLE_AFTER_S, optimizer
steps run whole, back to back, on the engine thread and its threads (a step in flight then
finishes in pieces first; the credit is reset): then a request waits for at most the one step
in flight.
"""
from __future__ import annotations

import contextlib
import functools
import gc
import logging
import math
import os
import shutil
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

from runtime.nn.kernels import helper_thread
from runtime.training.pieces import PiecewiseCall
from runtime.training.slices import ResidentRun, latest_checkpoint
from runtime.training.state import FINAL, State
from trainer.config import TrainConfig
from trainer.loop import read_examples

log = logging.getLogger(__name__)

#: seconds the engine thread waits for a finished adapter to be read back into the registry
PUBLISH_TIMEOUT_S = 60.0


#: an idle engine's longest slice: long enough that a slice's fixed cost (attach, hooks, the
#: hand-off; ~1 ms) is ~1% of it, short enough that a request arriving meanwhile hardly waits
IDLE_SLICE_S = 0.1
#: idle this long, the engine runs whole optimizer steps (no piece hand-offs at all)
WHOLE_AFTER_S = 1.0
#: an idle engine waits for a checkpoint's file writes this long at a time (a request that
#: comes meanwhile waits at most that)
OUTSIDE_POLL_S = 0.005
#: the shortest busy slice (a model whose serving steps take microseconds still trains)
MIN_SLICE_S = 0.002
#: a busy slice's budget, in recent serving steps (module docstring)
SLICE_STEPS = 0.5
#: the least training time a busy slice is given once its fixed cost is taken off (TimeShare)
MIN_PIECE_S = 0.0005


class TimeShare:
    """Training's share of engine time while requests wait, and each slice's budget (module
    docstring).

    A busy slice's budget is `slice_steps` times the recent serving step time (an average over
    the last few, so one long prefill does not stretch the next slice): between two tokens of a
    stream there is then at most its step and one slice. A slice starts only once the credit
    covers its budget: the time is earned before it is spent, so a burst of traffic is slowed by
    at most the share. A serving step right after a slice earns for its usual length only, and
    what it took beyond that is charged to training: the slice's cost includes what it does to
    the step after it (measured: 1-5% of those steps take 3-4x their usual time on a shared
    2-core machine, the other cores' work having moved onto the one the slice left idle).

    `slice_s` is what a busy slice may take on the engine thread, all of it: the piece's own
    time is that less what slices recently took beyond the time they were given (attaching the
    adapter, the hand-offs, a stretch past the last pause point: ~0.5-1 ms on the embedded
    model, a third of a half-step slice), so a slice's wall time, and a stream's gap, is what
    `slice_steps` says.
    """

    def __init__(self, share: float, idle_slice_s: float = IDLE_SLICE_S, min_slice_s: float = MIN_SLICE_S,
                 slice_steps: float = SLICE_STEPS, whole_after_s: float = WHOLE_AFTER_S,
                 clock=time.perf_counter):
        if not 0.0 < share <= 1.0:
            raise ValueError(f"--train-share must be in (0, 1], not {share}")
        self.share, self.idle_slice, self.min_slice = share, idle_slice_s, min_slice_s
        self.slice_steps, self.whole_after, self.clock = slice_steps, whole_after_s, clock
        self._served_at = -math.inf  # when the last serving step ended (never: idle for ever)
        self.credit = 0.0
        self.step_s = 0.0  # moving average of the serving steps' usual durations
        self.overrun_s = 0.0  # moving average of what busy slices took beyond their budget
        self._given = 0.0  # the last busy budget handed out
        self._after_slice = False  # the last call was a busy slice

    def served(self, step_s: float) -> None:
        self._served_at = self.clock()
        excess = max(0.0, step_s - self.step_s) if self._after_slice and self.step_s else 0.0
        self._after_slice = False
        usual = step_s - excess
        self.step_s = usual if self.step_s == 0.0 else 0.7 * self.step_s + 0.3 * usual
        cap = 2 * self.slice_s  # room for one slice, never an unbounded bank
        if self.share >= 1.0:
            self.credit = cap
            return
        self.credit = min(cap, self.credit + usual * self.share / (1.0 - self.share) - excess)

    @property
    def slice_s(self) -> float:
        """A busy slice's budget: `slice_steps` recent serving steps."""
        return max(self.min_slice, self.slice_steps * self.step_s)

    def may_train(self, busy: bool) -> bool:
        return not busy or self.credit >= self.slice_s

    def idle_for(self) -> float:
        """Seconds since the last serving step ended."""
        return self.clock() - self._served_at

    def whole(self, busy: bool) -> bool:
        """Idle long enough for whole optimizer steps (module docstring)."""
        return not busy and self.idle_for() >= self.whole_after

    def budget(self, busy: bool) -> float:
        """The piece's time: a busy slice's wall time less its recent fixed cost; idle, as long as
        the engine has been idle (at least a busy slice, at most IDLE_SLICE_S)."""
        if not busy:
            return min(self.idle_slice, max(self.slice_s, self.idle_for()))
        self._given = max(MIN_PIECE_S, self.slice_s - self.overrun_s)
        return self._given

    def trained(self, busy: bool, seconds: float) -> None:
        if busy and self._given:
            over = max(0.0, seconds - self._given)
            self.overrun_s = 0.7 * self.overrun_s + 0.3 * over
        self.credit = self.credit - seconds if busy else 0.0
        self._after_slice = busy


@dataclass
class Active:
    """The job the engine thread is working on."""

    job_id: str
    fine_tuned_model: str
    cfg: TrainConfig
    prep: PiecewiseCall | None = None  # the files being tokenized, in slices (`_prepare`)
    run: ResidentRun | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    finishing: bool = False  # the final eval and export under way (ResidentRun.finish)
    #: the exported adapter being registered and published (helper thread), and its end: the
    #: job's final status is written then
    publishing: Future | None = None
    published: threading.Event = field(default_factory=threading.Event)


class TrainingScheduler:
    def __init__(self, state: State, base, base_id: str, tok_lock: threading.Lock, publish,
                 share: float, metrics=None):
        """publish(adapter_id, directory): make a finished adapter servable (register it)."""
        self.state, self.base, self.base_id = state, base, base_id
        self.tok_lock, self.publish, self.metrics = tok_lock, publish, metrics
        self.share = TimeShare(share)
        self.active: Active | None = None
        self.kick = threading.Event()  # set when a job may be waiting (created, restart)
        self.kick.set()
        self._lock = threading.Lock()  # final transitions vs. a cancel from an API thread
        # publishing: on any CPU, not the engine thread's pinned one (its thread is started from
        # the engine thread, whose CPU it would inherit), and no OpenMP team (kernels.helper_thread)
        self._publisher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="quiver-train-publish",
                                             initializer=helper_thread)
        #: a job ended since the engine was last idle: its trainer, optimizer and autograd
        #: leftovers (~35k objects in reference cycles on the embedded model) wait for the cyclic
        #: collector; a full collection over them holds the GIL for 25-50 ms, which, left to the
        #: collector's own timing, lands inside some stream as a gap of 5-10 tokens
        self._collect = False

    # ---- the EngineLoop hook (engine thread) ------------------------------------------------
    def __call__(self, busy: bool, step_s: float) -> bool:
        if busy:
            self.share.served(step_s)
        elif self._collect:  # idle: collect an ended job's objects now, with no stream waiting
            self._collect = False
            gc.collect()
            return True
        a = self.active
        if a is None:
            return self._pick() if self.kick.is_set() else False
        return self._work(a, busy)

    def _work(self, a: Active, busy: bool) -> bool:
        if a.publishing is not None:  # its status is written when the helper thread is done
            if not a.publishing.done():
                return False
            self._close(a)
            return True
        if a.cancelled.is_set():
            self._drop(a)
            return True
        try:
            if a.run is None:
                return self._prepare(a, busy)
            if not self.share.may_train(busy):
                return False
            if not busy and a.run.outside_busy:  # its files being written: wait, a little at a time
                a.run.wait_outside(OUTSIDE_POLL_S)
                return True
            t0 = time.perf_counter()
            self._slice(a, self.share.budget(busy), whole=self.share.whole(busy))
            self.share.trained(busy, time.perf_counter() - t0)
            return True
        except Exception as e:  # noqa: BLE001 - a failed job fails alone; the server serves on
            log.exception("fine-tuning job %s failed", a.job_id)
            self._fail(a, "training_failed", f"{type(e).__name__}: {e}")
            return True

    def _pick(self) -> bool:
        self.kick.clear()
        pending = self.state.pending_jobs()
        if not pending:
            return False
        job = pending[0]
        a = Active(job["id"], job["spec"]["adapter_id"], TrainConfig.from_dict(job["spec"]["train_config"]))
        cfg = a.cfg
        with self._lock:
            if self.state.job(a.job_id)["status"] in FINAL:  # cancelled since the query
                self.kick.set()
                return True
            self.active = a
            self.state.update_job(a.job_id, ("Validating training file: " + job["training_file"], "info",
                                             "message", None), status="validating_files")
        self.count_jobs()
        a.prep = PiecewiseCall()
        return True

    def _prepare(self, a: Active, busy: bool) -> bool:
        """A slice of the job's tokenizing (the `validating_files` phase), on the engine thread
        under the time share as a training slice is: a row at a time, the shared tokenizer's
        lock held for one row. (On a helper thread it held that lock for the whole file, 40-60 ms
        on the facts data, and contended for the GIL with every step: the decode steps beside
        it took 3-5x their time.)
        Once done, the job's run is made; its setup is its next slices (`_slice`)."""
        if not self.share.may_train(busy):
            return False
        t0 = time.perf_counter()
        try:
            done, examples = a.prep.run(functools.partial(self._tokenize, a.cfg, a.prep),
                                        self.share.budget(busy))
        except ValueError as e:  # trainer.data.DataError: names the file's line
            self._fail(a, "invalid_training_file", _file_message(str(e), a.cfg))
            return True
        finally:
            self.share.trained(busy, time.perf_counter() - t0)
        if done:
            a.prep.close()
            a.prep = None
            checkpoint = latest_checkpoint(a.cfg.output)
            cfg = replace(a.cfg, resume=str(checkpoint)) if checkpoint else a.cfg
            a.run = ResidentRun(cfg, self.base, examples)
        return True

    def _tokenize(self, cfg: TrainConfig, call: PiecewiseCall) -> tuple[list, list]:  # in pieces
        @contextlib.contextmanager
        def each_row():
            call.pause_point("a row")  # never with the lock held: serving takes it between pieces
            with self.tok_lock:  # the Core's: the shared Rust tokenizer is not re-entrant
                yield

        return read_examples(cfg, self.base, each_row)

    def _started(self, a: Active) -> None:
        run = a.run
        message = (f"Fine-tuning job resumed from its checkpoint at step {run.step} of {run.total_steps}"
                   if run.cfg.resume else f"Fine-tuning job started: {run.total_steps} steps over "
                                          f"{len(run.trainer.train_examples)} examples")
        with self._lock:
            if not a.cancelled.is_set():
                self.state.update_job(a.job_id, (message, "info", "message", None), status="running",
                                      started_at=int(time.time()))
        self.count_jobs()

    def _slice(self, a: Active, budget_s: float, whole: bool = False) -> None:
        """One piece of the job's work in flight (whole: an idle engine's, whole on the engine
        thread where nothing is in flight): its setup, an optimizer step, or its finish."""
        run = a.run
        if not run.ready:
            if run.setup(budget_s, whole):
                self._started(a)
        elif not a.finishing and not run.done:
            self._step(a, budget_s, whole)
        else:
            tmp = self.adapter_root / f".ft-{a.job_id}.tmp"
            if not a.finishing:
                shutil.rmtree(tmp, ignore_errors=True)
                a.finishing = True
            if run.finish(tmp, budget_s, whole) is not None:
                self._complete(a, tmp)

    def _step(self, a: Active, budget_s: float, whole: bool) -> None:
        """A piece of the optimizer step in flight; a finished step is recorded."""
        out = a.run.advance(budget_s, whole)
        if out is None:
            return
        loss, tokens = out
        seconds = a.run.last_step_s  # its pieces' time, not the serving steps between them
        if self.metrics is not None:
            self.metrics.training_step(seconds, tokens)
        run = a.run
        data = {"step": run.step, "total_steps": run.total_steps, "train_loss": round(loss, 6),
                "tokens": tokens, "seconds": round(seconds, 4)}
        self.state.update_job(a.job_id, (f"Step {run.step}/{run.total_steps}: training loss={loss:.4f}",
                                         "info", "metrics", data),
                              trained_tokens=run.trainer.summary.tokens)
        if run.cfg.save_every and run.step % run.cfg.save_every == 0:
            path = Path(run.cfg.output) / "checkpoints" / f"step-{run.step:06d}"
            self.state.add_checkpoint(a.job_id, run.step, {"step": run.step, "train_loss": loss},
                                      str(path), f"Checkpoint saved at step {run.step}")

    def _complete(self, a: Active, tmp: Path) -> None:
        """The exported adapter under its final name in the store; then registered, published
        and recorded on the helper thread (`_publish`), the engine serving on meanwhile."""
        final = self.adapter_root / a.fine_tuned_model
        with self._lock:
            if a.cancelled.is_set():
                shutil.rmtree(tmp, ignore_errors=True)
                self._drop(a)
                return
            final.parent.mkdir(parents=True, exist_ok=True)
            if final.exists():  # a restart redid the last steps: same adapter, written again
                shutil.rmtree(final)
            os.replace(tmp, final)
            a.publishing = self._publisher.submit(self._publish, a, final)  # cancel() waits for it now

    def _publish(self, a: Active, final: Path) -> None:  # helper thread
        try:
            self.publish(a.fine_tuned_model, final)
        except Exception as e:  # noqa: BLE001 - the job fails alone; the server serves on
            log.exception("fine-tuning job %s: its adapter could not be published", a.job_id)
            with self._lock:
                self._record_failure(a, "training_failed", f"{type(e).__name__}: {e}")
        else:
            summary = a.run.trainer.summary
            with self._lock:
                self.state.update_job(
                    a.job_id, ("The job has successfully completed", "info", "message",
                               {"fine_tuned_model": a.fine_tuned_model}),
                    status="succeeded", fine_tuned_model=a.fine_tuned_model, trained_tokens=summary.tokens,
                    finished_at=int(time.time()))
        finally:
            a.published.set()

    # ---- endings ----------------------------------------------------------------------------
    def cancel(self, job_id: str) -> str | None:
        """Any thread: mark the job cancelled (and let the engine thread free what it holds at
        its next call); returns the status it had if that was final already (nothing done)."""
        with self._lock:
            status = self.state.job(job_id)["status"]
            if status in FINAL:
                return status
            a = self.active
            publishing = a is not None and a.job_id == job_id and a.publishing is not None
            if not publishing:
                self.state.update_job(job_id, ("Fine-tuning job cancelled", "info", "message", None),
                                      status="cancelled", finished_at=int(time.time()))
                if a is not None and a.job_id == job_id:
                    a.cancelled.set()
        if publishing:  # too late to cancel: the job ends as its publishing does
            a.published.wait(PUBLISH_TIMEOUT_S + 5)
            return self.state.job(job_id)["status"]
        self.count_jobs()
        return None

    def _drop(self, a: Active) -> None:
        """A cancelled job: everything it held is let go (its state row says cancelled already)."""
        self._close(a)

    def _fail(self, a: Active, code: str, message: str) -> None:
        with self._lock:
            self._record_failure(a, code, message)
            self._close(a)

    def _record_failure(self, a: Active, code: str, message: str) -> None:  # under _lock
        if not a.cancelled.is_set():
            self.state.update_job(a.job_id, (f"Fine-tuning job failed: {message}", "error", "message", None),
                                  status="failed", error={"code": code, "message": message, "param": None},
                                  finished_at=int(time.time()))

    def _close(self, a: Active) -> None:
        if a.run is not None:
            a.run.close()
            a.run = None
        if a.prep is not None:
            a.prep.close()  # abandoned mid-file: unwound
            a.prep = None
        self.active = None
        self._collect = True
        self.kick.set()  # the next job, if any
        self.count_jobs()

    def count_jobs(self) -> None:
        if self.metrics is not None:
            self.metrics.training_jobs(self.state.job_counts())

    @property
    def adapter_root(self) -> Path:
        return self.publish.root  # the Publisher's (service.py)

    def shutdown(self) -> None:
        self._publisher.shutdown(wait=False, cancel_futures=True)


def _file_message(message: str, cfg: TrainConfig) -> str:
    """A data error as the client knows the file: its stored path becomes 'training file'."""
    for path, name in ((cfg.data, "training file"), (cfg.eval_data, "validation file")):
        if path:
            message = message.replace(path, name)
    return message
