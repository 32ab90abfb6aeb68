"""OpenAI request bodies as strict pydantic models, and the fields Quiver refuses by name.

    raw JSON bytes -> parse_body(ChatRequest, raw) -> ChatRequest  (or InvalidParams naming the field)

Strict: a string is never coerced to a number, nor a float to an integer, so `"max_tokens": "5"`
is a 400 that says so rather than a guess. Unknown fields are refused too (`extra="forbid"`):
the official `openai` client sends only what the caller set, so an unknown field is a caller's
typo or a feature Quiver lacks, and a silent ignore would hide either. Fields OpenAI defines
that Quiver cannot honour (`UNSUPPORTED`) get their own message; each is allowed only at its
neutral value (null, false, an empty list, `{"type": "text"}`), which some clients send always.

Quiver's extras ride in the same body, as vLLM's do (`extra_body` in the openai client):
`top_k`, `min_tokens`, `repetition_penalty`, `typical_p`, `ignore_eos`.
"""
from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from runtime.engine.params import InvalidParams

#: field -> neutral values still accepted (OpenAI fields Quiver cannot honour)
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []),
    "function_call": (None, "none"), "parallel_tool_calls": (None, False, True),
    "response_format": (None, {"type": "text"}), "audio": (None,), "modalities": (None, ["text"]),
    "logit_bias": (None, {}), "prediction": (None,), "suffix": (None, ""), "best_of": (None, 1),
    "web_search_options": (None,), "reasoning_effort": (None,), "metadata": (None, {}),
    "store": (None, False), "service_tier": (None, "auto", "default"), "verbosity": (None,),
}
#: the largest `n` one request may ask for (each choice is its own engine request)
MAX_N = 16


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


class _Sampling(_Strict):
    """Fields both routes share (OpenAI's, then Quiver's extras)."""

    model: str
    max_tokens: int | None = None
    temperature: float | None = None  # OpenAI's default is 1.0 (sampling), not greedy
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = 1
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted (OpenAI: end-user id for abuse monitoring); not stored
    # ---- Quiver's extras, as vLLM takes them
    top_k: int | None = None  # 0 or -1 = off (vLLM spells off as -1)
    min_tokens: int | None = None
    repetition_penalty: float | None = None
    typical_p: float | None = None
    ignore_eos: bool | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: str
    content: str | list[TextPart] | None = None


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None  # legacy: the number of alternatives (0 = the chosen token only)
    echo: bool | None = False


class LoadLoraRequest(_Strict):
    lora_name: str
    lora_path: str


class UnloadLoraRequest(_Strict):
    lora_name: str
    lora_int_id: int | None = None  # vLLM's clients may send it; ids are names here


def json_object(raw: bytes) -> dict:
    """raw bytes -> a JSON object; InvalidParams (400) for bad JSON, deep nesting or another type."""
    try:
        data = json.loads(raw)
    except RecursionError:
        raise InvalidParams("body", "is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidParams("body", f"is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise InvalidParams("body", f"must be a JSON object, got {type(data).__name__}")
    return data


def parse_body(model: type[_Strict], raw: bytes) -> Any:
    """raw JSON -> model instance; InvalidParams (400) naming the first bad field otherwise."""
    data = json_object(raw)
    refuse_unsupported(data)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise invalid_from(e) from None


def refuse_unsupported(data: dict) -> None:
    """InvalidParams for an unsupported field set to something; neutral ones are dropped."""
    for name, neutral in UNSUPPORTED.items():
        if name not in data:
            continue
        if data[name] not in neutral:
            raise InvalidParams(name, "is not supported by this server (Quiver serves text "
                                      "generation only); remove it")
        del data[name]


def invalid_from(error: ValidationError) -> InvalidParams:
    """pydantic's first error as InvalidParams, the field path spelt `messages[0].content`."""
    # the deepest error: for a union, the branch that got furthest says what is wrong
    first = max(error.errors(), key=lambda e: len(e["loc"]))
    # a union's branch names ("str", "list[int]", "TextPart") are not fields: leave them out
    loc = first["loc"]
    parts = [p for p in loc if isinstance(p, int) or p in _FIELD_NAMES]
    if first["type"] == "extra_forbidden":
        parts = [p for p in parts if p != loc[-1]] + [loc[-1]]  # the unknown key itself
    path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts).lstrip(".")
    path = path or "body"
    if first["type"] == "extra_forbidden":
        return InvalidParams(path, "is not a field this server knows (check the spelling; "
                                   "Quiver's extras are top_k, min_tokens, repetition_penalty, "
                                   "typical_p, ignore_eos)")
    return InvalidParams(path, first["msg"][:1].lower() + first["msg"][1:])


_FIELD_NAMES = frozenset(name for m in (ChatRequest, CompletionRequest, Message, TextPart, StreamOptions,
                                        LoadLoraRequest, UnloadLoraRequest) for name in m.model_fields)
