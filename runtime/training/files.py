"""Uploaded training files (OpenAI's Files API, purpose "fine-tune"): checked, then stored.

    upload(name, chunks) -> file record     every line parsed and its shape checked on the way in
                                            (trainer.data.check_row); the first bad one refuses
                                            the whole file with its line number; nothing is kept
    <data-dir>/files/<file-id>.jsonl        the bytes as sent, renamed into place once complete

Rows are the shapes `quiver train` reads: OpenAI's chat format {"messages": [...]}, and
{"prompt", "completion"} / {"text"}. What needs the tokenizer (the chat template renders, a row
keeps loss tokens within the max sequence length) is checked when a job starts, in its
`validating_files` phase, so an upload never competes with the engine for the tokenizer.

Caps (--max-file-bytes, --max-file-rows) are enforced while the bytes arrive: a file past a cap
is refused before it is ever whole on disk.
"""
from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from trainer.data import check_row

PURPOSE = "fine-tune"


class FileRejected(ValueError):
    """An upload refused for its content; the message names the line when a row is at fault."""


class FileTooLarge(ValueError):
    """An upload past --max-file-bytes or --max-file-rows."""


@dataclass(frozen=True)
class FileLimits:
    max_bytes: int = 64 * 1024 * 1024
    max_rows: int = 100_000


class LineChecker:
    """Fed the upload in arbitrary chunks; checks each complete line as it arrives."""

    def __init__(self, limits: FileLimits):
        self.limits = limits
        self.bytes = 0
        self.rows = 0
        self.line_no = 0
        self._tail = b""

    def feed(self, chunk: bytes) -> None:
        self.bytes += len(chunk)
        if self.bytes > self.limits.max_bytes:
            raise FileTooLarge(f"the file is over {self.limits.max_bytes} bytes (--max-file-bytes)")
        lines = (self._tail + chunk).split(b"\n")
        self._tail = lines.pop()
        for line in lines:
            self._line(line)

    def close(self) -> None:
        if self._tail:
            self._line(self._tail)
            self._tail = b""
        if self.rows == 0:
            raise FileRejected("the file has no rows (expected one JSON object per line)")

    def _line(self, raw: bytes) -> None:
        self.line_no += 1
        if not raw.strip():
            return
        try:
            row = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise FileRejected(f"line {self.line_no}: not UTF-8 text") from None
        except json.JSONDecodeError as e:
            raise FileRejected(f"line {self.line_no}: not valid JSON ({e.msg} at column {e.colno})") from None
        try:
            check_row(row)
        except ValueError as e:
            raise FileRejected(f"line {self.line_no}: {e}") from None
        self.rows += 1
        if self.rows > self.limits.max_rows:
            raise FileTooLarge(f"the file has more than {self.limits.max_rows} rows (--max-file-rows)")


class FileStore:
    def __init__(self, root: Path, state, limits: FileLimits):
        self.root = root / "files"
        self.root.mkdir(parents=True, exist_ok=True)
        self.state, self.limits = state, limits
        for stale in self.root.glob(".upload-*"):  # a server killed mid-upload
            stale.unlink(missing_ok=True)

    async def upload(self, filename: str, chunks: AsyncIterator[bytes]) -> dict:
        """Check and store one upload; FileRejected / FileTooLarge leave nothing behind."""
        file_id = f"file-{secrets.token_hex(12)}"
        final = self.root / f"{file_id}.jsonl"
        tmp = self.root / f".upload-{file_id}"
        checker = LineChecker(self.limits)
        try:
            with tmp.open("wb") as out:
                async for chunk in chunks:
                    checker.feed(chunk)
                    out.write(chunk)
                checker.close()
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        record = {"id": file_id, "filename": _clean_name(filename), "bytes": checker.bytes,
                  "rows": checker.rows, "created_at": int(time.time()), "purpose": PURPOSE,
                  "path": str(final)}
        self.state.add_file(record)
        return record

    def get(self, file_id: str) -> dict | None:
        return self.state.file(file_id)

    def list(self, after: str | None, limit: int) -> list[dict]:
        return self.state.files(after, limit)

    def delete(self, file_id: str) -> bool:
        record = self.state.file(file_id)
        if record is None or not self.state.delete_file(file_id):
            return False
        Path(record["path"]).unlink(missing_ok=True)
        return True


def _clean_name(name: str) -> str:
    """The client's file name as a label only (never a path here): its last part, bounded."""
    return (name or "upload.jsonl").replace("\\", "/").rsplit("/", 1)[-1][:255] or "upload.jsonl"


def file_object(record: dict) -> dict:
    """OpenAI's file object."""
    return {"id": record["id"], "object": "file", "bytes": record["bytes"],
            "created_at": record["created_at"], "filename": record["filename"],
            "purpose": record["purpose"], "status": "processed", "status_details": None}
