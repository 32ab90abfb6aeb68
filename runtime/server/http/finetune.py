"""OpenAI's Files and Fine-tuning routes over the TrainingService (runtime/training/service.py).

    POST   /v1/files                              multipart: file (JSONL), purpose=fine-tune
    GET    /v1/files                              newest first; after, limit
    GET    /v1/files/{file_id}
    GET    /v1/files/{file_id}/content            the JSONL as uploaded
    DELETE /v1/files/{file_id}
    POST   /v1/fine_tuning/jobs                   JSON: model, training_file, method, ... (jobs.py)
    GET    /v1/fine_tuning/jobs                   newest first; after, limit
    GET    /v1/fine_tuning/jobs/{job_id}
    GET    /v1/fine_tuning/jobs/{job_id}/events       newest first; after, limit
    GET    /v1/fine_tuning/jobs/{job_id}/checkpoints  newest first; after, limit
    POST   /v1/fine_tuning/jobs/{job_id}/cancel

Every route wants the admin token (training is expensive, and a job's result changes what
every client can be served), by the same rule as vLLM's adapter routes. Absent when the server
has no --data-dir: then these paths are 404 like any unknown path.

Errors as the rest of the HTTP API answers them (OpenAI error objects): a bad row 400 naming its
line (`param: "file"`), a file past the caps 413, an unknown file or job 404, an unknown base
`model` 404 `model_not_found`, cancelling an ended job 409. The upload's body is capped while it
arrives (--max-file-bytes plus room for the multipart envelope).
"""
from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from starlette.formparsers import MultiPartException, MultiPartParser

from runtime.engine.params import InvalidParams
from runtime.server import auth
from runtime.server.http.access import guard, read_body, too_large
from runtime.server.http.errors import HttpError
from runtime.server.http.schemas import json_object
from runtime.training.files import FileRejected, FileTooLarge, file_object
from runtime.training.service import Conflict, NotFound, UnknownModel

TRAINING_SERVICE = "quiver.v1.Training"
#: bytes a multipart envelope may add around the file (boundaries, part headers, `purpose`)
ENVELOPE_BYTES = 64 * 1024
UPLOAD_CHUNK = 256 * 1024


def build_router(ctx) -> APIRouter:
    """The routes on `ctx.core.training` (an empty router when fine-tuning is off)."""
    r = APIRouter()
    service = ctx.core.training
    if service is None:
        return r
    cfg = ctx.core.cfg
    rule = auth.rules_for(cfg.host, cfg.admin_token, cfg.api_token)[auth.ADAPTERS_SERVICE]
    admin = Depends(guard(rule, TRAINING_SERVICE, ctx.core.metrics.auth_refused))

    async def call(fn, *args):
        try:
            return await ctx.run(fn, *args)
        except Exception as e:  # noqa: BLE001 - the training domain's errors, as HTTP ones
            raise http_error(e) from e

    @r.post("/v1/files", dependencies=[admin])
    async def upload(request: Request):
        limit = service.limits.files.max_bytes + ENVELOPE_BYTES
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise too_large(int(declared), limit)
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise HttpError(400, "invalid_request_error", "send the file as multipart/form-data with "
                            "fields `file` and `purpose`", param="file")
        try:
            form = await MultiPartParser(request.headers, _capped(request, limit), max_files=1,
                                         max_fields=4).parse()
        except MultiPartException as e:
            raise HttpError(400, "invalid_request_error", f"the multipart body is malformed: {e.message}",
                            param="file") from None
        try:
            upload, purpose = form.get("file"), form.get("purpose")
            if upload is None or isinstance(upload, str):
                raise HttpError(400, "invalid_request_error", "the `file` field (a JSONL file) is missing",
                                param="file")
            try:
                record = await service.upload_file(upload.filename or "", purpose or "", _chunks(upload))
            except Exception as e:  # noqa: BLE001
                raise http_error(e) from e
        finally:
            await form.close()
        return file_object(record)

    @r.get("/v1/files", dependencies=[admin])
    async def list_files(request: Request):
        q = request.query_params
        rows, more = await call(service.list_files, q.get("after"), _int(q, "limit", 100))
        return _page([file_object(f) for f in rows], more)

    @r.get("/v1/files/{file_id}", dependencies=[admin])
    async def get_file(file_id: str):
        return file_object(await call(service.get_file, file_id))

    @r.get("/v1/files/{file_id}/content", dependencies=[admin])
    async def file_content(file_id: str):
        record = await call(service.get_file, file_id)
        data = await ctx.run(_read, record["path"])
        return Response(data, media_type="application/jsonl")

    @r.delete("/v1/files/{file_id}", dependencies=[admin])
    async def delete_file(file_id: str):
        await call(service.delete_file, file_id)
        return {"id": file_id, "object": "file", "deleted": True}

    @r.post("/v1/fine_tuning/jobs", dependencies=[admin])
    async def create_job(request: Request):
        body = json_object(await read_body(request, ctx.max_body_bytes))
        return await call(service.create_job, body)

    @r.get("/v1/fine_tuning/jobs", dependencies=[admin])
    async def list_jobs(request: Request):
        q = request.query_params
        return _page(*await call(service.list_jobs, q.get("after"), _int(q, "limit", 20)))

    @r.get("/v1/fine_tuning/jobs/{job_id}", dependencies=[admin])
    async def get_job(job_id: str):
        return await call(service.get_job, job_id)

    @r.get("/v1/fine_tuning/jobs/{job_id}/events", dependencies=[admin])
    async def list_events(job_id: str, request: Request):
        q = request.query_params
        return _page(*await call(service.list_events, job_id, q.get("after"), _int(q, "limit", 20)))

    @r.get("/v1/fine_tuning/jobs/{job_id}/checkpoints", dependencies=[admin])
    async def list_checkpoints(job_id: str, request: Request):
        q = request.query_params
        return _page(*await call(service.list_checkpoints, job_id, q.get("after"), _int(q, "limit", 10)))

    @r.post("/v1/fine_tuning/jobs/{job_id}/cancel", dependencies=[admin])
    async def cancel_job(job_id: str):
        return await call(service.cancel_job, job_id)

    return r


def http_error(e: BaseException) -> BaseException:
    """The training domain's exceptions as HttpErrors; anything else unchanged (errors.py)."""
    if isinstance(e, UnknownModel):
        return HttpError(404, "invalid_request_error", str(e), param="model", code="model_not_found")
    if isinstance(e, NotFound):
        return HttpError(404, "not_found_error", str(e))
    if isinstance(e, Conflict):
        return HttpError(409, "conflict_error", str(e))
    if isinstance(e, FileTooLarge):
        return HttpError(413, "invalid_request_error", str(e), param="file", code="file_too_large")
    if isinstance(e, FileRejected):
        return HttpError(400, "invalid_request_error", str(e), param="file", code="invalid_file")
    return e


def _page(data: list[dict], has_more: bool) -> dict:
    return {"object": "list", "data": data, "has_more": has_more,
            "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}


def _int(query, name: str, default: int) -> int:
    raw = query.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise InvalidParams(name, f"must be an integer, not {raw!r}") from None


async def _capped(request: Request, limit: int):
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(size, limit)
        yield chunk


async def _chunks(upload):
    while chunk := await upload.read(UPLOAD_CHUNK):
        yield chunk


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()
