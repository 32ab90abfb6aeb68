"""Server-sent events as OpenAI streams them: one `data: <json>` event per chunk, then
`data: [DONE]`. Compact JSON, no event names or ids (OpenAI's clients read only `data`)."""
from __future__ import annotations

import json

DONE = b"data: [DONE]\n\n"
MEDIA_TYPE = "text/event-stream"
#: no proxy buffering (nginx honours X-Accel-Buffering), no caching of a live stream
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def event(obj: dict) -> bytes:
    """One SSE event carrying `obj` (json.dumps escapes newlines, so one `data:` line suffices)."""
    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8") + b"\n\n"
