"""Blocking engine Handles -> one asyncio queue, so the event loop never waits on the engine.

    choices = Choices(handles, pool)        one pump thread per handle (from `pool`)
    async for index, out in choices: ...    Outputs of all choices, in arrival order
    choices.cancel()                        the client went away: every request is cancelled

A pump thread iterates its Handle (which blocks on the request's RequestStream) and hands each
Output to the loop with `call_soon_threadsafe`; the engine thread itself never touches asyncio.
Cancelling frees KV and slots at the next engine step (Handle.cancel); the engine then ends the
requests as CANCELLED, which ends the pumps.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import Executor

from runtime.engine.request import Output
from runtime.server.core import Handle


class Choices:
    def __init__(self, handles: Sequence[Handle], pool: Executor):
        self.handles = list(handles)
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()
        for i, h in enumerate(self.handles):
            pool.submit(self._pump, i, h)

    def _pump(self, index: int, handle: Handle) -> None:  # a pool thread
        try:
            for out in handle:
                self._put((index, out))
        except Exception as e:  # noqa: BLE001 - RequestFailed and the like reach the route
            self._put((index, e))

    def _put(self, item) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: the server stopped under this request
            self.cancel()

    async def __aiter__(self) -> AsyncIterator[tuple[int, Output]]:
        left = len(self.handles)
        while left:
            index, item = await self._queue.get()
            if isinstance(item, BaseException):
                self.cancel()
                raise item
            left -= item.finished
            yield index, item

    def cancel(self) -> None:
        for h in self.handles:
            h.cancel()


async def cancel_on_disconnect(receive, choices: Choices) -> None:
    """Wait for the client's http.disconnect (the body is read already) and cancel; the route
    cancels this task once its answer is ready."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            choices.cancel()
            return
