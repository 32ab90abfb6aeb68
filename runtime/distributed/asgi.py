"""One HTTP exchange with an ASGI app, in-process, as a stream of parts: the head, then body chunks.

    call = HttpCall("POST", "/v1/completions", b"", [("content-type", "application/json")], body)
    async for part in exchange(app, call):   # first a Head, then bytes (SSE events one by one)

Why: a Ray replica serves the OpenAI routes of runtime/server/http without a socket of its own.
The ingress forwards the request as an HttpCall (plain data, cheap to send between processes)
and streams the parts back, so the routes, their errors, auth and SSE framing exist once. When
the consumer stops early (the client went away, the ingress was cancelled), the app is told
`http.disconnect`, which cancels its engine requests as on a real socket (http/bridge.py).
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field


@dataclass(frozen=True)
class HttpCall:
    method: str
    path: str
    query: bytes
    headers: list[tuple[str, str]]
    body: bytes = b""

    def scope(self) -> dict:
        return {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
                "method": self.method, "scheme": "http", "path": self.path,
                "raw_path": self.path.encode("latin-1"), "query_string": self.query, "root_path": "",
                "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in self.headers],
                "client": ("127.0.0.1", 0), "server": ("quiver-replica", 0)}


@dataclass
class Head:
    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name), None)


async def exchange(app, call: HttpCall) -> AsyncIterator[Head | bytes]:
    """Run `app` on `call`; yield its Head, then each non-empty body chunk, until the body ends."""
    sent: asyncio.Queue = asyncio.Queue()
    gone = asyncio.Event()
    delivered = False

    async def receive() -> dict:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": call.body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    task = asyncio.ensure_future(app(call.scope(), receive, sent.put))
    try:
        while True:
            message = await _next(sent, task)
            if message is None:
                return
            if message["type"] == "http.response.start":
                yield Head(message["status"], [(k.decode("latin-1"), v.decode("latin-1"))
                                               for k, v in message.get("headers", ())])
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield message["body"]
                if not message.get("more_body", False):
                    return
    finally:
        gone.set()  # the app sees the client leave (a no-op once the response is complete)
        try:
            await asyncio.wait_for(asyncio.shield(task), 5.0)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            task.cancel()
        except Exception:  # noqa: BLE001 - the app's own failure was answered (or is moot) by now
            pass


async def _next(sent: asyncio.Queue, task: asyncio.Future) -> dict | None:
    """The app's next message; None when it returned without sending one; its exception if it
    failed before finishing the response."""
    getter = asyncio.ensure_future(sent.get())
    done, _ = await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
    if getter in done:
        return getter.result()
    getter.cancel()
    if not sent.empty():
        return sent.get_nowait()
    task.result()  # raises the app's exception
    return None
