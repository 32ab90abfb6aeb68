"""What the server does for each call, in domain terms: no gRPC, no protobuf here.

    servicers.py (pb -> domain)  ->  Core.submit(GenerateCall)  ->  Handle (iterate Outputs)
                                     Core.load_adapter / unload_adapter / list_adapters
                                     Core.tokenize / model_info

`submit` is the door to the engine. In order: parameters are validated against the server's
limits, the prompt's size is checked (--max-input-chars, before any tokenizer work) and it is
tokenized (text, ids or chat messages), an adapter that is not registered is looked up as
<adapter-dir>/<id> and loaded (off the step thread; the caller waits, the batch does not), the
prompt is truncated if the request asked for it, and the request is handed to the EngineLoop,
whose engine refuses what cannot fit (context, KV budget, queue). Anything refused here raises a
domain exception that errors.py maps to a gRPC status, and counts as outcome "rejected" in the
metrics; everything accepted is counted when it finishes (ok, cancelled or error), observed on
the engine thread so a client that vanishes mid-stream is still counted.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FuturesTimeout
from dataclasses import dataclass, field, replace
from pathlib import Path

from runtime.adapters.loader import AdapterLoader
from runtime.adapters.registry import AdapterBusy, AdapterInfo, AdapterNotFound, AdapterRegistry
from runtime.adapters.store import AdapterPathError, AdapterStore, validate_adapter_id
from runtime.adapters.types import AdapterFormatError
from runtime.config import ServerConfig
from runtime.engine.engine import Engine, PrefixCacheStats, StepStats
from runtime.engine.loop import EngineLoop, RequestStream
from runtime.engine.params import (InvalidParams, RequestLimits, ResponseOptions, SamplingParams,
                                   StoppingParams, StopReason)
from runtime.engine.request import GenerationRequest, Output, TokenInfo
from runtime.models.base import LoadedBase
from runtime.server.metrics import Metrics, adapter_type

log = logging.getLogger(__name__)

#: max_new_tokens when a request leaves it unset (never above the server cap).
DEFAULT_MAX_NEW_TOKENS = 64

OUTCOME = {StopReason.CANCELLED: "cancelled", StopReason.ERROR: "error"}  # anything else: "ok"


class UnknownAdapter(AdapterNotFound):
    """Not registered, and not loadable from the adapter directory either."""

    def __init__(self, adapter_id: str, why: str):
        super().__init__(adapter_id)
        self.why = why

    def __str__(self) -> str:
        return f"adapter {self.args[0]!r} is not loaded and {self.why}"


class RequestFailed(RuntimeError):
    """The engine ended an accepted request with an error (the message is safe to show)."""


@dataclass(frozen=True)
class Prompt:
    """Exactly one of the three is set (checked by `Core.encode`)."""

    text: str = ""
    ids: tuple[int, ...] = ()
    messages: tuple[tuple[str, str], ...] = ()  # (role, content)


@dataclass(frozen=True)
class Truncation:
    """What a request allows to be cut from its prompt (the oldest tokens go; BOS stays)."""

    max_tokens: int = 0  # keep at most this many prompt tokens; 0 = no cap
    to_fit: bool = False  # cut until prompt + virtual tokens + max_new_tokens fit the context

    def validate(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 0:
            raise InvalidParams("truncate_input_tokens", f"must be an integer >= 0 (0 = off), "
                                                         f"got {self.max_tokens!r}")


@dataclass(frozen=True)
class GenerateCall:
    adapter_id: str
    prompt: Prompt
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stopping: StoppingParams = field(default_factory=StoppingParams)
    options: ResponseOptions = field(default_factory=ResponseOptions)
    truncation: Truncation = field(default_factory=Truncation)
    #: stopping.max_new_tokens is a ceiling, lowered to what the context leaves after the prompt
    #: (the OpenAI routes' meaning of an unset max_tokens)
    fit_max_new_tokens: bool = False


def truncate_prompt_ids(ids: list[int], keep: int, bos_id: int | None) -> list[int]:
    """The last `keep` tokens of `ids`; a leading BOS stays first (and counts in `keep`), since
    a Llama-family model without its BOS at position 0 drifts badly.

        truncate_prompt_ids([1, 5, 6, 7], 3, bos_id=1) == [1, 6, 7]
    """
    if keep >= len(ids):
        return list(ids)
    if keep <= 0:
        return []
    if bos_id is not None and ids[0] == bos_id:
        return [ids[0]] + (ids[len(ids) - keep + 1:] if keep > 1 else [])
    return list(ids[len(ids) - keep:])


class Handle:
    """An accepted request: iterate for its Outputs (the last has finished=True)."""

    def __init__(self, req: GenerationRequest, stream: RequestStream, input_tokens: list[TokenInfo],
                 truncated: int = 0):
        self.request_id = req.request_id
        self.input_tokens = input_tokens  # filled only when the request asked for them
        self.truncated = truncated  # prompt tokens dropped by truncation
        self._stream = stream

    def __iter__(self):
        for out in self._stream:
            if out.finished and out.stop_reason is StopReason.ERROR:
                raise RequestFailed(out.error or "the request failed (see server log)")
            yield out

    def cancel(self) -> None:
        """Idempotent; frees the request's KV and slot at the next engine step."""
        self._stream.cancel()


class Core:
    def __init__(self, cfg: ServerConfig, base: LoadedBase, engine: Engine, loop: EngineLoop,
                 registry: AdapterRegistry, store: AdapterStore, loader: AdapterLoader,
                 metrics: Metrics):
        self.cfg, self.base, self.engine, self.loop = cfg, base, engine, loop
        self.registry, self.store, self.loader, self.metrics = registry, store, loader, metrics
        self.tokenizer = base.tokenizer
        self.limits = RequestLimits(max_new_tokens=cfg.max_new_tokens)
        self.max_input_chars = cfg.max_input_chars
        self.default_max_new_tokens = min(DEFAULT_MAX_NEW_TOKENS, cfg.max_new_tokens)
        # transformers re-applies truncation / padding settings on the shared Rust tokenizer per
        # call; concurrent calls can collide ("Already borrowed"), so encoding is serialised.
        self.tok_lock = threading.Lock()
        #: fine-tuning jobs (runtime/training/service.py), set by app.py when --data-dir allows
        self.training = None
        self.gauges_dirty = threading.Event()  # set on adapter events; the refresher waits on it
        self._prefix_reported = PrefixCacheStats()  # engine totals already added to the counters

    # ---- generation -------------------------------------------------------------------------
    def submit(self, call: GenerateCall, wait_s: float | None = None) -> Handle:
        """Validate, resolve the adapter (lazily loading it), queue. wait_s bounds a lazy load
        (the RPC's remaining deadline)."""
        t0 = time.monotonic()
        try:
            for params in (call.sampling, call.stopping, call.options):
                params.validate(self.limits)
            call.truncation.validate()
            full = self.encode(call.prompt)
            if call.adapter_id:
                self._ensure_adapter(call.adapter_id, wait_s)
            ids = self._truncate(full, call)
            stopping = self._fit_max_new_tokens(ids, call) if call.fit_max_new_tokens else call.stopping
            req = GenerationRequest(ids, call.adapter_id, call.sampling, stopping, call.options)
            stream = self.loop.submit(req, observer=self._observer(call.adapter_id, t0))
        except Exception:
            self._rejected(call.adapter_id, t0)
            raise
        echo = self._token_infos(ids) if call.options.input_tokens else []
        return Handle(req, stream, echo, truncated=len(full) - len(ids))

    def _truncate(self, ids: list[int], call: GenerateCall) -> list[int]:
        """The prompt cut as the request allows (Truncation); unchanged when it asks nothing."""
        keep, t = len(ids), call.truncation
        if t.max_tokens:
            keep = min(keep, t.max_tokens)
        if t.to_fit:
            virtual = self.registry.get(call.adapter_id).num_virtual_tokens if call.adapter_id else 0
            room = self.max_context_tokens() - virtual - call.stopping.max_new_tokens
            if room < 1:
                raise InvalidParams(
                    "max_new_tokens", f"{call.stopping.max_new_tokens} + {virtual} adapter virtual "
                    f"tokens leave no room for a prompt in the context of {self.max_context_tokens()} "
                    "tokens; lower max_new_tokens")
            keep = min(keep, room)
        return ids if keep == len(ids) else truncate_prompt_ids(ids, keep, self.base.config.bos_token_id)

    def _fit_max_new_tokens(self, ids: list[int], call: GenerateCall) -> StoppingParams:
        """call.stopping with max_new_tokens lowered to the room the prompt leaves."""
        virtual = self.registry.get(call.adapter_id).num_virtual_tokens if call.adapter_id else 0
        room = self.max_context_tokens() - virtual - len(ids)
        if room < 1:
            raise InvalidParams("prompt", f"{len(ids)} prompt tokens + {virtual} adapter virtual tokens "
                                          f"fill the context of {self.max_context_tokens()} tokens")
        s = call.stopping
        if s.min_new_tokens > room:
            raise InvalidParams("min_new_tokens", f"({s.min_new_tokens}) does not fit: the prompt "
                                                  f"leaves {room} tokens of context")
        return replace(s, max_new_tokens=min(s.max_new_tokens, room))

    def max_context_tokens(self) -> int:
        """Prompt + virtual tokens + max_new_tokens of one request must fit in this."""
        return min(self.base.config.max_position_embeddings, self.engine.config.kv_cache_tokens)

    def check_prompt_size(self, prompt: Prompt) -> None:
        """Refuse oversize text before the tokenizer spends time on it (--max-input-chars)."""
        chars = len(prompt.text) + sum(len(r) + len(c) for r, c in prompt.messages)
        if chars > self.max_input_chars:
            field_name = "text" if prompt.text else "messages"
            raise InvalidParams(field_name, f"is {chars} characters; this server accepts at most "
                                            f"{self.max_input_chars} (--max-input-chars)")

    def encode(self, prompt: Prompt) -> list[int]:
        given = [name for name, v in (("text", prompt.text), ("input_ids", prompt.ids),
                                      ("messages", prompt.messages)) if v]
        if len(given) != 1:
            raise InvalidParams("text", "exactly one of text, input_ids or messages must be set"
                                        + (f" (got {', '.join(given)})" if given else
                                           ": the prompt is empty"))
        self.check_prompt_size(prompt)
        if prompt.ids:
            return list(prompt.ids)
        with self.tok_lock:
            if prompt.text:
                return list(self.tokenizer(prompt.text, add_special_tokens=True)["input_ids"])
            return self._chat_ids(prompt.messages)

    def _chat_ids(self, messages: tuple[tuple[str, str], ...]) -> list[int]:
        if not self.tokenizer.chat_template:
            raise InvalidParams("messages", "this model has no chat template; send text instead")
        from jinja2 import TemplateError

        try:
            return list(self.tokenizer.apply_chat_template(
                [{"role": r, "content": c} for r, c in messages], add_generation_prompt=True,
                tokenize=True, return_dict=False))
        except TemplateError as e:
            raise InvalidParams("messages", f"the chat template refused them: {e}") from e

    def ensure_adapter(self, adapter_id: str) -> None:
        """Registered once this returns (lazily loaded from the store like a request's adapter);
        a Ray replica's model multiplexer loads adapters ahead of requests this way."""
        self._ensure_adapter(adapter_id, None)

    def _ensure_adapter(self, adapter_id: str, wait_s: float | None) -> None:
        """Registered, or loaded now from <adapter-dir>/<id>; else UnknownAdapter."""
        validate_adapter_id(adapter_id)
        if self.registry.contains(adapter_id):
            return
        if self.store.adapter_dir is None:
            raise UnknownAdapter(adapter_id, "no --adapter-dir is set to load it from")
        path = self.store.fetch(adapter_id)  # a remote store (s3_store.py) copies it in first
        if not path.is_dir():
            raise UnknownAdapter(adapter_id, f"there is no directory {adapter_id!r} in the adapter dir")
        if self.registry.is_unloading(adapter_id):  # loadable again once its requests finish
            raise AdapterBusy(f"adapter {adapter_id!r} is being unloaded; retry once its "
                              "in-flight requests have finished")
        timeout = self.cfg.adapter_load_timeout_s if wait_s is None else min(wait_s, self.cfg.adapter_load_timeout_s)
        _wait_for_load(self.loader.load(adapter_id, reload=False), adapter_id, timeout)

    def _observer(self, adapter_id: str, t0: float):
        def observe(out: Output) -> None:  # engine thread
            if out.finished:
                admitted = out.first_token_time_s is not None
                self.metrics.request_done(
                    adapter_id, OUTCOME.get(out.stop_reason, "ok"), out.input_token_count,
                    out.generated_token_count, out.first_token_time_s, time.monotonic() - t0,
                    out.queue_time_s if admitted else None)

        return observe

    def _rejected(self, adapter_id: str, t0: float) -> None:
        # An id that is not registered gets no label of its own (metrics.AdapterLabels).
        known = not adapter_id or self.registry.contains(adapter_id)
        self.metrics.request_done(adapter_id if known else None, "rejected", 0, 0, None,
                                  time.monotonic() - t0, None)

    def _token_infos(self, ids: list[int]) -> list[TokenInfo]:
        with self.tok_lock:
            return [TokenInfo(i, self.tokenizer.decode([i], skip_special_tokens=False)) for i in ids]

    def token_texts(self, ids: list[int]) -> list[str]:
        """Each id's own text (logprob listings name tokens this way)."""
        with self.tok_lock:
            return [self.tokenizer.decode([i], skip_special_tokens=False) for i in ids]

    def decode(self, ids: list[int]) -> str:
        with self.tok_lock:
            return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def tokenize(self, prompt: Prompt, add_special_tokens: bool = True) -> tuple[list[int], list[str]]:
        if prompt.text and not add_special_tokens:
            self.check_prompt_size(prompt)
            with self.tok_lock:
                ids = list(self.tokenizer(prompt.text, add_special_tokens=False)["input_ids"])
        else:
            ids = self.encode(prompt)
        with self.tok_lock:
            return ids, list(self.tokenizer.convert_ids_to_tokens(ids))

    def model_info(self) -> dict:
        """Field name -> value, names as in ModelInfoResponse (convert.py builds it 1:1)."""
        b, cfg, ec = self.base, self.base.config, self.engine.config
        d = b.describe()
        return dict(model=d["model"] or b.model_dir, architecture=cfg.architecture,
                    quantize=d["quantize"], dtype=d["dtype"], device=d["device"],
                    max_context_tokens=self.max_context_tokens(),
                    max_new_tokens=self.limits.max_new_tokens, vocab_size=cfg.vocab_size,
                    eos_token_ids=list(cfg.eos_token_ids),
                    max_device_adapters=self.registry.num_slots, max_lora_rank=self.registry.max_rank,
                    max_batch_tokens=ec.max_batch_tokens, kv_cache_tokens=ec.kv_cache_tokens,
                    max_queue=ec.max_queue, lazy_adapter_loading=self.store.adapter_dir is not None,
                    version=quiver_version(), has_chat_template=bool(self.tokenizer.chat_template))

    # ---- adapters ---------------------------------------------------------------------------
    def load_adapter(self, adapter_id: str, source: str = "") -> AdapterInfo:
        """Load (or reload an idle) adapter; waits for the read and validation to finish."""
        try:
            validate_adapter_id(adapter_id)
            future = self.loader.load(adapter_id, source or None)
        except AdapterPathError:
            self.metrics.adapter_load_failed("path")
            raise
        _wait_for_load(future, adapter_id, self.cfg.adapter_load_timeout_s)
        return self.adapter_info(adapter_id)

    def unload_adapter(self, adapter_id: str) -> tuple[bool, int]:
        """(dropped now, requests still in flight). AdapterNotFound if not registered."""
        in_flight = self.adapter_info(adapter_id).in_flight
        dropped = self.registry.remove(adapter_id)
        self.gauges_dirty.set()
        return dropped, 0 if dropped else in_flight

    def adapter_info(self, adapter_id: str) -> AdapterInfo:
        for info in self.registry.list():
            if info.adapter_id == adapter_id:
                return info
        raise AdapterNotFound(adapter_id)

    def list_adapters(self) -> list[AdapterInfo]:
        return sorted(self.registry.list(), key=lambda i: i.adapter_id)

    def loadable_adapters(self, limit: int = 4096, max_depth: int = 4) -> list[tuple[str, Path]]:
        """(id, directory) of every PEFT adapter under --adapter-dir (a directory holding an
        adapter_config.json), sorted; ids nest (`team-a/lora`). Bounded in count and depth, so a
        huge or looping store cannot stall a listing."""
        root = self.store.adapter_dir
        if root is None:
            return []
        found: list[tuple[str, Path]] = []
        frontier = [root]
        for _ in range(max_depth):
            nxt = []
            for d in frontier:
                try:
                    children = sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))
                except OSError:
                    continue
                for c in children:
                    if (c / "adapter_config.json").is_file():
                        found.append((c.relative_to(root).as_posix(), c))
                    else:
                        nxt.append(c)
                    if len(found) >= limit:
                        return sorted(found)
            frontier = nxt
        return sorted(found)

    # ---- metrics plumbing (callbacks wired by app.py) ---------------------------------------
    def on_step(self, stats: StepStats) -> None:
        """Engine thread, after each step: the only place the engine's queues are read from."""
        self.metrics.step(stats.rows, stats.tokens, stats.duration_s, stats.preempted)
        self.refresh_engine_gauges()
        e = self.engine
        seen, self._prefix_reported = self._prefix_reported, replace(e.prefix_stats)
        self.metrics.prefix_cache(e.prefix_stats.queries - seen.queries, e.prefix_stats.hits - seen.hits,
                                  e.cache.cached_blocks)
        running = {s.req.adapter_id for s in e.running if s.req.adapter_id}
        waiting = {a for a, q in e.waiting.items() if a and q}
        self.metrics.lora_state(self.registry.num_slots, running, waiting)

    def refresh_engine_gauges(self) -> None:
        e = self.engine
        self.metrics.engine_state(len(e.running), e.num_queued(), e.cache.usage(), e.cache.pool_bytes())

    def refresh_adapter_gauges(self) -> None:
        counts: Counter[tuple[str, str]] = Counter()
        for info in self.registry.list():
            # an unloading adapter still serves its in-flight requests: count it as resident
            state = "device" if info.state.value == "unloading" else info.state.value
            counts[(state, adapter_type(info.peft_type, info.use_dora))] += 1
        self.metrics.adapters_resident(counts)

    def on_adapter_loaded(self, adapter_id: str, adapter, seconds: float) -> None:
        self.metrics.adapter_loaded(adapter_type(adapter.peft_type, adapter.use_dora), seconds)
        self.gauges_dirty.set()

    def on_adapter_failed(self, adapter_id: str, error: BaseException) -> None:
        self.metrics.adapter_load_failed(load_failure_reason(error))
        self.gauges_dirty.set()

    def on_adapter_evicted(self, adapter_id: str) -> None:
        self.metrics.adapter_evicted()
        self.gauges_dirty.set()


def _wait_for_load(future: Future, adapter_id: str, timeout: float) -> None:
    """The load's own exception, or TimeoutError (builtin; futures' differs before 3.11)."""
    try:
        future.result(timeout)
    except FuturesTimeout as e:
        raise TimeoutError(f"adapter {adapter_id!r} is still loading after {timeout:.0f} s") from e


def load_failure_reason(error: BaseException) -> str:
    """The `reason` label of quiver_adapter_load_failures_total."""
    if isinstance(error, AdapterFormatError):
        return "format"
    if isinstance(error, AdapterPathError):
        return "path"
    if isinstance(error, AdapterNotFound):  # loader.AdapterVanished
        return "missing"
    if isinstance(error, AdapterBusy):
        return "busy"
    if isinstance(error, OSError):
        return "io"
    return "other"


def quiver_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("quiver")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0+unknown"
