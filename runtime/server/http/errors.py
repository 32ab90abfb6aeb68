"""OpenAI error objects: `{"error": {"message", "type", "param", "code"}}` with an HTTP status.

Domain exceptions map through the same table as gRPC statuses (runtime/server/errors.py
ERROR_TABLE), so a bad parameter is 400 here where it is INVALID_ARGUMENT there, an unknown
adapter 404 / NOT_FOUND, a full queue 429 / RESOURCE_EXHAUSTED, a draining server 503 /
UNAVAILABLE. `param` names the OpenAI field the client sent (max_tokens, not max_new_tokens).
Anything outside the table is a bug: logged with its traceback, answered 500 without internals.
"""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from runtime.adapters.registry import AdapterNotFound
from runtime.engine.params import InvalidParams
from runtime.server.errors import ERROR_TABLE, http_status_for
from runtime.server.http.convert import PARAM_NAMES

log = logging.getLogger(__name__)


class HttpError(Exception):
    """An error decided at the HTTP edge (auth, body size, a vLLM-route rule)."""

    def __init__(self, status: int, kind: str, message: str, param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.kind, self.message, self.param, self.code = status, kind, message, param, code


def body(kind: str, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def from_exception(error: BaseException) -> tuple[int, dict]:
    """(status, OpenAI error body) for any exception a route lets out."""
    if isinstance(error, HttpError):
        return error.status, body(error.kind, error.message, error.param, error.code)
    status, kind, message = http_status_for(error)
    if status == 500:
        log.error("HTTP request failed: %s", error, exc_info=error)
    param = code = None
    if isinstance(error, InvalidParams):
        field = error.field.split("[", 1)[0]
        param = PARAM_NAMES.get(field, error.field)
    elif isinstance(error, AdapterNotFound):
        param, code = "model", "model_not_found"
    return status, body(kind, message, param, code)


def response(error: BaseException) -> JSONResponse:
    status, content = from_exception(error)
    return JSONResponse(content, status_code=status)


def install(app: FastAPI) -> None:
    """Every failure, routing ones included (404 path, 405 method), as an OpenAI error."""

    @app.exception_handler(StarletteHTTPException)
    async def http_exception(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(body("invalid_request_error", str(exc.detail)), status_code=exc.status_code)

    async def domain_exception(request: Request, exc: Exception) -> JSONResponse:
        return response(exc)

    # Per class, so the answer comes from the exception middleware (nothing re-raised, no
    # traceback in the log for a client's mistake); `Exception` last, for bugs.
    for exc_type in (HttpError, *(row[0] for row in ERROR_TABLE), Exception):
        app.add_exception_handler(exc_type, domain_exception)
