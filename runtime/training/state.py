"""Durable state of files and fine-tuning jobs: one SQLite database under --data-dir.

    files        id, filename, bytes, rows, created_at, path (the stored JSONL)
    jobs         id, created_at, model, training_file, validation_file, status, spec (JSON: the
                 request as resolved), fine_tuned_model, trained_tokens, error (JSON), ...
    events       per job, in order (id = rowid): level, message, type, data (JSON)
    checkpoints  per job: step, metrics (JSON), path of the trainer checkpoint

Why SQLite: a job must outlive the process (a restarted server resumes it), and job, event and
checkpoint rows change together; a transaction makes each change all-or-nothing, so a kill
between two writes never leaves a job that says `succeeded` without its model, or an event
without its job. WAL mode lets readers (GET routes) run while the engine thread writes.

One connection, shared by every thread under a lock: the writes are tiny and rare (one per
training step at most), so a lock costs nothing measurable and keeps SQLite's threading rules
out of the callers.
"""
from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY, filename TEXT NOT NULL, bytes INTEGER NOT NULL, rows INTEGER NOT NULL,
    created_at INTEGER NOT NULL, purpose TEXT NOT NULL, path TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, created_at INTEGER NOT NULL, model TEXT NOT NULL,
    training_file TEXT NOT NULL, validation_file TEXT, status TEXT NOT NULL, spec TEXT NOT NULL,
    fine_tuned_model TEXT, trained_tokens INTEGER, error TEXT, started_at INTEGER,
    finished_at INTEGER, cancel_requested INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT NOT NULL, created_at INTEGER NOT NULL,
    level TEXT NOT NULL, message TEXT NOT NULL, type TEXT NOT NULL, data TEXT);
CREATE INDEX IF NOT EXISTS events_by_job ON events (job_id, seq);
CREATE TABLE IF NOT EXISTS checkpoints (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT NOT NULL, created_at INTEGER NOT NULL,
    step INTEGER NOT NULL, metrics TEXT NOT NULL, path TEXT NOT NULL);
"""

#: statuses that end a job (OpenAI's names)
FINAL = ("succeeded", "failed", "cancelled")
#: statuses of a job that still has to run; a restarted server picks these up again
PENDING = ("validating_files", "queued", "running")


class State:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        # WAL + NORMAL: a killed process loses nothing committed (the log is replayed on open);
        # only a power cut may lose the last commits, never consistency. FULL would fsync on
        # every training step's event.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _run(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def _transaction(self, statements: list[tuple[str, tuple]]) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for sql, args in statements:
                    self._db.execute(sql, args)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # ---- files ----------------------------------------------------------------------------------
    def add_file(self, row: dict[str, Any]) -> None:
        self._run("INSERT INTO files (id, filename, bytes, rows, created_at, purpose, path) "
                  "VALUES (:id, :filename, :bytes, :rows, :created_at, :purpose, :path)", row)

    def file(self, file_id: str) -> dict[str, Any] | None:
        rows = self._run("SELECT * FROM files WHERE id = ?", (file_id,))
        return dict(rows[0]) if rows else None

    def files(self, after: str | None, limit: int) -> list[dict[str, Any]]:
        return _page(self, "files", "rowid", after, limit)

    def delete_file(self, file_id: str) -> bool:
        with self._lock:
            return self._db.execute("DELETE FROM files WHERE id = ?", (file_id,)).rowcount > 0

    # ---- jobs -----------------------------------------------------------------------------------
    def add_job(self, row: dict[str, Any], first_event: str) -> None:
        """A new job and its first event, together."""
        self._transaction([
            ("INSERT INTO jobs (id, created_at, model, training_file, validation_file, status, spec) "
             "VALUES (:id, :created_at, :model, :training_file, :validation_file, :status, :spec)", row),
            _event_sql(row["id"], first_event, "info", "message", None)])

    def job(self, job_id: str) -> dict[str, Any] | None:
        rows = self._run("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return _job(rows[0]) if rows else None

    def jobs(self, after: str | None, limit: int) -> list[dict[str, Any]]:
        return [_job(r) for r in _page(self, "jobs", "rowid", after, limit, raw=True)]

    def pending_jobs(self) -> list[dict[str, Any]]:
        """Jobs still to run, oldest first (the queue order)."""
        marks = ",".join("?" * len(PENDING))
        return [_job(r) for r in self._run(f"SELECT * FROM jobs WHERE status IN ({marks}) ORDER BY rowid",
                                           PENDING)]

    def update_job(self, job_id: str, event: tuple[str, str, str, dict | None] | None = None,
                   **fields: Any) -> None:
        """Set job fields and (optionally) add an event (message, level, type, data), atomically."""
        statements = []
        if fields:
            if "error" in fields and fields["error"] is not None:
                fields["error"] = json.dumps(fields["error"])
            sets = ", ".join(f"{k} = ?" for k in fields)
            statements.append((f"UPDATE jobs SET {sets} WHERE id = ?", (*fields.values(), job_id)))
        if event is not None:
            statements.append(_event_sql(job_id, *event))
        self._transaction(statements)

    def request_cancel(self, job_id: str) -> None:
        self._run("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))

    # ---- events and checkpoints -----------------------------------------------------------------
    def events(self, job_id: str, after: str | None, limit: int) -> list[dict[str, Any]]:
        """Newest first; `after` = an event id from a previous page (older ones follow)."""
        args: tuple = (job_id,)
        where = "job_id = ?"
        if after:
            where += " AND seq < ?"
            args += (event_seq(after),)
        rows = self._run(f"SELECT * FROM events WHERE {where} ORDER BY seq DESC LIMIT ?", (*args, limit))
        return [_event(r) for r in rows]

    def events_since(self, job_id: str, after: str | None, limit: int) -> list[dict[str, Any]]:
        """Oldest first, the events after event id `after` (all when None): what a watcher
        has not seen yet."""
        seq = event_seq(after) if after else 0
        rows = self._run("SELECT * FROM events WHERE job_id = ? AND seq > ? ORDER BY seq LIMIT ?",
                         (job_id, seq, limit))
        return [_event(r) for r in rows]

    def add_checkpoint(self, job_id: str, step: int, metrics: dict, path: str, message: str) -> None:
        now = int(time.time())
        self._transaction([
            ("INSERT INTO checkpoints (job_id, created_at, step, metrics, path) VALUES (?, ?, ?, ?, ?)",
             (job_id, now, step, json.dumps(metrics), path)),
            _event_sql(job_id, message, "info", "message", {"step": step})])

    def checkpoints(self, job_id: str, after: str | None, limit: int) -> list[dict[str, Any]]:
        args: tuple = (job_id,)
        where = "job_id = ?"
        if after:
            where += " AND seq < ?"
            args += (checkpoint_seq(after),)
        rows = self._run(f"SELECT * FROM checkpoints WHERE {where} ORDER BY seq DESC LIMIT ?", (*args, limit))
        return [{**dict(r), "metrics": json.loads(r["metrics"])} for r in rows]

    def job_counts(self) -> dict[str, int]:
        return {r["status"]: r["n"] for r in self._run("SELECT status, COUNT(*) AS n FROM jobs GROUP BY status")}


def _event_sql(job_id: str, message: str, level: str, kind: str, data: dict | None) -> tuple[str, tuple]:
    return ("INSERT INTO events (job_id, created_at, level, message, type, data) VALUES (?, ?, ?, ?, ?, ?)",
            (job_id, int(time.time()), level, message, kind, None if data is None else json.dumps(data)))


def _page(state: State, table: str, order: str, after: str | None, limit: int, raw: bool = False) -> list:
    """Newest first; `after` = an id from the previous page: the rows created before it."""
    if after:
        rows = state._run(f"SELECT * FROM {table} WHERE {order} < (SELECT {order} FROM {table} WHERE id = ?) "
                          f"ORDER BY {order} DESC LIMIT ?", (after, limit))
    else:
        rows = state._run(f"SELECT * FROM {table} ORDER BY {order} DESC LIMIT ?", (limit,))
    return rows if raw else [dict(r) for r in rows]


def _job(row: sqlite3.Row) -> dict[str, Any]:
    job = dict(row)
    job["spec"] = json.loads(job["spec"])
    job["error"] = json.loads(job["error"]) if job["error"] else None
    job["cancel_requested"] = bool(job["cancel_requested"])
    return job


def event_id(seq: int) -> str:
    return f"ftevent-{seq:012d}"


def event_seq(event: str) -> int:
    try:
        return int(event.removeprefix("ftevent-"))
    except ValueError:
        return 0


def checkpoint_id(seq: int) -> str:
    return f"ftckpt-{seq:012d}"


def checkpoint_seq(ckpt: str) -> int:
    try:
        return int(ckpt.removeprefix("ftckpt-"))
    except ValueError:
        return 0


def _event(row: sqlite3.Row) -> dict[str, Any]:
    return {"id": event_id(row["seq"]), "created_at": row["created_at"], "level": row["level"],
            "message": row["message"], "type": row["type"],
            "data": json.loads(row["data"]) if row["data"] else {}}
