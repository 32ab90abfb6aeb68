"""Driving the engine on its own thread, and handing each request's outputs to its caller.

    gRPC thread:  stream = loop.submit(req)  ->  for out in stream: ...   (or stream.cancel())
    step thread:  while running: engine.step()  ->  req.on_output(out)  ->  stream buffer

`quiver serve` steps the engine on the process's main thread (`run`), and the gRPC / HTTP
threads only convert messages. `start` steps on a thread of its own (tests, embedding, a Ray
replica). Then the thread that loaded the model must not keep an OpenMP team beside the
engine's: with two teams libgomp throttles both (runtime/nn/kernels.py). Measured (embedded
model, 2 cores, batch 1): a step on the engine's own thread 14.7-15.0 ms with the model loaded
on the caller's thread, 4.2-5.5 ms with it loaded on a passing one (`kernels.on_passing_thread`,
as a Ray replica does).

Background work (`background`, optional): a callback(busy, step_s) -> bool run on the step
thread after every step (busy=True, step_s = that step's wall time) and whenever the engine is
idle (busy=False; True back = it did something, call again at once instead of sleeping). The
fine-tuning scheduler (runtime/training/scheduler.py) runs its training slices there, so they
never overlap an engine step and share the thread's OpenMP team; it decides itself how much of
the time to take. A failing callback is logged and the loop goes on.

`run` first freezes the objects alive then (`gc.freeze`: the loaded model, tokenizer and
modules, ~450k on the embedded model) out of the cyclic collector's reach. A full collection
walks every tracked object and holds the GIL throughout, so each one was a gap in every stream:
measured during a fine-tuning job (whose steps promote enough objects to start one every
~30 s), 262-298 ms each; with the freeze, 9.5-13 ms (and more often, over the fewer objects).
Only `run` (the process's own loop, `quiver serve`) freezes: a test process that starts and
stops servers with `start` would keep every one's objects for good.

The step thread never blocks on a client: each `RequestStream` buffers at most `max_buffered`
Outputs, and beyond that folds new ones into the last (text concatenated, tokens appended), so a
slow reader costs memory proportional to its text, never a stalled batch.
"""
from __future__ import annotations

import gc
import logging
import threading
import time
from collections import deque

import torch

from runtime.engine.engine import Engine, StepStats
from runtime.engine.request import GenerationRequest, Output
from runtime.nn.kernels import bind_threads

log = logging.getLogger(__name__)


class ShuttingDown(RuntimeError):
    """The loop no longer accepts requests (draining for shutdown)."""


class RequestStream:
    """The consumer side of one request: iterate for Outputs; the last has finished=True."""

    def __init__(self, loop: "EngineLoop", request_id: str, max_buffered: int = 64):
        self._loop, self.request_id = loop, request_id
        self._buf: deque[Output] = deque()
        self._cond = threading.Condition()
        self._max = max_buffered
        self.finished = False

    def push(self, out: Output) -> None:  # engine thread
        with self._cond:
            if len(self._buf) >= self._max:
                last = self._buf[-1]
                last.text += out.text
                last.tokens.extend(out.tokens)
                last.generated_token_count = out.generated_token_count
                last.finished, last.stop_reason, last.error = out.finished, out.stop_reason, out.error
                last.first_token_time_s = last.first_token_time_s or out.first_token_time_s
            else:
                self._buf.append(out)
            self._cond.notify_all()

    def get(self, timeout: float | None = None) -> Output | None:
        """The next Output, or None on timeout."""
        with self._cond:
            if not self._buf and not self._cond.wait_for(lambda: bool(self._buf), timeout):
                return None
            out = self._buf.popleft()
            self.finished = self.finished or out.finished
            return out

    def __iter__(self):
        while not self.finished:
            out = self.get(timeout=1.0)
            if out is not None:
                yield out

    def cancel(self) -> None:
        if not self.finished:
            self._loop.engine.cancel(self.request_id)


class EngineLoop:
    def __init__(self, engine: Engine, on_step=None, idle_wait_s: float = 0.05, bind_threads: bool = False):
        """bind_threads: pin the step thread's OpenMP team one thread per CPU when it starts
        stepping (runtime/nn/kernels.py::bind_threads; `quiver serve --bind-threads`)."""
        self.engine = engine
        self.pin_threads = bind_threads  # (not `bind_threads`: that name is the function)
        self.bound_cpus: list[int] | None = None  # where the team was pinned, if it was
        self.on_step = on_step  # callback(StepStats) after every non-empty step (metrics)
        self.background = None  # callback(busy, step_s) -> did work (module docstring)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._idle = threading.Event()  # clear while `_run` steps, on whichever thread
        self._idle.set()
        self._idle_wait = idle_wait_s
        self.accepting = True

    def start(self) -> None:
        """Step the engine on a new thread (tests, embedding; `quiver serve` calls `run`)."""
        self._idle.clear()  # stepping from now: a stop() before the thread runs still waits
        threading.Thread(target=self._run, name="quiver-engine", daemon=True).start()

    def run(self) -> None:
        """Step the engine on the calling thread until `stop` (from another thread), after
        freezing what is loaded (module docstring)."""
        gc.collect()  # what is unreachable now is freed, not frozen
        gc.freeze()
        self._run()

    @property
    def running(self) -> bool:
        """The step loop is alive: started and not ended (by stop() or a crash). A Ray replica's
        health check reads it (runtime/distributed/replica.py)."""
        return not self._idle.is_set()

    def submit(self, req: GenerationRequest, max_buffered: int = 64, observer=None) -> RequestStream:
        """Queue `req`; raises what `Engine.add` raises (nothing queued then) or ShuttingDown.

        observer: optional callback(Output) run on the engine thread before each Output is
        buffered (metrics); it sees every Output even if the consumer stops reading. Must be cheap.
        """
        if not self.accepting:
            raise ShuttingDown("the server is shutting down; retry on another replica")
        stream = RequestStream(self, req.request_id, max_buffered)
        req.on_output = stream.push if observer is None else _tee(observer, stream.push)
        self.engine.add(req)
        self._wake.set()
        return stream

    def drain(self, timeout_s: float) -> bool:
        """Stop intake, wait until in-flight requests finish (True) or the timeout passes."""
        self.accepting = False
        deadline = time.monotonic() + timeout_s
        while self.engine.has_work() and time.monotonic() < deadline:
            time.sleep(0.02)
        return not self.engine.has_work()

    def stop(self) -> None:
        """End the step thread; requests still held then end with an error (drain first)."""
        self.accepting = False
        self._stop.set()
        self._wake.set()
        if not self._idle.wait(timeout=10):  # the step in flight ends, on whichever thread
            log.error("the engine loop did not stop within 10 s")
            return
        if self.engine.has_work():
            self.engine.abort_all("the server stopped before this request finished")

    def _run(self) -> None:
        # OpenMP keeps a thread count per thread: re-apply torch's (--threads) here, so that the
        # kernels this thread calls outside torch (bitsandbytes') use the same count.
        torch.set_num_threads(torch.get_num_threads())
        if self.pin_threads:
            self.bound_cpus = bind_threads()
            log.info("engine threads pinned to CPUs %s", self.bound_cpus if self.bound_cpus else "(not: "
                     "threads other than the CPUs, or no native extension)")
        self._idle.clear()
        try:
            self._steps()
        finally:
            self._idle.set()

    def _steps(self) -> None:
        while not self._stop.is_set():
            if not self.engine.has_work():
                if self._background(False, 0.0):
                    continue
                self._wake.wait(self._idle_wait)
                self._wake.clear()
                continue
            try:
                stats: StepStats = self.engine.step()
            except Exception:  # noqa: BLE001 - a failed step fails its requests, not the server
                log.exception("engine step failed; failing the requests in that batch")
                self.engine.fail_running("internal error in the engine step (see server log)")
                continue
            if self.on_step is not None and stats.rows:
                self.on_step(stats)
            self._background(True, stats.duration_s)

    def _background(self, busy: bool, step_s: float) -> bool:
        if self.background is None:
            return False
        try:
            return bool(self.background(busy, step_s))
        except Exception:  # noqa: BLE001 - background work must not stop serving
            log.exception("background work on the engine thread failed")
            return False


def _tee(first, second):
    def both(out: Output) -> None:
        try:
            first(out)
        except Exception:  # noqa: BLE001 - an observer bug must not lose the request's output
            log.exception("output observer failed")
        second(out)

    return both
