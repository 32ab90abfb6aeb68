"""A call run in pieces of bounded time between engine steps: a coroutine on a helper thread.

    engine thread                               piece thread
    done, value = call.run(fn, budget_s)  --->  fn() ... pause_point(): would the stretch to the
                 (waits)                  <---      next point end past the deadline? yes:
                                                    hand back, wait to be resumed
    serving steps
    done, value = call.run(fn, budget_s)  --->      ... fn goes on where it stopped
                 (waits)                  <---  fn returned: done, its value

One optimizer step of a job on the embedded model takes ~0.5 s, a decode step ~5 ms: run
whole, a step is a gap of ~100 tokens' time in every stream beside it. Here the step pauses at
the pause points it passes once its piece's time is up, and the engine steps in between: every
decoder projection, both ways (`PausePoints`), and the trainer's own between the rest of a step
(trainer/loop.py: the loss a vocabulary slice at a time, clipping and the optimizer a chunk of
parameters at a time, a checkpoint's state file a record at a time, the autograd graph's
release). Measured on the embedded model (one core, batch 4, a checkpoint every 3 steps): the
longest stretch between two pause points 4.5 ms (a projection's forward or backward at the
batch's ~180 tokens), 99.9% within 2.9 ms; before, 49 ms (the loss over the vocabulary) and
25 ms (clipping and the optimizer), and 130-210 ms for a checkpoint. A point hands back early
when the stretch after it took longer than the time left the last time it was passed, so a
piece ends within its budget rather than up to one stretch past it.

Exactly one of the two threads runs at any moment (a strict hand-off through two semaphores),
so the call is the very computation an uninterrupted one is, the same ops in the same order on
one thread, only stretched in time: a sliced step is bit-identical to a whole one by
construction (tests/training/test_pieces.py checks it), whatever the split and the budget.
The piece thread keeps torch's thread count of the engine thread and has grad mode on (both
are per thread); torch's RNG is global, so a caller that swaps it around `run` (slices.py)
swaps it for the piece too.

One exception to the hand-off: `outside(fn)` runs blocking work that no serving step depends
on (a checkpoint's file writes and fsyncs, ~50-70 ms of mostly waiting on the disk) with the
engine let go: the piece hands back first, and goes on once both `fn` is done and it is resumed.

`abandon` ends a call paused mid-way: its next pause point raises `Abandoned` on the piece
thread, which unwinds it (a cancelled job: its half-done step is dropped with it).
"""
from __future__ import annotations

import functools
import sys
import threading
import time
from typing import Any, Callable, Hashable

import torch
from torch import nn

from runtime.nn.kernels import floating


class Abandoned(BaseException):
    """Raised at a pause point when the caller gave the call up (a BaseException: no `except
    Exception` in the call may swallow it)."""


class PiecewiseCall:
    def __init__(self, threads: int, name: str = "quiver-train-piece"):
        self._threads = threads
        self._resume = threading.Semaphore(0)  # engine -> piece thread: go on
        self._handback = threading.Semaphore(0)  # piece thread -> engine: paused or done
        self._deadline = 0.0
        self._fn: Callable[[], Any] | None = None  # the call in flight (None: none)
        self._outcome: tuple[bool, Any] | None = None  # (ok, value or exception)
        self._abandon = self._closing = False
        self._outside = False  # the piece thread is in an `outside` fn (set before it hands back)
        # piece thread only: how long the stretch after each pause point took last time, and
        # the last point passed (its key, when); a point hands back early if its stretch would
        # end past the deadline (`pause_point`)
        self._stretch: dict[Hashable, float] = {}
        self._last: tuple[Hashable, float] | None = None
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    @property
    def in_flight(self) -> bool:
        return self._fn is not None

    @property
    def outside_busy(self) -> bool:
        """The call is running an `outside` fn (a `run` now would wait for it to end)."""
        return self._outside

    def run(self, fn: Callable[[], Any], budget_s: float) -> tuple[bool, Any]:
        """Engine thread: start `fn` (or go on with the call in flight, whatever `fn` is) for
        about `budget_s`; (True, its value) once it returned, else (False, None). What `fn`
        raises is raised here."""
        if self._fn is None:
            self._fn = fn
        self._deadline = time.perf_counter() + budget_s
        self._resume.release()
        self._handback.acquire()
        if self._fn is not None:
            return False, None
        ok, value = self._outcome
        self._outcome = None
        if not ok:
            raise value
        return True, value

    def pause_point(self, key: Hashable = None) -> None:
        """Piece thread (a no-op on any other): hand back if the piece's time is up, or would be
        before the next pause point: the stretch that followed this point last time (the same
        `key`; default: the caller's code line) is taken to come again, so a piece ends within
        its budget instead of one stretch past it (measured: up to 5 ms past, at a 5 ms budget).
        Where the call resumes it always runs the stretch, so every piece moves it on."""
        if threading.current_thread() is not self._thread:
            return
        now = time.perf_counter()
        if key is None:
            caller = sys._getframe(1)
            key = (caller.f_code, caller.f_lineno)
        if self._last is not None:
            self._stretch[self._last[0]] = now - self._last[1]
        if now + self._stretch.get(key, 0.0) < self._deadline:
            self._last = (key, now)
            return
        self._last = None
        if self._abandon:  # unwinding an abandoned call (a `finally` that writes): no hand-back
            raise Abandoned()
        self._handback.release()
        self._resume.acquire()
        if self._abandon:
            raise Abandoned()
        self._last = (key, time.perf_counter())

    def outside(self, fn: Callable[[], Any]) -> Any:
        """Piece thread: hand back, run `fn` while the engine thread goes on, then wait to be
        resumed (module docstring). `fn` must read nothing the engine writes and write nothing it
        reads (files; the method's parameters, which only the call itself writes). Any other
        thread: just `fn()`."""
        if threading.current_thread() is not self._thread:
            return fn()
        if self._abandon:
            raise Abandoned()
        self._last = None  # a stretch across `fn` says nothing of the next one
        self._outside = True
        self._handback.release()
        try:
            with floating():  # beside the engine's pinned threads, not on their CPU (kernels.bind_threads)
                return fn()
        finally:
            self._outside = False
            self._resume.acquire()
            if self._abandon:
                raise Abandoned()

    def abandon(self) -> None:
        """Engine thread: unwind the call in flight, if any (its outcome is dropped)."""
        if self._fn is None:
            return
        self._abandon = True
        self._deadline = 0.0  # every pause point from here raises (the unwinding hands back once, at its end)
        self._resume.release()
        self._handback.acquire()
        self._abandon = False
        self._outcome = None

    def close(self) -> None:
        """Abandon the call in flight and end the piece thread."""
        self.abandon()
        self._closing = True
        self._resume.release()
        self._thread.join(timeout=10)

    def _serve(self) -> None:  # piece thread
        torch.set_num_threads(self._threads)
        torch.set_grad_enabled(True)
        while True:
            self._resume.acquire()
            if self._closing:
                return
            self._last = None
            try:
                self._outcome = (True, self._fn())
            except Abandoned:
                self._outcome = None
            except BaseException as e:  # noqa: BLE001 - handed to the engine thread, raised there
                self._outcome = (False, e)
            self._fn = None
            self._handback.release()


class PausePoints:
    """Pause points in every forward and backward through a model's decoder projections.

    Forward: after each projection (a module forward hook). Backward: before each projection's
    backward (a hook on its output, run once the output's gradient is complete) and once the
    gradient of its input is complete (a hook on the input: after the backward of every
    projection that reads it). So no stretch of backward holds more than one projection's
    backward: gate and up, which read the same input, pause between them (measured, embedded
    model, one core: the longest backward stretch 8.9 ms with input hooks alone, 4.9 ms with
    both). ~4-7 per decoder layer forward, twice that backward. Each point has its own key
    (module, which), for the call's prediction of the stretch after it. `installed` returns the
    hooks; slices.py keeps them for a step's pieces (a serving step between them takes the C++
    decode path, which calls no module; where one runs the modules, each hook is a thread check).
    """

    def __init__(self, modules: list[nn.Module], pause: Callable[[Hashable], None]):
        self._modules, self._pause = modules, pause

    def _after(self, module: nn.Module, args: tuple, out) -> None:
        self._pause((module, "forward"))
        x = args[0] if args else None
        for t, which in ((x, "input grad"), (out, "output grad")):
            if isinstance(t, torch.Tensor) and t.requires_grad:
                t.register_hook(functools.partial(self._at_grad, (module, which)))

    def _at_grad(self, key: Hashable, grad: torch.Tensor) -> None:
        self._pause(key)

    def installed(self) -> "_Installed":
        """The hooks, until `.remove()` (or the end of a `with` block)."""
        return _Installed([m.register_forward_hook(self._after) for m in self._modules])


class _Installed:
    def __init__(self, handles):
        self._handles = handles

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
