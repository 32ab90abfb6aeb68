"""Training data: JSONL rows -> token ids with a per-token loss mask.

Three row shapes, one per line (blank lines are skipped):

    {"prompt": "...", "completion": "..."}   loss on the completion (+ EOS) only
    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", ...}, ...]}
                                             rendered with the tokenizer's chat template; loss on
                                             the assistant turns only (their text and end-of-turn)
    {"text": "..."}                          loss on every token (+ EOS)

A prompt/completion row is tokenized as two pieces (prompt with the tokenizer's special tokens,
completion without), the way a server sees a prompt and then generates. A messages row is
tokenized as the whole rendered text, exactly as the server tokenizes a chat prompt; the
assistant spans are found by rendering each prefix of the conversation and mapping character
offsets to tokens, so no template-specific parsing is needed.

Any malformed row raises DataError naming the file and line. Examples longer than
--max-seq-len are cut to it; one left with no loss token is dropped (and counted).
"""
from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant", "tool")


class DataError(ValueError):
    """A training-data row that cannot be used; the message starts with `file:line:`."""


@dataclass(frozen=True)
class Example:
    ids: tuple[int, ...]  # [L] token ids
    labels: tuple[bool, ...]  # [L] True where the token is a loss target
    line: int  # 1-based line in the JSONL file

    @property
    def num_targets(self) -> int:
        """Tokens the loss is taken on (the first token has no prediction before it)."""
        return sum(self.labels[1:])


def load_examples(path: str | Path, tokenizer, max_seq_len: int,
                  fallback_eos: int | None = None, each_row=contextlib.nullcontext) -> list[Example]:
    """All usable examples of a JSONL file, in file order.

    Completions end with the tokenizer's end-of-sequence token, or `fallback_eos` (the model
    config's) when the tokenizer names none: the server stops on either, so what is trained to
    end does end when served. `each_row()`: a context manager around each row's tokenizing (a
    job in the server pauses between rows and holds the shared tokenizer's lock for one row).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: training data file not found")
    examples, dropped = [], 0
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            row = _parse_line(path, line_no, line)
            try:
                with each_row():
                    ids, labels = tokenize_row(row, tokenizer, fallback_eos)
            except ValueError as e:
                raise DataError(f"{path}:{line_no}: {e}") from None
            ex = Example(tuple(ids[:max_seq_len]), tuple(labels[:max_seq_len]), line_no)
            if ex.num_targets == 0:
                dropped += 1
                continue
            examples.append(ex)
    if dropped:
        log.warning("%s: %d rows have no loss tokens within --max-seq-len %d and were skipped",
                    path, dropped, max_seq_len)
    if not examples:
        raise DataError(f"{path}: no usable training rows")
    return examples


def _parse_line(path: Path, line_no: int, line: str) -> dict[str, Any]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{line_no}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(row, dict):
        raise DataError(f"{path}:{line_no}: a row must be a JSON object, not {type(row).__name__}")
    return row


def check_row(row: Any) -> str:
    """The shape of one parsed row ("prompt_completion", "messages" or "text"), checked without
    a tokenizer (what an upload can check at once); ValueError says what is wrong with it."""
    if not isinstance(row, dict):
        raise ValueError(f"a row must be a JSON object, not {type(row).__name__}")
    keys = set(row)
    if keys == {"prompt", "completion"}:
        _text(row, "prompt", allow_empty=True)
        _text(row, "completion")
        return "prompt_completion"
    if keys == {"messages"}:
        _check_messages(row["messages"])
        return "messages"
    if keys == {"text"}:
        _text(row, "text")
        return "text"
    raise ValueError(_unrecognised(keys))


def _unrecognised(keys: set[str]) -> str:
    return (f"unrecognised row keys {sorted(keys)}: expected {{\"prompt\", \"completion\"}}, "
            "{\"messages\"} or {\"text\"}")


def tokenize_row(row: dict[str, Any], tokenizer, fallback_eos: int | None = None) -> tuple[list[int], list[bool]]:
    """(ids, labels) of one parsed row; ValueError says what is wrong with it."""
    keys = set(row)
    if keys == {"prompt", "completion"}:
        return _prompt_completion(_text(row, "prompt", allow_empty=True), _text(row, "completion"), tokenizer,
                                  _eos(tokenizer, fallback_eos))
    if keys == {"messages"}:
        return _messages(row["messages"], tokenizer)
    if keys == {"text"}:
        ids = tokenizer(_text(row, "text"))["input_ids"] + _eos(tokenizer, fallback_eos)
        return ids, [True] * len(ids)
    raise ValueError(_unrecognised(keys))


def _text(row: dict, key: str, allow_empty: bool = False) -> str:
    value = row[key]
    if not isinstance(value, str):
        raise ValueError(f"{key!r} must be a string, not {type(value).__name__}")
    if not value and not allow_empty:
        raise ValueError(f"{key!r} is empty")
    return value


def _eos(tokenizer, fallback: int | None) -> list[int]:
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else fallback
    return [] if eos is None else [eos]


def _prompt_completion(prompt: str, completion: str, tokenizer, eos: list[int]) -> tuple[list[int], list[bool]]:
    p = tokenizer(prompt)["input_ids"] if prompt else []
    c = tokenizer(completion, add_special_tokens=False)["input_ids"] + eos
    return p + c, [False] * len(p) + [True] * len(c)


def _messages(messages: Any, tokenizer) -> tuple[list[int], list[bool]]:
    _check_messages(messages)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("a messages row needs a tokenizer with a chat template; this one has none")
    text = _render(tokenizer, messages)
    spans = _assistant_spans(tokenizer, messages, text)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels = [any(lo <= start < hi for lo, hi in spans) for start, _ in offsets]
    return ids, labels


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list of {\"role\", \"content\"} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or set(m) - {"role", "content"} or "role" not in m or "content" not in m:
            raise ValueError(f"messages[{i}] must be an object with exactly 'role' and 'content'")
        if m["role"] not in ROLES:
            raise ValueError(f"messages[{i}] has role {m['role']!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise ValueError(f"messages[{i}].content must be a string")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("'messages' has no assistant turn to learn from")


def _render(tokenizer, messages: list[dict], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _assistant_spans(tokenizer, messages: list[dict], text: str) -> list[tuple[int, int]]:
    """Character spans [lo, hi) of the assistant turns in `text` (content + end-of-turn marker).

    Turn i spans from the end of the conversation before it rendered with a generation prompt
    to the end of the conversation up to it; both renders must be prefixes of the full text.
    """
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], generation_prompt=True) if i else ""
        upto = _render(tokenizer, messages[: i + 1])
        if not text.startswith(before) or not text.startswith(upto):
            raise ValueError("the chat template does not render conversation prefixes as prefixes "
                             "of the whole; assistant turns cannot be located")
        # up to the end-of-turn marker; whitespace the template puts after it is not generated
        spans.append((len(before), len(upto.rstrip())))
    return spans
