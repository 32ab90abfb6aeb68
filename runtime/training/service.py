"""The fine-tuning operations, transport-free: what the HTTP routes and the gRPC servicer call.

    TrainingService.build(cfg, core)     state under --data-dir, files, the scheduler (the
                                         engine loop's background hook, wired by app.py)
    upload_file / list_files / get_file / delete_file
    create_job / list_jobs / get_job / list_events / list_checkpoints / cancel_job

Errors are domain exceptions: InvalidParams (400 / INVALID_ARGUMENT, naming the field),
NotFound (404 / NOT_FOUND), FileTooLarge (413 / RESOURCE_EXHAUSTED), Conflict (409 /
FAILED_PRECONDITION: e.g. cancelling a job that has ended). A job is checked completely before
anything is written: a refused request leaves no row, file or directory behind.
"""
from __future__ import annotations

import logging
import os
import time
from concurrent.futures import TimeoutError as FuturesTimeout
from dataclasses import dataclass
from pathlib import Path

from runtime.engine.params import InvalidParams
from runtime.training import jobs
from runtime.training.files import FileLimits, FileRejected, FileStore, FileTooLarge
from runtime.training.scheduler import PUBLISH_TIMEOUT_S, TrainingScheduler
from runtime.training.state import State

log = logging.getLogger(__name__)

DB_FILE = "quiver.db"
MAX_PAGE = 100


class NotFound(LookupError):
    """No file / job of that id; the message names it."""


class UnknownModel(NotFound):
    """A job for a model this server does not hold (it fine-tunes its own base only)."""


class DataDirBusy(RuntimeError):
    """Another live server holds the data directory (two would run the same queued jobs)."""


class Conflict(RuntimeError):
    """The operation does not apply to the object's current state."""


__all__ = ["TrainingService", "NotFound", "UnknownModel", "Conflict", "FileRejected", "FileTooLarge"]


@dataclass(frozen=True)
class TrainingLimits:
    files: FileLimits = FileLimits()
    jobs: jobs.JobLimits = jobs.JobLimits()


class Publisher:
    """Makes a finished adapter servable at once: registered in the running server by id, then
    written to the adapter store, so every server sharing it (an S3 store: Ray replicas, other
    machines) can serve it too (store.publish; a no-op for a local directory)."""

    def __init__(self, root: Path, loader, store):
        self.root, self.loader, self.store = root, loader, store

    def __call__(self, adapter_id: str, path: Path) -> None:
        try:
            self.loader.load(adapter_id, str(path)).result(PUBLISH_TIMEOUT_S)
        except FuturesTimeout as e:
            raise TimeoutError(f"the adapter {adapter_id!r} was not registered within "
                               f"{PUBLISH_TIMEOUT_S:.0f} s") from e
        self.store.publish(adapter_id, path)  # after the load: only a valid adapter goes up


class TrainingService:
    def __init__(self, data_dir: Path, state: State, files: FileStore, scheduler: TrainingScheduler,
                 base_id: str, limits: TrainingLimits):
        self.data_dir, self.state, self.files = data_dir, state, files
        self.scheduler, self.base_id, self.limits = scheduler, base_id, limits
        self._lock_file = None  # <data-dir>/.lock, flocked (build)

    @classmethod
    def build(cls, cfg, core, base_id: str) -> "TrainingService":
        """From the server's config and Core (app.py); the finished adapters go to --adapter-dir
        (lazily loadable after a restart too), else to <data-dir>/adapters, which is then made
        an allowed adapter root."""
        data_dir = Path(cfg.data_dir).resolve()
        data_dir.mkdir(parents=True, exist_ok=True)
        lock = _lock(data_dir)
        state = State(data_dir / DB_FILE)
        limits = TrainingLimits(FileLimits(cfg.max_file_bytes, cfg.max_file_rows),
                                jobs.JobLimits(max_epochs=cfg.max_train_epochs, max_seq_len=cfg.max_train_seq_len,
                                               max_rank=core.registry.max_rank))
        store = core.store
        root = store.adapter_dir or (data_dir / "adapters").resolve()
        root.mkdir(parents=True, exist_ok=True)
        if root not in store.roots:
            store.roots.append(root)
        scheduler = TrainingScheduler(state, core.base, base_id, core.tok_lock, Publisher(root, core.loader, store),
                                      cfg.train_share, core.metrics)
        service = cls(data_dir, state, FileStore(data_dir, state, limits.files), scheduler, base_id, limits)
        service._lock_file = lock  # held (flock) for the life of the process
        service._register_finished(store.adapter_dir is None, core.loader)
        scheduler.count_jobs()
        return service

    def _register_finished(self, needed: bool, loader) -> None:
        """Without --adapter-dir nothing loads <data-dir>/adapters lazily: register what earlier
        runs of the server trained (host memory only; a device slot is taken on use)."""
        if not needed:
            return
        root = self.scheduler.adapter_root
        for job in self.state.jobs(None, 10_000):
            name = job["fine_tuned_model"]
            if job["status"] == "succeeded" and name and (root / name).is_dir():
                loader.load(name, str(root / name))

    # ---- files ----------------------------------------------------------------------------------
    async def upload_file(self, filename: str, purpose: str, chunks) -> dict:
        if purpose != "fine-tune":
            raise InvalidParams("purpose", f"must be \"fine-tune\" (the only purpose this server stores), "
                                           f"not {purpose!r}")
        return await self.files.upload(filename, chunks)

    def list_files(self, after: str | None = None, limit: int = 100) -> tuple[list[dict], bool]:
        rows = self.files.list(after, _limit(limit) + 1)
        return rows[:_limit(limit)], len(rows) > _limit(limit)

    def get_file(self, file_id: str) -> dict:
        record = self.files.get(file_id)
        if record is None:
            raise NotFound(f"no file with id {file_id!r}")
        return record

    def delete_file(self, file_id: str) -> None:
        self.get_file(file_id)
        for job in self.state.pending_jobs():
            if file_id in (job["training_file"], job["validation_file"]):
                raise Conflict(f"file {file_id!r} is used by fine-tuning job {job['id']}, which has not "
                               "ended; cancel it first")
        if not self.files.delete(file_id):
            raise NotFound(f"no file with id {file_id!r}")

    # ---- jobs -----------------------------------------------------------------------------------
    def create_job(self, body: dict) -> dict:
        plan = jobs.plan_job(body, self.base_id, self.limits.jobs)
        if plan.model != self.base_id:
            raise UnknownModel(f"the model {plan.model!r} does not exist here: this server fine-tunes its "
                           f"base model {self.base_id!r}")
        train = self._file_for("training_file", plan.training_file)
        valid = self._file_for("validation_file", plan.validation_file) if plan.validation_file else None
        job_id = jobs.new_job_id()
        output = self.data_dir / "jobs" / job_id
        cfg = jobs.train_config(plan, Path(train["path"]), Path(valid["path"]) if valid else None, output,
                                train["rows"], self.limits.jobs)
        name = jobs.fine_tuned_model_id(self.base_id, plan.suffix, job_id)
        row = {"id": job_id, "created_at": int(time.time()), "model": plan.model,
               "training_file": plan.training_file, "validation_file": plan.validation_file,
               "status": "queued", "spec": _json({**plan.spec(), "train_config": cfg.to_dict(),
                                                  "adapter_id": name})}
        self.state.add_job(row, f"Created fine-tuning job: {job_id}")
        self.scheduler.kick.set()
        self.scheduler.count_jobs()
        return self.get_job(job_id)

    def _file_for(self, field: str, file_id: str) -> dict:
        record = self.files.get(file_id)
        if record is None:
            raise InvalidParams(field, f"no uploaded file has the id {file_id!r}")
        if not os.path.isfile(record["path"]):
            raise InvalidParams(field, f"the file {file_id!r} is gone from the data directory")
        return record

    def get_job(self, job_id: str) -> dict:
        return jobs.job_object(self._job(job_id))

    def _job(self, job_id: str) -> dict:
        job = self.state.job(job_id)
        if job is None:
            raise NotFound(f"no fine-tuning job with id {job_id!r}")
        return job

    def list_jobs(self, after: str | None = None, limit: int = 20) -> tuple[list[dict], bool]:
        rows = self.state.jobs(after, _limit(limit) + 1)
        return [jobs.job_object(j) for j in rows[:_limit(limit)]], len(rows) > _limit(limit)

    def list_events(self, job_id: str, after: str | None = None, limit: int = 20) -> tuple[list[dict], bool]:
        self._job(job_id)
        rows = self.state.events(job_id, after, _limit(limit) + 1)
        return [{"object": "fine_tuning.job.event", **e} for e in rows[:_limit(limit)]], len(rows) > _limit(limit)

    def events_since(self, job_id: str, after: str | None, limit: int = 100) -> list[dict]:
        """Oldest first, after event id `after` (gRPC WatchJob)."""
        self._job(job_id)
        return [{"object": "fine_tuning.job.event", **e} for e in self.state.events_since(job_id, after, limit)]

    def list_checkpoints(self, job_id: str, after: str | None = None, limit: int = 10) -> tuple[list[dict], bool]:
        job = self._job(job_id)
        rows = self.state.checkpoints(job_id, after, _limit(limit) + 1)
        name = job["spec"].get("adapter_id", "")
        out = [{"object": "fine_tuning.job.checkpoint", "id": f"ftckpt-{r['seq']:012d}",
                "created_at": r["created_at"], "fine_tuning_job_id": job_id, "step_number": r["step"],
                "metrics": r["metrics"], "fine_tuned_model_checkpoint": f"{name}/step-{r['step']}"}
               for r in rows[:_limit(limit)]]
        return out, len(rows) > _limit(limit)

    def cancel_job(self, job_id: str) -> dict:
        self._job(job_id)
        ended = self.scheduler.cancel(job_id)  # the engine thread lets go of it at its next call
        if ended is not None:
            raise Conflict(f"fine-tuning job {job_id} has already {ended}; it cannot be cancelled")
        return self.get_job(job_id)

    def close(self) -> None:
        """After the engine loop stopped: no slice runs any more. A running job stays `running`
        in the state, and the next server resumes it."""
        self.scheduler.shutdown()
        self.state.close()
        if self._lock_file is not None:
            self._lock_file.close()  # releases the flock: a server started next may take it


def _lock(data_dir: Path):
    """An exclusive flock on <data-dir>/.lock, or DataDirBusy; released when the process ends."""
    import fcntl

    f = open(data_dir / ".lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise DataDirBusy(f"another server is using the data directory {data_dir}; give each server "
                          "its own --data-dir") from None
    return f


def _limit(limit: int) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_PAGE:
        raise InvalidParams("limit", f"must be an integer in [1, {MAX_PAGE}]")
    return limit


def _json(value) -> str:
    import json

    return json.dumps(value)
