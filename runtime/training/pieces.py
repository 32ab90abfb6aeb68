"""A call run in pieces of bounded time between engine steps: a coroutine (a greenlet) on the
engine thread.

    engine thread, its greenlet             the call's greenlet (same thread)
    done, value = call.run(fn, budget_s)  --->  fn() ... pause_point(): would the stretch to the
                                          <---      next point end past the deadline? yes:
                                                    hand back
    serving steps
    done, value = call.run(fn, budget_s)  --->      ... fn goes on where it stopped
                                          <---  fn returned: done, its value

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

Why a greenlet, not a thread: the call runs on the engine thread, so its torch ops use the
engine thread's own OpenMP team, the one the serving steps use. A piece thread needed a team of
its own, and two teams oversubscribe the cores (libgomp then stops spinning in both: measured,
2 cores, a job's rate 0.51x and the streams' TPOT 3.8x), so its pieces ran on one thread, twice
as long per stretch, and 1-3% of the decode steps right after a piece took 3-5x their time
(the engine team's threads left on one core: kernels.bind_threads). Measured beside a base
stream (bench.train_bench's setting, 2 cores): a busy slice's wall time, median / p99,
4.2 / 10.1 ms with the piece thread, 2.2 / 4.3 ms here.

The call is the very computation an uninterrupted one is: the same ops in the same order on
the same thread and team, only stretched in time, so a sliced step is bit-identical to a whole
one by construction (tests/training/test_pieces.py checks it), whatever the split and the
budget. Grad mode is per thread: the call runs with it on and every hand-off gives the caller
its own back. torch's RNG is global, so a caller that swaps it around `run` (slices.py) swaps
it for the call too. A switch happens only at a pause point, in Python (a module hook, a grad
hook, the trainer's loop), never inside an op or a parallel region.

One exception to the hand-off: `outside(fn)` runs blocking work that no serving step depends
on (a checkpoint's file writes and fsyncs, ~50-70 ms of mostly waiting on the disk) on a helper
thread: the call hands back at once, and goes on once `fn` is done and it is resumed.

`abandon` ends a call paused mid-way: it is resumed once more, its pause point raises
`Abandoned`, and the call unwinds (a cancelled job: its half-done step is dropped with it).
"""
from __future__ import annotations

import functools
import logging
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any, Callable, Hashable

import greenlet
import torch
from torch import nn

from runtime.nn.kernels import helper_thread

log = logging.getLogger(__name__)


class Abandoned(BaseException):
    """Raised at a pause point when the caller gave the call up (a BaseException: no `except
    Exception` in the call may swallow it)."""


class PiecewiseCall:
    def __init__(self, name: str = "quiver-train-outside"):
        self._glet: greenlet.greenlet | None = None  # the call in flight (None: none)
        self._home: greenlet.greenlet | None = None  # what runs it (the engine thread's greenlet)
        self._home_grad = False  # the caller's grad mode, given back at every hand-back
        self._deadline = 0.0
        self._abandon = False
        self._outside: Future | None = None  # an `outside` fn at work on the helper thread
        # the helper thread for `outside` (kernels.helper_thread)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name, initializer=helper_thread)
        # the call only: how long the stretch after each pause point took last time, and the
        # last point passed (its key, when); a point hands back early if its stretch would end
        # past the deadline (`pause_point`)
        self._stretch: dict[Hashable, float] = {}
        self._last: tuple[Hashable, float] | None = None

    @property
    def in_flight(self) -> bool:
        return self._glet is not None

    @property
    def outside_busy(self) -> bool:
        """The call is running an `outside` fn (a `run` now would wait for it to end)."""
        return self._outside is not None and not self._outside.done()

    def wait_outside(self, timeout_s: float) -> None:
        """Wait for the `outside` fn at work, if any, for at most `timeout_s`."""
        self._wait_outside(timeout_s)

    @property
    def frame(self):
        """The innermost frame of the call while it is paused (None when none is in flight)."""
        return None if self._glet is None else self._glet.gr_frame

    def run(self, fn: Callable[[], Any], budget_s: float) -> tuple[bool, Any]:
        """Start `fn` (or go on with the call in flight, whatever `fn` is) for about `budget_s`,
        on the calling thread; (True, its value) once it returned, else (False, None). What `fn`
        raises is raised here. A call in an `outside` fn is waited for first. Always from the
        same thread (a greenlet runs only on the thread it was made on: the engine's)."""
        if self._glet is None:
            self._glet = greenlet.greenlet(functools.partial(self._body, fn))
            self._last = None
        self._wait_outside()
        self._deadline = time.perf_counter() + budget_s
        return self._enter()

    def pause_point(self, key: Hashable = None) -> None:
        """In the call (a no-op anywhere else): hand back if the piece's time is up, or would be
        before the next pause point: the stretch that followed this point last time (the same
        `key`; default: the caller's code line) is taken to come again, so a piece ends within
        its budget instead of one stretch past it (measured: up to 5 ms past, at a 5 ms budget).
        Where the call resumes it always runs the stretch, so every piece moves it on."""
        if self._glet is None or greenlet.getcurrent() is not self._glet:
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
        self._hand_back()
        self._last = (key, time.perf_counter())

    def outside(self, fn: Callable[[], Any]) -> Any:
        """In the call: run `fn` on the helper thread while the caller goes on (the call hands
        back at once), and go on once it is resumed after `fn` ended (module docstring). `fn`
        must read nothing the engine writes and write nothing it reads (files; the method's
        parameters, which only the call itself writes). Anywhere else: just `fn()`."""
        if self._glet is None or greenlet.getcurrent() is not self._glet:
            return fn()
        if self._abandon:
            raise Abandoned()
        self._last = None  # a stretch across `fn` says nothing of the next one
        self._outside = self._pool.submit(fn)
        self._hand_back()  # resumed by `run` or `abandon`, both of which wait for `fn` first
        done, self._outside = self._outside, None
        return done.result()

    def abandon(self) -> None:
        """Unwind the call in flight, if any (its outcome is dropped)."""
        if self._glet is None:
            return
        self._wait_outside()
        self._abandon = True
        self._deadline = 0.0  # every pause point from here raises (the unwinding ends the call)
        try:
            self._enter()
        except Exception as e:  # noqa: BLE001 - the outcome of an abandoned call is dropped
            log.debug("an abandoned call failed while it unwound: %s", e)
        finally:
            self._abandon, self._outside = False, None

    def close(self) -> None:
        """Abandon the call in flight and end the helper thread."""
        self.abandon()
        self._pool.shutdown(wait=True)

    # ---- the hand-off -------------------------------------------------------------------------
    def _enter(self) -> tuple[bool, Any]:
        """Switch into the call until it hands back or returns. Grad mode is per thread, so
        both sides keep their own: the call runs with grad on, the caller gets its mode back."""
        self._home = greenlet.getcurrent()
        self._home_grad = torch.is_grad_enabled()
        try:
            outcome = self._glet.switch()
        finally:
            torch.set_grad_enabled(self._home_grad)
        if outcome is _PAUSED:
            return False, None
        self._glet = None
        if outcome is None:  # abandoned: unwound
            return False, None
        ok, value = outcome
        if not ok:
            raise value
        return True, value

    def _hand_back(self) -> None:
        """In the call: back to `run`'s caller until the next `run` (or `abandon`) resumes it."""
        grad = torch.is_grad_enabled()
        torch.set_grad_enabled(self._home_grad)
        try:
            self._home.switch(_PAUSED)
        except greenlet.GreenletExit:  # ended from outside (greenlet.throw): unwind, never hand back
            self._abandon = True
            raise
        finally:
            torch.set_grad_enabled(grad)
        if self._abandon:
            raise Abandoned()

    def _body(self, fn: Callable[[], Any]):
        torch.set_grad_enabled(True)
        try:
            return True, fn()
        except (Abandoned, greenlet.GreenletExit):
            return None
        except BaseException as e:  # noqa: BLE001 - handed to the caller, raised there
            return False, e
        finally:
            torch.set_grad_enabled(self._home_grad)  # whoever resumes the thread now

    def _wait_outside(self, timeout_s: float | None = None) -> None:
        if self._outside is not None:
            wait([self._outside], timeout_s)


#: what a call hands back when it pauses (a value its own function never returns)
_PAUSED = object()


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
