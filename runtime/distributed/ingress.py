"""The ingress of the Ray Serve application: HTTP in, routed to a Quiver replica by adapter.

    POST /v1/chat/completions, /v1/completions    multiplexed_model_id = the body's `model`
    POST /v1/load_lora_adapter                    multiplexed_model_id = `lora_name`; the replica
                                                  loads it and publishes it to the shared store;
                                                  an id already loaded is replaced everywhere
                                                  it is held (replica.py)
    GET  /v1/models                               any replica: the base, then every adapter of
                                                  the shared store
    GET  /health, /metrics, others                any replica (the routes answer as on one server)
    GET  /v1/replicas                             the live replicas and their ports (directory.py)
    /v1/unload_lora_adapter, /v1/files, /v1/fine_tuning/...   501: not in a replicated app

The routes themselves run on the replicas (runtime/server/http through replica.forward): the
ingress reads the adapter id and forwards the request whole, so parsing, auth, errors and SSE
exist once. Serve's model multiplexing sends a request for an adapter to a replica that
reported it loaded, else to one with the fewest loaded, which then loads it lazily.

A replica that dies (or is unreachable) loses only the requests it had: those are answered
503 with Retry-After, a retryable status (the `openai` client retries it by itself), or, once a
stream has started, an error event then [DONE], as a failing stream ends on one server. Serve
stops routing to the dead replica and starts another.

This process imports no torch: it only reads bodies and moves bytes.
"""
from __future__ import annotations

import json
import logging

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from runtime.adapters.store import AdapterPathError, validate_adapter_id
from runtime.distributed.asgi import HttpCall

log = logging.getLogger(__name__)

#: path -> the body field naming the adapter the request is for
ROUTED_BY = {"/v1/chat/completions": "model", "/v1/completions": "model", "/v1/load_lora_adapter": "lora_name"}
NOT_REPLICATED = ("/v1/unload_lora_adapter", "/v1/files", "/v1/fine_tuning")
RETRY_AFTER_S = 1
#: response headers that describe one hop's framing, not the content
HOP_HEADERS = {"content-length", "transfer-encoding", "connection", "keep-alive"}


def error_body(message: str, kind: str, code: str | None = None) -> dict:
    """An OpenAI error object (the replicas' routes make the same shape: http/errors.py)."""
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def replica_lost(error: BaseException) -> JSONResponse:
    log.warning("a replica failed under a request: %s", error)
    return JSONResponse(error_body("the replica serving this request stopped; retry it (another replica "
                                   "serves it)", "service_unavailable_error", "replica_unavailable"),
                        status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)})


def retryable() -> tuple[type[BaseException], ...]:
    """Ray's errors that mean "the replica is gone or unreachable", not "the request was bad"."""
    from ray import exceptions as rex
    from ray.serve import exceptions as sex

    return (rex.RayActorError, rex.WorkerCrashedError, rex.NodeDiedError, rex.ObjectLostError,
            sex.BackPressureError, sex.DeploymentUnavailableError, sex.ReplicaUnavailableError)


def adapter_in(body: bytes, field: str, base_id: str) -> str:
    """The adapter id a request names ("" = the base model, or a body the replica will refuse)."""
    try:
        value = json.loads(body).get(field)
    except (ValueError, AttributeError):
        return ""
    if not isinstance(value, str) or value == base_id:
        return ""
    try:
        validate_adapter_id(value)
    except AdapterPathError:
        return ""
    return value


class QuiverIngress:
    def __init__(self, replicas, app_name: str = "quiver", max_body_bytes: int = 4 * 1024 * 1024,
                 route_by_adapter: bool = True):
        self.replicas = replicas  # DeploymentHandle of QuiverReplica
        self.app_name, self.max_body_bytes = app_name, max_body_bytes
        self.route_by_adapter = route_by_adapter  # False: Serve's plain routing (a baseline)
        self._base_id: str | None = None
        self._retryable = retryable()

    async def __call__(self, request: Request) -> Response:
        path = request.url.path
        if path == "/v1/replicas":
            return JSONResponse({"object": "list", "data": await self._replicas()})
        if path.startswith(NOT_REPLICATED):
            return JSONResponse(error_body(
                f"{path} is not served by the replicated (Ray) application: adapters come from the "
                "shared --adapter-store and each replica evicts by LRU; fine-tune on a `quiver serve` "
                "with the same --adapter-store and every replica serves the result", "invalid_request_error",
                "not_replicated"), status_code=501)
        body = await self._body(request)
        if body is None:
            return JSONResponse(error_body(f"the request body is over {self.max_body_bytes} bytes",
                                           "invalid_request_error", "request_too_large"), status_code=413)
        field = ROUTED_BY.get(path) if request.method == "POST" else None
        adapter_id = adapter_in(body, field, await self._base()) if field else ""
        call = HttpCall(request.method, path, request.url.query.encode("latin-1"),
                        list(request.headers.items()), body)
        return await self._forward(call, adapter_id)

    async def _forward(self, call: HttpCall, adapter_id: str) -> Response:
        if self.route_by_adapter:
            handle = self.replicas.options(method_name="forward", stream=True, multiplexed_model_id=adapter_id)
            parts = handle.remote(call)
        else:
            parts = self.replicas.options(method_name="forward", stream=True).remote(call, adapter_id)
        try:
            head = await parts.__anext__()
            if (head.header("content-type") or "").startswith("text/event-stream"):
                return StreamingResponse(self._rest(parts), status_code=head.status, headers=_headers(head))
            content = b"".join([chunk async for chunk in parts])
        except self._retryable as e:
            parts.cancel()
            return replica_lost(e)
        return Response(content, status_code=head.status, headers=_headers(head))

    async def _rest(self, parts):
        """The stream's remaining chunks; a replica lost mid-stream ends it as a failing stream
        ends on one server: an error event, then [DONE]."""
        try:
            async for chunk in parts:
                yield chunk
        except self._retryable as e:
            log.warning("a replica failed mid-stream: %s", e)
            event = error_body("the replica serving this stream stopped; retry the request",
                               "service_unavailable_error", "replica_unavailable")
            yield b"data: " + json.dumps(event).encode() + b"\n\ndata: [DONE]\n\n"
        finally:
            parts.cancel()  # the client left early: the replica cancels its engine requests

    async def _body(self, request: Request) -> bytes | None:
        """The body, or None past the cap (the replica's own cap, --max-message-bytes, applies too)."""
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            chunks.append(chunk)
        return b"".join(chunks)

    async def _base(self) -> str:
        if self._base_id is None:
            self._base_id = await self.replicas.base_id.remote()
        return self._base_id

    async def _replicas(self) -> list[dict]:
        from runtime.distributed.directory import directory

        return await directory(self.app_name).listing.remote()


def _headers(head) -> dict[str, str]:
    return {k: v for k, v in head.headers if k.lower() not in HOP_HEADERS}
