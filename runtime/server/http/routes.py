"""The HTTP routes: parse -> convert -> the same Core the gRPC servicers call -> convert back.

    POST /v1/chat/completions   chat template (Core's chat path), n choices, SSE when stream
    POST /v1/completions        raw prompt(s): a string, a list of strings or of token ids
    GET  /v1/models             the base model, then every adapter loaded or in --adapter-dir
    POST /v1/load_lora_adapter  vLLM's route, any adapter type; admin token
    POST /v1/unload_lora_adapter
    GET  /health                200 serving, 503 draining
    GET  /metrics               the server's Prometheus registry (quiver_* and vllm:*)

Nothing blocking runs on the event loop: submitting (tokenizing, a lazy adapter load) and
building answers that need the tokenizer run on the HTTP pool; Outputs arrive through
bridge.Choices. A client that disconnects cancels its requests (bridge.py), streaming or not.
"""
from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from runtime.server import auth
from runtime.server.core import Core, GenerateCall
from runtime.server.http import convert, sse
from runtime.server.http.access import guard, read_body
from runtime.server.http.bridge import Choices, cancel_on_disconnect
from runtime.server.http.errors import HttpError, from_exception
from runtime.server.http.schemas import (ChatRequest, CompletionRequest, LoadLoraRequest,
                                         UnloadLoraRequest, parse_body)


@dataclass
class HttpContext:
    core: Core
    base_id: str  # the base model's `model` value (GET /v1/models lists it first)
    pool: Executor  # submits, pump threads, tokenizer work: never the event loop
    max_body_bytes: int
    draining: Callable[[], bool]
    started: int  # unix time: the base model's `created`

    async def run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)


def build_router(ctx: HttpContext) -> APIRouter:
    rules = auth.rules_for(ctx.core.cfg.host, ctx.core.cfg.admin_token, ctx.core.cfg.api_token)
    refused = ctx.core.metrics.auth_refused
    api = Depends(guard(rules[auth.GENERATION_SERVICE], auth.GENERATION_SERVICE, refused))
    admin = Depends(guard(rules[auth.ADAPTERS_SERVICE], auth.ADAPTERS_SERVICE, refused))
    r = APIRouter()

    @r.post("/v1/chat/completions", dependencies=[api])
    async def chat_completions(request: Request):
        body = parse_body(ChatRequest, await read_body(request, ctx.max_body_bytes))
        calls = convert.chat_calls(body, ctx.base_id, ctx.core.limits.max_new_tokens)
        shape = convert.ChatShape(body.top_logprobs or 0, bool(body.logprobs))
        return await generate(ctx, request, calls, shape, body)

    @r.post("/v1/completions", dependencies=[api])
    async def completions(request: Request):
        body = parse_body(CompletionRequest, await read_body(request, ctx.max_body_bytes))
        calls = convert.completion_calls(body, ctx.base_id, ctx.core.limits.max_new_tokens)
        echo = await ctx.run(echo_texts, ctx.core, calls) if body.echo else []
        shape = convert.CompletionShape(body.logprobs or 0, body.logprobs is not None, echo)
        return await generate(ctx, request, calls, shape, body)

    @r.get("/v1/models", dependencies=[api])
    async def models():
        return {"object": "list", "data": await ctx.run(model_cards, ctx)}

    @r.post("/v1/load_lora_adapter", dependencies=[admin])
    async def load_lora_adapter(request: Request):
        body = parse_body(LoadLoraRequest, await read_body(request, ctx.max_body_bytes))
        if body.lora_name == ctx.base_id or ctx.core.registry.contains(body.lora_name):
            raise HttpError(400, "invalid_request_error", f"the adapter {body.lora_name!r} has "
                            "already been loaded; unload it first", param="lora_name")
        await ctx.run(ctx.core.load_adapter, body.lora_name, body.lora_path)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @r.post("/v1/unload_lora_adapter", dependencies=[admin])
    async def unload_lora_adapter(request: Request):
        body = parse_body(UnloadLoraRequest, await read_body(request, ctx.max_body_bytes))
        await ctx.run(ctx.core.unload_adapter, body.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    @r.get("/health")
    async def health():
        if ctx.draining():
            return JSONResponse({"status": "draining"}, status_code=503)
        return {"status": "ok"}

    @r.get("/metrics")
    async def metrics():
        # Rendered on the loop itself (~1.5 ms for the whole registry): a hop to a pool thread
        # and back costs two GIL hand-offs, each up to the 5 ms switch interval while the
        # engine thread runs Python, which measured 3x slower under load than this.
        return Response(generate_latest(ctx.core.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return r


# ---- generation -------------------------------------------------------------------------------
def submit_all(core: Core, calls: list[GenerateCall]) -> list:
    """One Handle per choice; if any is refused, the ones already queued are cancelled."""
    handles = []
    try:
        for call in calls:
            handles.append(core.submit(call))
    except BaseException:
        for h in handles:
            h.cancel()
        raise
    return handles


def echo_texts(core: Core, calls: list[GenerateCall]) -> list[str]:
    return [c.prompt.text or core.decode(list(c.prompt.ids)) for c in calls]


async def generate(ctx: HttpContext, request: Request, calls: list[GenerateCall], shape, body):
    handles = await ctx.run(submit_all, ctx.core, calls)
    choices = Choices(handles, ctx.pool)
    head = convert.envelope(shape, uuid.uuid4().hex, int(time.time()), body.model, chunk=bool(body.stream))
    if body.stream:
        usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(stream_events(ctx, choices, shape, head, usage, n_per_prompt(body)),
                                 media_type=sse.MEDIA_TYPE, headers=sse.HEADERS)
    watcher = asyncio.create_task(cancel_on_disconnect(request.receive, choices))
    try:
        folded = [convert.Choice() for _ in calls]
        async for i, out in choices:
            folded[i].add(out)
    finally:
        watcher.cancel()
    return JSONResponse(await ctx.run(answer, ctx.core, shape, head, folded, n_per_prompt(body)))


def answer(core: Core, shape, head: dict, folded: list, n_per_prompt: int) -> dict:
    """The non-streaming body; a prompt's tokens count once however many choices it has."""
    prompt_tokens = sum(c.last.input_token_count for c in folded[::n_per_prompt])
    completion = sum(c.last.generated_token_count for c in folded)
    return {**head, "choices": [shape.choice(i, c, core.token_texts) for i, c in enumerate(folded)],
            "usage": convert.usage(prompt_tokens, completion)}


def n_per_prompt(body) -> int:
    return convert.choice_count(body)


async def stream_events(ctx: HttpContext, choices: Choices, shape, head: dict, include_usage: bool,
                        n: int):
    """SSE chunks; an error after the headers went out is sent as an error event, then [DONE]."""
    extra = {"usage": None} if include_usage else {}
    prompt_tokens: dict[int, int] = {}
    completion = 0
    try:
        for i in range(len(choices.handles)):
            opening = shape.opening(i)
            if opening is not None:
                yield sse.event({**head, "choices": [opening], **extra})
        async for i, out in choices:
            delta = (await ctx.run(shape.delta, i, out, ctx.core.token_texts) if out.tokens and shape.logprobs
                     else shape.delta(i, out, ctx.core.token_texts))
            if out.finished:
                prompt_tokens[i] = out.input_token_count
                completion += out.generated_token_count
            if delta is not None:
                yield sse.event({**head, "choices": [delta], **extra})
        if include_usage:
            yield sse.event({**head, "choices": [], "usage": convert.usage(
                sum(v for i, v in prompt_tokens.items() if i % n == 0), completion)})
        yield sse.DONE
    except Exception as e:  # noqa: BLE001 - the status line is sent; report in the stream
        yield sse.event(from_exception(e)[1])
        yield sse.DONE
    finally:
        choices.cancel()  # a no-op for finished requests; frees the rest (client gone)


# ---- listing ----------------------------------------------------------------------------------
def model_cards(ctx: HttpContext) -> list[dict]:
    """The base first, then adapters (loaded ones, then those --adapter-dir can load), as vLLM
    lists them: `parent` is the base id, `root` where the weights come from."""
    core = ctx.core
    base = {"id": ctx.base_id, "object": "model", "created": ctx.started, "owned_by": "quiver",
            "root": core.base.model_dir or ctx.base_id, "parent": None,
            "max_model_len": core.max_context_tokens()}
    cards, seen = [base], {ctx.base_id}
    for info in core.list_adapters():
        cards.append(_adapter_card(info.adapter_id, info.source, ctx))
        seen.add(info.adapter_id)
    for adapter_id, path in core.loadable_adapters():
        if adapter_id not in seen:
            cards.append(_adapter_card(adapter_id, str(path), ctx))
    return cards


def _adapter_card(adapter_id: str, source: str, ctx: HttpContext) -> dict:
    try:
        created = int(os.stat(source).st_mtime)
    except OSError:
        created = ctx.started
    return {"id": adapter_id, "object": "model", "created": created, "owned_by": "quiver",
            "root": source, "parent": ctx.base_id}
