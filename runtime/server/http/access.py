"""Who may call which route, and how much they may send.

Tokens: the same rules as the gRPC ports (runtime/server/auth.py `rules_for`): generation
routes (`/v1/chat/completions`, `/v1/completions`, `/v1/models`) want the API token when one is
set (or the admin token); vLLM's adapter routes want the admin token, and are closed on a
non-loopback bind without one. `/health` and `/metrics` stay open, as health and reflection do on
gRPC. `Authorization: Bearer <token>`, compared in constant time by auth.Rule; a refusal is 401
(missing / wrong token) or 403 (closed) and is counted in quiver_auth_refusals_total.

Size: a body above --max-message-bytes is 413, refused from its Content-Length before any of it
is read, or as soon as a chunked body passes the cap.
"""
from __future__ import annotations

from collections.abc import Callable

import grpc
from starlette.requests import Request

from runtime.server import auth
from runtime.server.http.errors import HttpError

STATUS = {grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error", "invalid_api_key"),
          grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error", None)}


def guard(rule: auth.Rule, service: str, on_refused: Callable[[str, str], None] | None = None):
    """A FastAPI dependency enforcing `rule` (service: the metrics label, the gRPC service's
    name, so both ports count under the same two values)."""

    async def check(request: Request) -> None:
        if rule.is_open:
            return
        denial = rule.check([(auth.AUTH_HEADER, request.headers.get(auth.AUTH_HEADER, ""))])
        if denial is None:
            return
        code, message = denial
        if on_refused is not None:
            on_refused(service, code.name)
        status, kind, err_code = STATUS[code]
        raise HttpError(status, kind, message.replace("metadata", "header"), code=err_code)

    return check


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, at most `limit` bytes (HttpError 413 beyond)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large(int(declared), limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(size, limit)
        chunks.append(chunk)
    return b"".join(chunks)


def too_large(size: int, limit: int) -> HttpError:
    return HttpError(413, "invalid_request_error", f"the request body is {size}+ bytes; this server "
                     f"accepts at most {limit} (--max-message-bytes)", code="request_too_large")
