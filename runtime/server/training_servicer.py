"""The gRPC `quiver.v1.Training` servicer: pb -> the TrainingService's dicts -> pb. Nothing else.

Errors: the training domain's own (NotFound -> NOT_FOUND, Conflict -> FAILED_PRECONDITION,
a file over the caps -> RESOURCE_EXHAUSTED), then the server's one table (errors.py:
InvalidParams -> INVALID_ARGUMENT, ...). Access: the admin token, checked by the auth
interceptor before this runs (app.py gives Training the Adapters rule).
"""
from __future__ import annotations

import logging
import time

import grpc
from google.protobuf import json_format, struct_pb2

from runtime.server import errors
from runtime.server.stubs import training_pb2 as tpb
from runtime.server.stubs import training_pb2_grpc
from runtime.training.service import Conflict, FileTooLarge, NotFound, TrainingService
from runtime.training.state import FINAL

log = logging.getLogger(__name__)

#: how often WatchJob looks for new events (they are rows in SQLite)
WATCH_POLL_S = 0.25
_DOMAIN = ((NotFound, grpc.StatusCode.NOT_FOUND), (Conflict, grpc.StatusCode.FAILED_PRECONDITION),
           (FileTooLarge, grpc.StatusCode.RESOURCE_EXHAUSTED))


def _status(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The training domain's errors by _DOMAIN, the rest by the server's table."""
    code = next((c for cls, c in _DOMAIN if isinstance(error, cls)), None)
    return errors.status_for(error) if code is None else (code, str(error))


_unary, _stream = errors.decorators(_status)


class TrainingServicer(training_pb2_grpc.TrainingServicer):
    def __init__(self, service: TrainingService):
        self.service = service

    @_unary
    def CreateJob(self, request, context):
        return job_to_pb(self.service.create_job(create_body(request)))

    @_unary
    def GetJob(self, request, context):
        return job_to_pb(self.service.get_job(request.job_id))

    @_unary
    def ListJobs(self, request, context):
        jobs, more = self.service.list_jobs(request.after or None, request.limit or 20)
        return tpb.ListJobsResponse(jobs=[job_to_pb(j) for j in jobs], has_more=more)

    @_unary
    def CancelJob(self, request, context):
        return job_to_pb(self.service.cancel_job(request.job_id))

    @_stream
    def WatchJob(self, request, context):
        after = request.after or None
        while context.is_active():
            ended = self.service.get_job(request.job_id)["status"] in FINAL  # read before the events
            events = self.service.events_since(request.job_id, after)
            for e in events:
                yield event_to_pb(e)
                after = e["id"]
            if ended and not events:
                return
            if not events:
                time.sleep(WATCH_POLL_S)


# ---- conversion ---------------------------------------------------------------------------------
def create_body(r: tpb.CreateJobRequest) -> dict:
    """The request as the HTTP body it mirrors (the service validates both the same way)."""
    hyper = {name: getattr(r.hyperparameters, name)
             for name in ("n_epochs", "batch_size", "learning_rate_multiplier")
             if r.HasField("hyperparameters") and r.hyperparameters.HasField(name)}
    quiver = json_format.MessageToDict(r.options) if r.HasField("options") else {}
    quiver = {k: int(v) if isinstance(v, float) and v.is_integer() and k != "lr" else v for k, v in quiver.items()}
    body = {"model": r.model, "training_file": r.training_file,
            "method": {"type": "supervised", "supervised": {"hyperparameters": hyper}},
            "quiver": {**quiver, **({"method": r.method} if r.method else {})}}
    if r.validation_file:
        body["validation_file"] = r.validation_file
    if r.suffix:
        body["suffix"] = r.suffix
    if r.HasField("seed"):
        body["seed"] = r.seed
    return body


def job_to_pb(job: dict) -> tpb.Job:
    h = job["hyperparameters"]
    options = {k: v for k, v in job["quiver"].items() if k != "method"}
    err = job["error"]
    return tpb.Job(
        id=job["id"], model=job["model"], training_file=job["training_file"],
        validation_file=job["validation_file"] or "",
        status=tpb.JobStatus.Value(f"JOB_STATUS_{job['status'].upper()}"),
        fine_tuned_model=job["fine_tuned_model"] or "", trained_tokens=job["trained_tokens"] or 0,
        error=tpb.JobError(code=err["code"], message=err["message"]) if err else None,
        hyperparameters=tpb.Hyperparameters(n_epochs=h["n_epochs"], batch_size=h["batch_size"],
                                            learning_rate_multiplier=h["learning_rate_multiplier"]),
        suffix=job["suffix"] or "", seed=job["seed"], created_at=job["created_at"],
        finished_at=job["finished_at"] or 0, method=job["quiver"]["method"], options=_struct(options))


def event_to_pb(e: dict) -> tpb.JobEvent:
    return tpb.JobEvent(id=e["id"], created_at=e["created_at"], level=e["level"], message=e["message"],
                        type=e["type"], data=_struct(e["data"]))


def _struct(d: dict) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(d)
    return s
