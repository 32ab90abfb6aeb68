"""OpenAI bodies <-> domain objects at the HTTP edge: small pure functions, no I/O.

Requests: a ChatRequest / CompletionRequest becomes one `GenerateCall` per choice (the same
object the gRPC edge builds, so both ports reach the engine the same way). `n` choices are `n`
engine requests; with a `seed`, choice j samples with seed + j (mod 2**64), so choice 0 is what
the same request with n = 1 answers. Responses: engine Outputs become OpenAI's JSON shapes
(`chat.completion`, `chat.completion.chunk`, `text_completion`).

Defaults are OpenAI's, not gRPC's: temperature 1 (sampling), and an unset max_tokens means "as
much as the context leaves" (`GenerateCall.fit_max_new_tokens`), capped by --max-new-tokens.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from runtime.engine.params import (MAX_SEED, InvalidParams, ResponseOptions, SamplingParams,
                                   StoppingParams, StopReason)
from runtime.engine.request import Output, TokenInfo
from runtime.server.core import GenerateCall, Prompt
from runtime.server.http.schemas import MAX_N, ChatRequest, CompletionRequest, _Sampling

#: JSON has no -inf: a token the sampler filtered out (top-k / top-p) is reported at this logprob,
#: as vLLM does
MIN_LOGPROB = -9999.0
CHAT_ROLES = ("system", "user", "assistant")
FINISH_REASON = {StopReason.EOS_TOKEN: "stop", StopReason.STOP_SEQUENCE: "stop",
                 StopReason.MAX_TOKENS: "length", StopReason.TIME_LIMIT: "length",
                 StopReason.CANCELLED: "abort"}
#: engine field names -> the OpenAI field a client set (error messages name what was sent)
PARAM_NAMES = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens",
               "stop_sequences": "stop", "top_n": "top_logprobs", "text": "prompt",
               "input_ids": "prompt"}


# ---- requests ---------------------------------------------------------------------------------
def adapter_for(model: str, base_id: str) -> str:
    """The `model` field -> adapter id ("" = the base model)."""
    if not model:
        raise InvalidParams("model", "is required: the base model's id (GET /v1/models) or an adapter id")
    return "" if model == base_id else model


def sampling_from(body: _Sampling, choice: int) -> SamplingParams:
    top_k = 0 if body.top_k in (None, -1) else body.top_k
    seed = None if body.seed is None else (body.seed + choice) % (MAX_SEED + 1)
    return SamplingParams(
        temperature=1.0 if body.temperature is None else body.temperature,
        top_k=top_k,
        top_p=1.0 if body.top_p is None else body.top_p,
        typical_p=1.0 if body.typical_p is None else body.typical_p,
        repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        seed=seed)


def stopping_from(body: _Sampling, max_tokens: int | None, cap: int) -> StoppingParams:
    stop = body.stop if body.stop is not None else ()
    return StoppingParams(max_new_tokens=cap if max_tokens is None else max_tokens,
                          min_new_tokens=body.min_tokens or 0, stop_sequences=stop,
                          ignore_eos=bool(body.ignore_eos))


def choice_count(body: _Sampling) -> int:
    n = 1 if body.n is None else body.n
    if not 1 <= n <= MAX_N:
        raise InvalidParams("n", f"must be an integer in [1, {MAX_N}], got {n}")
    return n


def chat_prompt(body: ChatRequest) -> Prompt:
    messages = []
    for i, m in enumerate(body.messages):
        if m.role not in CHAT_ROLES:
            raise InvalidParams(f"messages[{i}].role", f"{m.role!r} is not supported; use one of "
                                                        f"{', '.join(CHAT_ROLES)} (no tools here)")
        content = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content or ())
        messages.append((m.role, content))
    return Prompt(messages=tuple(messages))


def chat_calls(body: ChatRequest, base_id: str, cap: int) -> list[GenerateCall]:
    if body.max_tokens is not None and body.max_completion_tokens is not None \
            and body.max_tokens != body.max_completion_tokens:
        raise InvalidParams("max_completion_tokens", "and max_tokens disagree; send one of them")
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    top = body.top_logprobs or 0
    if top and not body.logprobs:
        raise InvalidParams("top_logprobs", "needs logprobs: true")
    options = ResponseOptions(logprobs=bool(body.logprobs), top_n=top)
    prompt, adapter = chat_prompt(body), adapter_for(body.model, base_id)
    return [GenerateCall(adapter, prompt, sampling_from(body, j), stopping_from(body, max_tokens, cap),
                         options, fit_max_new_tokens=max_tokens is None)
            for j in range(choice_count(body))]


def completion_prompts(body: CompletionRequest) -> list[Prompt]:
    p = body.prompt
    if isinstance(p, str):
        return [Prompt(text=p)]
    if not p:
        raise InvalidParams("prompt", "is empty")
    if all(isinstance(x, int) for x in p):
        return [Prompt(ids=tuple(p))]
    return [Prompt(text=x) if isinstance(x, str) else Prompt(ids=tuple(x)) for x in p]


def completion_calls(body: CompletionRequest, base_id: str, cap: int) -> list[GenerateCall]:
    """Choice index = prompt index * n + j, as OpenAI orders them."""
    if body.echo and body.logprobs is not None:
        raise InvalidParams("echo", "with logprobs is not supported (prompt logprobs are not computed)")
    options = ResponseOptions(logprobs=body.logprobs is not None, top_n=body.logprobs or 0)
    adapter, n = adapter_for(body.model, base_id), choice_count(body)
    return [GenerateCall(adapter, prompt, sampling_from(body, j), stopping_from(body, body.max_tokens, cap),
                         options, fit_max_new_tokens=body.max_tokens is None)
            for prompt in completion_prompts(body) for j in range(n)]


# ---- responses --------------------------------------------------------------------------------
def finish_reason(out: Output) -> str | None:
    return FINISH_REASON.get(out.stop_reason) if out.finished else None


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def finite(lp: float) -> float:
    return lp if math.isfinite(lp) else MIN_LOGPROB


TokenTexts = Callable[[list[int]], list[str]]


def chat_logprobs(tokens: Sequence[TokenInfo], top_n: int, texts: TokenTexts) -> dict:
    """OpenAI's `choices[].logprobs`: {"content": [{token, logprob, bytes, top_logprobs}]}.
    A chosen token is named by the text it added (so the entries concatenate to the message);
    an alternative by its own decoded text."""
    names = alternative_names(tokens, top_n, texts)

    def entry(name: str, lp: float) -> dict:
        return {"token": name, "logprob": finite(lp), "bytes": list(name.encode("utf-8"))}

    return {"content": [{**entry(t.text, t.logprob),
                         "top_logprobs": [entry(names[i], lp) for i, lp in t.top[:top_n]]}
                        for t in tokens]}


def alternative_names(tokens: Sequence[TokenInfo], top_n: int, texts: TokenTexts) -> dict[int, str]:
    ids = sorted({i for t in tokens for i, _ in t.top[:top_n]})
    return dict(zip(ids, texts(ids))) if ids else {}


def completion_logprobs(tokens: Sequence[TokenInfo], top_n: int, texts: TokenTexts,
                        offset: int) -> dict:
    """The legacy object: tokens, token_logprobs, top_logprobs (text -> logprob), text_offset
    (each token's start in the choice's text, counting from `offset`)."""
    names = alternative_names(tokens, top_n, texts)
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t.text)
    return {"tokens": [t.text for t in tokens],
            "token_logprobs": [finite(t.logprob) for t in tokens],
            "top_logprobs": [{names[i]: finite(lp) for i, lp in t.top[:top_n]} for t in tokens]
            if top_n else None,
            "text_offset": offsets}


@dataclass
class Choice:
    """One choice's outputs folded together (non-streaming answers)."""

    text: str = ""
    tokens: list = None
    last: Output | None = None

    def __post_init__(self) -> None:
        self.tokens = []

    def add(self, out: Output) -> None:
        self.text += out.text
        self.tokens.extend(out.tokens)
        self.last = out


class ChatShape:
    """chat.completion / chat.completion.chunk bodies for one request's choices."""

    object, chunk_object, id_prefix = "chat.completion", "chat.completion.chunk", "chatcmpl-"

    def __init__(self, top_n: int, logprobs: bool):
        self.top_n, self.logprobs = top_n, logprobs

    def choice(self, index: int, c: Choice, texts: TokenTexts) -> dict:
        lp = chat_logprobs(c.tokens, self.top_n, texts) if self.logprobs else None
        return {"index": index, "message": {"role": "assistant", "content": c.text},
                "logprobs": lp, "finish_reason": finish_reason(c.last)}

    def opening(self, index: int) -> dict | None:
        """The first chunk of each choice: the role, before any text."""
        return {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                "finish_reason": None}

    def delta(self, index: int, out: Output, texts: TokenTexts) -> dict | None:
        if not out.text and not out.finished and not (self.logprobs and out.tokens):
            return None
        lp = chat_logprobs(out.tokens, self.top_n, texts) if self.logprobs and out.tokens else None
        return {"index": index, "delta": {"content": out.text} if out.text else {}, "logprobs": lp,
                "finish_reason": finish_reason(out)}


class CompletionShape:
    """text_completion bodies (streamed chunks have the same object name, as OpenAI's do)."""

    object, chunk_object, id_prefix = "text_completion", "text_completion", "cmpl-"

    def __init__(self, top_n: int, logprobs: bool, echo: Sequence[str] = ()):
        self.top_n, self.logprobs = top_n, logprobs
        self.echo = list(echo)  # per choice: the prompt text to put first ([] = no echo)
        self._offsets: dict[int, int] = {}  # streaming: text emitted so far per choice

    def _echo(self, index: int) -> str:
        return self.echo[index] if self.echo else ""

    def choice(self, index: int, c: Choice, texts: TokenTexts) -> dict:
        head = self._echo(index)
        lp = completion_logprobs(c.tokens, self.top_n, texts, len(head)) if self.logprobs else None
        return {"index": index, "text": head + c.text, "logprobs": lp,
                "finish_reason": finish_reason(c.last)}

    def opening(self, index: int) -> dict | None:
        head = self._echo(index)
        self._offsets[index] = len(head)
        return {"index": index, "text": head, "logprobs": None, "finish_reason": None} if head else None

    def delta(self, index: int, out: Output, texts: TokenTexts) -> dict | None:
        if not out.text and not out.finished and not (self.logprobs and out.tokens):
            return None
        start = self._offsets.get(index, 0)
        lp = completion_logprobs(out.tokens, self.top_n, texts, start) if self.logprobs else None
        self._offsets[index] = start + len(out.text)
        return {"index": index, "text": out.text, "logprobs": lp, "finish_reason": finish_reason(out)}


def envelope(shape, request_id: str, created: int, model: str, chunk: bool) -> dict:
    return {"id": shape.id_prefix + request_id, "object": shape.chunk_object if chunk else shape.object,
            "created": created, "model": model}
