"""Domain exceptions -> gRPC status codes and HTTP statuses, in one table (README "Errors").

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
from runtime.adapters.store import AdapterPathError, AdapterStoreUnavailable
from runtime.adapters.types import AdapterFormatError
from runtime.engine.engine import QueueFull
from runtime.engine.loop import ShuttingDown
from runtime.engine.params import InvalidParams
from runtime.server.core import RequestFailed

log = logging.getLogger(__name__)

#: One table for both front ends: domain exception -> (gRPC status, HTTP status, OpenAI error
#: type). First match wins (order matters only for subclasses). The HTTP side (http/errors.py)
#: reads the same rows, so a domain error means the same thing on either port.
ERROR_TABLE: tuple[tuple[type[BaseException], grpc.StatusCode, int, str], ...] = (
    (AdapterNotFound, grpc.StatusCode.NOT_FOUND, 404, "not_found_error"),
    (InvalidParams, grpc.StatusCode.INVALID_ARGUMENT, 400, "invalid_request_error"),
    (AdapterFormatError, grpc.StatusCode.INVALID_ARGUMENT, 400, "invalid_request_error"),
    (AdapterPathError, grpc.StatusCode.INVALID_ARGUMENT, 400, "invalid_request_error"),
    (QueueFull, grpc.StatusCode.RESOURCE_EXHAUSTED, 429, "rate_limit_error"),
    (AdapterBusy, grpc.StatusCode.FAILED_PRECONDITION, 409, "conflict_error"),
    (ShuttingDown, grpc.StatusCode.UNAVAILABLE, 503, "service_unavailable_error"),
    (TimeoutError, grpc.StatusCode.DEADLINE_EXCEEDED, 504, "timeout_error"),
    (RequestFailed, grpc.StatusCode.INTERNAL, 500, "server_error"),
    (AdapterStoreUnavailable, grpc.StatusCode.UNAVAILABLE, 503, "service_unavailable_error"),
    (OSError, grpc.StatusCode.INTERNAL, 500, "server_error"),  # the server's disk, e.g. an unreadable adapter file
)
STATUS_BY_EXCEPTION: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = tuple(
    (exc, code) for exc, code, _, _ in ERROR_TABLE)
INTERNAL_MESSAGE = "internal error (see the server log)"


def status_for(error: BaseException) -> tuple[grpc.StatusCode, str]:
    for exc_type, code in STATUS_BY_EXCEPTION:
        if isinstance(error, exc_type):
            return code, str(error)
    return grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE


def http_status_for(error: BaseException) -> tuple[int, str, str]:
    """(HTTP status, OpenAI error type, message) from the same table; 500 for a bug."""
    for exc_type, _, status, kind in ERROR_TABLE:
        if isinstance(error, exc_type):
            return status, kind, str(error)
    return 500, "server_error", INTERNAL_MESSAGE


def decorators(status=status_for):
    """(unary, stream) servicer decorators whose failures become statuses by `status` (an
    exception -> (code, message) function; the server's table by default). A status of
    INTERNAL is a bug: logged with its traceback, shown to the client as INTERNAL_MESSAGE."""

    def abort(context: grpc.ServicerContext, error: Exception) -> None:
        code, message = status(error)
        if code is grpc.StatusCode.INTERNAL:
            log.error("request failed: %s", error, exc_info=error)
        context.abort(code, message)  # raises

    def unary(method):
        @functools.wraps(method)
        def wrapper(self, request, context):
            try:
                return method(self, request, context)
            except Exception as e:  # noqa: BLE001 - every failure becomes a status, never a crash
                abort(context, e)

        return wrapper

    def stream(method):
        @functools.wraps(method)
        def wrapper(self, request, context):
            try:
                yield from method(self, request, context)
            except Exception as e:  # noqa: BLE001
                abort(context, e)

        return wrapper

    return unary, stream


#: decorate a unary / server-streaming servicer method: domain exceptions become statuses
unary, stream = decorators()
