"""Domain exceptions -> gRPC status codes, in one table (README "Errors").

Servicer methods raise domain exceptions; the `unary` / `stream` decorators turn them into a
status with the exception's own message, written to be acted on ("max_new_tokens: must be an
integer in [1, 4096], got 0"). Anything not in the table is a bug: logged with its traceback and
answered INTERNAL without internals, and the server keeps serving.
"""
from __future__ import annotations

import functools
import logging

import grpc

from runtime.adapters.registry import AdapterBusy, AdapterNotFound
from runtime.adapters.store import AdapterPathError
from runtime.adapters.types import AdapterFormatError
from runtime.engine.engine import QueueFull
from runtime.engine.loop import ShuttingDown
from runtime.engine.params import InvalidParams
from runtime.server.core import RequestFailed

log = logging.getLogger(__name__)

#: First match wins (order matters only for subclasses).
STATUS_BY_EXCEPTION: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (AdapterNotFound, grpc.StatusCode.NOT_FOUND),
    (InvalidParams, grpc.StatusCode.INVALID_ARGUMENT),
    (AdapterFormatError, grpc.StatusCode.INVALID_ARGUMENT),
    (AdapterPathError, grpc.StatusCode.INVALID_ARGUMENT),
    (QueueFull, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (AdapterBusy, grpc.StatusCode.FAILED_PRECONDITION),
    (ShuttingDown, grpc.StatusCode.UNAVAILABLE),
    (TimeoutError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (RequestFailed, grpc.StatusCode.INTERNAL),
    (OSError, grpc.StatusCode.INTERNAL),  # the server's disk, e.g. an unreadable adapter file
)


def status_for(error: BaseException) -> tuple[grpc.StatusCode, str]:
    for exc_type, code in STATUS_BY_EXCEPTION:
        if isinstance(error, exc_type):
            return code, str(error)
    return grpc.StatusCode.INTERNAL, "internal error (see the server log)"


def _abort(context: grpc.ServicerContext, error: Exception) -> None:
    code, message = status_for(error)
    if code is grpc.StatusCode.INTERNAL:
        log.error("request failed: %s", error, exc_info=error)
    context.abort(code, message)  # raises


def unary(method):
    """Decorate a unary servicer method: domain exceptions become statuses."""

    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            return method(self, request, context)
        except Exception as e:  # noqa: BLE001 - every failure becomes a status, never a crash
            _abort(context, e)

    return wrapper


def stream(method):
    """Decorate a server-streaming servicer method (a generator) the same way."""

    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            yield from method(self, request, context)
        except Exception as e:  # noqa: BLE001
            _abort(context, e)

    return wrapper
