"""Iteration-level continuous batching over one decoder, every row with its own adapter.

Each `step()` builds one packed batch and runs one forward:

    1. reap      cancelled / timed-out sequences give back their KV blocks and adapter slot
    2. decode    every running sequence that has sampled before feeds its last token (1 row each)
    3. prefill   running prefills continue, then waiting requests are admitted, their prompts
                 chunked so the step stays under `max_batch_tokens` (decodes keep flowing)
    4. forward   tokens [T], positions [T], AttentionBatch (KV cache rows), AdapterBatch (slots)
    5. sample    one token for every row whose pending tokens are all in the cache now
    6. report    detokenise, check stops, hand an `Output` to the request's callback

Admission takes an adapter slot (`AdapterRegistry.acquire`) and KV blocks for the first chunk.
It first looks the request's rows (the adapter's virtual tokens, then prompt + anything already
generated) up in the prefix table (runtime/nn/kv_cache.py): the longest cached run of full
blocks under the same adapter and load generation is held read-only and not computed again; the
last token always is (its logits give the next token). After each forward, the blocks a
sequence has just filled are entered in the table. With `prefix_cache` off only the adapter's
virtual-token blocks are shared (held once per adapter, never copied per request).
Waiting requests are kept per adapter and admitted round-robin across adapters, so one busy
adapter cannot starve the others. When the cache cannot hold a decode step, the most recently
admitted sequence is preempted: its blocks are freed and it re-queues at the front to be
recomputed (prompt + what it generated so far) when room returns. Nothing fails for lack of KV.

The engine is single-threaded: `add` and `cancel` may be called from any thread (they go
through an inbox); `step` runs on one thread (runtime/engine/loop.py drives it for the server).

Intake (`add`) refuses up front what could never run, so nothing fails later for a reason known
at the door: an adapter that is not registered (AdapterNotFound), a prompt that with the
adapter's virtual tokens and max_new_tokens exceeds the context or the KV budget, or token ids
outside the vocabulary (InvalidParams), a full queue (QueueFull). An accepted request holds a
reference on its adapter until it finishes (AdapterRegistry.retain), so unloading the adapter
never strands it, queued or running.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass

import torch

from runtime.adapters.registry import AdapterNotFound, AdapterRegistry, NoFreeSlot
from runtime.engine.detokenize import IncrementalDetokenizer
from runtime.engine.params import InvalidParams, StopReason
from runtime.engine.request import GenerationRequest, Output, Phase, Sequence, TokenInfo
from runtime.engine.sampling import generator_for, sample
from runtime.engine.stopping import StopChecker
from runtime.nn.adapter_batch import AdapterBatch
from runtime.nn.attention import AttentionBatch
from runtime.nn.kv_cache import VIRTUAL_TOKEN, CacheFull, KVCache
from runtime.nn.model import DecoderModel


@dataclass
class EngineConfig:
    max_batch_tokens: int = 512  # tokens per forward (prefill chunks + decode rows)
    max_running: int = 64  # sequences admitted at once
    kv_cache_tokens: int = 32768  # KV budget over all sequences (prefixes included)
    kv_block_size: int = 16
    max_queue: int = 0  # requests accepted but not running beyond which add() refuses; 0 = no cap
    #: reuse cached full blocks of earlier prompts with the same adapter and prefix (kv_cache.py);
    #: off, only adapters' virtual-token blocks are shared
    prefix_cache: bool = True
    kv_preallocate: bool = False  # allocate the whole KV budget at start-up (memory stays put)


class QueueFull(RuntimeError):
    """`max_queue` requests are already waiting; the client should retry later."""


@dataclass
class StepStats:
    rows: int = 0
    tokens: int = 0
    decode_rows: int = 0
    prefill_tokens: int = 0
    duration_s: float = 0.0
    preempted: int = 0


@dataclass
class PrefixCacheStats:
    """Cumulative, in tokens of the requests' own rows (virtual tokens not counted): `queries`
    looked up at admission, `hits` of them served from cached blocks instead of computed."""

    queries: int = 0
    hits: int = 0


class Engine:
    def __init__(self, model: DecoderModel, tokenizer, registry: AdapterRegistry,
                 config: EngineConfig | None = None):
        self.model, self.tokenizer, self.registry = model, tokenizer, registry
        self.config = config or EngineConfig()
        dev = model.model.norm.weight.device
        self.device = dev
        self.cache = KVCache(model.cfg, max_tokens=self.config.kv_cache_tokens,
                             block_size=self.config.kv_block_size, dtype=model.dtype, device=dev,
                             preallocate=self.config.kv_preallocate)
        self.prefix_stats = PrefixCacheStats()
        self.eos_ids = set(model.cfg.eos_token_ids)
        self.running: list[Sequence] = []
        self.waiting: OrderedDict[str, deque[Sequence]] = OrderedDict()  # adapter -> FIFO
        self._inbox: deque = deque()
        self._lock = threading.Lock()
        self._in_flight = 0  # accepted by add(), not finished yet (guarded by _lock)
        self.last_stats = StepStats()

    # ---- intake (any thread) -----------------------------------------------------------------
    def add(self, req: GenerationRequest) -> None:
        """Accept a request (any thread), or raise and keep nothing (module docstring)."""
        adapter = self.registry.retain(req.adapter_id) if req.adapter_id else None
        try:
            self.check_fits(req, adapter.num_virtual_tokens if adapter is not None else 0)
            with self._lock:
                queued = self._in_flight - len(self.running)
                if self.config.max_queue and queued >= self.config.max_queue:
                    raise QueueFull(f"{queued} requests are waiting (--max-queue "
                                    f"{self.config.max_queue}); retry later")
                self._in_flight += 1
                self._inbox.append(("add", req))
        except BaseException:
            if adapter is not None:
                self.registry.unretain(req.adapter_id)
            raise

    def check_fits(self, req: GenerationRequest, num_virtual_tokens: int = 0) -> None:
        """InvalidParams unless the prompt is non-empty, in the vocabulary, and prompt + the
        adapter's virtual tokens + max_new_tokens fit both the model's context and the KV budget
        (a request larger than the whole cache could never be admitted)."""
        ids, cfg = req.prompt_ids, self.model.cfg
        if not ids:
            raise InvalidParams("prompt", "is empty: send text, token ids or messages")
        if min(ids) < 0 or max(ids) >= cfg.vocab_size:
            bad = next(i for i in ids if not 0 <= i < cfg.vocab_size)
            raise InvalidParams("input_ids", f"token id {bad} is outside the vocabulary "
                                             f"[0, {cfg.vocab_size})")
        total = len(ids) + num_virtual_tokens + req.stopping.max_new_tokens
        for limit, what in ((cfg.max_position_embeddings, "the model's context"),
                            (self.config.kv_cache_tokens, "the KV cache budget (--kv-cache-tokens)")):
            if total > limit:
                raise InvalidParams(
                    "prompt", f"{len(ids)} prompt tokens + {num_virtual_tokens} adapter virtual "
                              f"tokens + max_new_tokens {req.stopping.max_new_tokens} = {total} "
                              f"exceeds {what} of {limit} tokens; shorten the prompt, lower "
                              "max_new_tokens, or set truncate_prompt to drop its oldest tokens")

    def num_queued(self) -> int:
        """Requests accepted and not running (inbox, waiting, preempted); any thread."""
        with self._lock:
            return self._in_flight - len(self.running)

    def cancel(self, request_id: str) -> None:
        with self._lock:
            self._inbox.append(("cancel", request_id))

    def has_work(self) -> bool:
        with self._lock:
            return bool(self._inbox or self.running or any(self.waiting.values()))

    @property
    def num_waiting(self) -> int:
        return sum(len(q) for q in self.waiting.values())

    def _drain_inbox(self) -> None:
        with self._lock:
            items, self._inbox = list(self._inbox), deque()
        for kind, item in items:
            if kind == "add":
                self._enqueue(self._new_sequence(item))
            else:
                self._mark_cancelled(item)

    def _new_sequence(self, req: GenerationRequest) -> Sequence:
        return Sequence(
            req=req,
            detok=IncrementalDetokenizer(self.tokenizer, req.prompt_ids),
            stop=StopChecker(req.stopping, self.eos_ids),
            generator=generator_for(req.sampling.seed, self.device),
        )

    def _enqueue(self, seq: Sequence, front: bool = False) -> None:
        q = self.waiting.setdefault(seq.req.adapter_id, deque())
        q.appendleft(seq) if front else q.append(seq)

    def _mark_cancelled(self, request_id: str) -> None:
        for seq in self.running + [s for q in self.waiting.values() for s in q]:
            if seq.req.request_id == request_id:
                seq.cancelled = True

    # ---- one iteration -----------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> StepStats:
        t0 = time.monotonic()
        self._drain_inbox()
        self._reap()
        stats = StepStats()
        plan = self._plan(stats)  # [(seq, q_len)]
        if plan:
            self._run(plan)
        stats.rows, stats.tokens = len(plan), sum(n for _, n in plan)
        stats.duration_s = time.monotonic() - t0
        self.last_stats = stats
        return stats

    def _reap(self) -> None:
        now = time.monotonic()
        for seq in list(self.running):
            if seq.cancelled:
                self._finish(seq, StopReason.CANCELLED)
            elif seq.stop.time_expired(now):
                self._finish(seq, StopReason.TIME_LIMIT)
        for adapter_id, q in self.waiting.items():
            for seq in list(q):
                if seq.cancelled or seq.stop.time_expired(now):
                    q.remove(seq)
                    self._finish(seq, StopReason.CANCELLED if seq.cancelled else StopReason.TIME_LIMIT)

    def _plan(self, stats: StepStats) -> list[tuple[Sequence, int]]:
        budget = self.config.max_batch_tokens
        plan: list[tuple[Sequence, int]] = []
        decoders = [s for s in self.running if s.pending == 1 and s.output_ids]
        for seq in decoders:
            if budget <= 0:
                break
            if seq.phase is not Phase.RUNNING:
                continue  # preempted for an earlier decoder's room: it holds no blocks now
            if self._reserve_or_preempt(seq, 1, stats):
                plan.append((seq, 1))
                budget -= 1
        plan = [(s, n) for s, n in plan if s.phase is Phase.RUNNING]  # drop the preempted
        stats.decode_rows = len(plan)
        for seq in [s for s in self.running if s not in decoders and s.pending > 0]:
            budget = self._plan_prefill(seq, budget, plan)
        while budget > 0 and len(self.running) < self.config.max_running:
            seq = self._admit_next()
            if seq is None:
                break
            budget = self._plan_prefill(seq, budget, plan)
        if not plan and len(self.running) > 1:
            # Every admitted prefill is stuck on a full cache: free the newest so others finish.
            self._preempt(self.running[-1])
            stats.preempted += 1
        stats.prefill_tokens = sum(n for _, n in plan) - stats.decode_rows
        return plan

    def _plan_prefill(self, seq: Sequence, budget: int, plan: list) -> int:
        n = min(seq.pending, budget)
        if n <= 0:
            return budget
        try:
            self.cache.reserve(seq.kv, n)
        except CacheFull:
            return 0  # no room this step; it stays running and continues next step
        plan.append((seq, n))
        return budget - n

    def _reserve_or_preempt(self, seq: Sequence, n: int, stats: StepStats) -> bool:
        while True:
            try:
                self.cache.reserve(seq.kv, n)
                return True
            except CacheFull:
                victim = self.running[-1]
                self._preempt(victim)
                stats.preempted += 1
                if victim is seq:
                    return False

    def _preempt(self, seq: Sequence) -> None:
        """Free a running sequence's KV; it re-queues first in line and is recomputed later."""
        self.cache.free(seq.kv)
        self.running.remove(seq)
        self._release_adapter(seq)
        seq.fed, seq.prefix_len, seq.phase = 0, 0, Phase.WAITING
        self._enqueue(seq, front=True)

    def _admit_next(self) -> Sequence | None:
        """Round-robin over adapters with waiting requests; FIFO within an adapter."""
        for adapter_id in list(self.waiting):
            q = self.waiting[adapter_id]
            if not q:
                del self.waiting[adapter_id]
                continue
            seq = q[0]
            if not self._admit(seq):
                continue
            q.popleft()
            self.waiting.move_to_end(adapter_id)  # next admission starts with another adapter
            if not q:
                del self.waiting[adapter_id]
            return seq
        return None

    def _admit(self, seq: Sequence) -> bool:
        adapter_id = seq.req.adapter_id
        state = None
        if adapter_id:
            try:
                seq.slot, state = self.registry.acquire(adapter_id)
            except NoFreeSlot:
                return False
            except AdapterNotFound as e:
                self._fail_waiting(seq, str(e))
                return False
        try:
            self._attach_cache(seq, state)
        except CacheFull:
            self._release_adapter(seq)
            self.cache.free(seq.kv)
            return False
        seq.phase, seq.admitted_at = Phase.RUNNING, seq.admitted_at or time.monotonic()
        self.running.append(seq)
        return True

    def _attach_cache(self, seq: Sequence, state) -> None:
        """Start `seq`'s KV on the longest cached run of its rows (virtual + prompt + generated
        so far), then write what is left of the adapter's virtual-token KV; `seq.fed` = tokens
        found in the cache. The last token is never matched: its logits are needed."""
        n_virtual = state.num_prefix_tokens if state is not None else 0
        rows = self._cache_rows(seq, n_virtual, len(seq.tokens))
        bs = self.cache.block_size
        limit = (len(rows) - 1) // bs if self.config.prefix_cache else n_virtual // bs
        namespace = self._namespace(seq)
        self.cache.match(seq.kv, namespace, rows, limit)
        if n_virtual:
            self.cache.write_prefix(seq.kv, state.kv_prefix)
            self.cache.register(seq.kv, rows, n_virtual // bs)
        seq.prefix_len = n_virtual
        seq.fed = seq.kv.length - n_virtual
        self.prefix_stats.queries += len(seq.tokens)
        self.prefix_stats.hits += seq.fed

    def _namespace(self, seq: Sequence) -> tuple[str, int]:
        """Whose KV the blocks hold: the adapter and its load generation (a reloaded adapter
        never meets its old blocks); ("", 0) for the base model."""
        adapter_id = seq.req.adapter_id
        return (adapter_id, self.registry.generation(adapter_id)) if adapter_id else ("", 0)

    @staticmethod
    def _cache_rows(seq: Sequence, n_virtual: int, n_tokens: int) -> list[int]:
        """The token id of each KV row 0..n_virtual+n_tokens-1 (VIRTUAL_TOKEN for virtual rows)."""
        return [VIRTUAL_TOKEN] * n_virtual + seq.tokens[:n_tokens]

    def _register_blocks(self, seq: Sequence) -> None:
        """After a forward: enter the blocks `seq` just filled in the prefix table."""
        kv, bs = seq.kv, self.cache.block_size
        full = kv.length // bs
        if full <= kv.hashed:
            return
        limit = full if self.config.prefix_cache else seq.prefix_len // bs
        if limit > kv.hashed:
            self.cache.register(kv, self._cache_rows(seq, seq.prefix_len, seq.fed), limit)

    def fail_running(self, message: str) -> None:
        """After a failed step: end every running sequence with ERROR and free what it held."""
        for seq in list(self.running):
            self._finish(seq, StopReason.ERROR, error=message)

    def abort_all(self, message: str) -> None:
        """Once no thread steps the engine any more: end every request it still holds (ERROR),
        queued ones included, so that no caller waits forever on a stream."""
        self._drain_inbox()
        self.fail_running(message)
        for q in self.waiting.values():
            for seq in list(q):
                q.remove(seq)
                self._finish(seq, StopReason.ERROR, error=message)
        self.waiting.clear()

    def _fail_waiting(self, seq: Sequence, message: str) -> None:
        self.waiting[seq.req.adapter_id].remove(seq)
        self._finish(seq, StopReason.ERROR, error=message)

    # ---- forward + sample ---------------------------------------------------------------------
    def _run(self, plan: list[tuple[Sequence, int]]) -> None:
        # Rows of one adapter side by side: each adapter's tokens form one run, and the LoRA
        # runs path pays one matmul pair per adapter rather than per row (runtime/nn/lora.py).
        plan = sorted(plan, key=lambda p: p[0].slot)
        seqs = [s for s, _ in plan]
        q_lens = [n for _, n in plan]
        tokens, positions, logit_rows, sampled = [], [], [], []
        start = 0
        for seq, n in plan:
            toks = seq.tokens[seq.fed: seq.fed + n]
            tokens.extend(toks)
            positions.extend(range(seq.kv.length, seq.kv.length + n))
            start += n
            if seq.fed + n == len(seq.tokens):  # all pending tokens fed: sample the next one
                logit_rows.append(start - 1)
                sampled.append(seq)
        attn = AttentionBatch.with_cache(self.cache, [s.kv for s in seqs], q_lens)
        lora, dora, emb = self.registry.slot_sets()
        ab = AdapterBatch.build([s.slot for s in seqs], q_lens, self.registry.none_slot,
                                lora_slots=lora, dora_slots=dora, embedding_slots=emb,
                                device=self.device, dtype=self.model.dtype)
        logits = self.model(torch.tensor(tokens, device=self.device),
                            torch.tensor(positions, device=self.device), attn, ab,
                            logits_rows=torch.tensor(logit_rows, dtype=torch.long, device=self.device))
        attn.commit()
        for seq, n in plan:
            seq.fed += n
            self._register_blocks(seq)
        if sampled:
            self._sample_and_report(sampled, logits)

    def _sample_and_report(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        top_n = max(s.req.options.top_n for s in seqs)
        need_prev = any(s.req.sampling.repetition_penalty != 1.0 for s in seqs)
        prev = [torch.tensor(s.tokens, device=self.device) if need_prev else None for s in seqs]
        gen = [torch.tensor(s.output_ids, dtype=torch.long) if s.req.sampling.has_output_penalty
               else None for s in seqs]  # presence / frequency penalties: generated ids only
        result = sample(logits, [s.req.sampling for s in seqs], [s.generator for s in seqs],
                        prev, [s.stop.suppressed_ids() for s in seqs], top_n=top_n,
                        output_tokens=gen, logprobs=any(s.req.options.logprobs for s in seqs))
        tokens = result.tokens.tolist()
        logprobs = result.logprobs.tolist()
        for i, seq in enumerate(seqs):
            top = []
            if seq.req.options.top_n:
                n = seq.req.options.top_n
                top = list(zip(result.top_ids[i, :n].tolist(), result.top_logprobs[i, :n].tolist()))
            self._advance(seq, tokens[i], logprobs[i], top)

    def _advance(self, seq: Sequence, token: int, logprob: float, top) -> None:
        now = time.monotonic()
        seq.output_ids.append(token)
        if seq.first_token_at is None:
            seq.first_token_at = now
        delta = seq.detok.push(token)
        outcome = seq.stop.step(token, delta)
        info = TokenInfo(token, delta, logprob, top)
        if outcome.stop is not None:
            text = outcome.emit_text
            if outcome.stop in (StopReason.MAX_TOKENS, StopReason.TIME_LIMIT):
                text += seq.detok.finish()  # bytes of a character cut off by the limit
            self._finish(seq, outcome.stop, text=text, tokens=[info])
        else:
            self._emit(seq, outcome.emit_text, [info])

    # ---- reporting ----------------------------------------------------------------------------
    def _emit(self, seq: Sequence, text: str, tokens: list[TokenInfo], finished: bool = False,
              reason: StopReason | None = None, error: str | None = None) -> None:
        cb = seq.req.on_output
        if cb is None:
            return
        queue_t = (seq.admitted_at - seq.arrival) if seq.admitted_at else 0.0
        ttft = (seq.first_token_at - seq.arrival) if seq.first_token_at else None
        cb(Output(seq.req.request_id, text, tokens, len(seq.req.prompt_ids), len(seq.output_ids),
                  finished, reason, error, queue_t, ttft))

    def _finish(self, seq: Sequence, reason: StopReason, text: str | None = None,
                tokens: list[TokenInfo] | None = None, error: str | None = None) -> None:
        if text is None:
            text = seq.stop.flush(reason)
        if seq.phase is Phase.RUNNING:
            self.running.remove(seq)
            self.cache.free(seq.kv)
            self._release_adapter(seq)
        seq.phase = Phase.FINISHED
        if seq.req.adapter_id:
            self.registry.unretain(seq.req.adapter_id)
        with self._lock:
            self._in_flight -= 1
        self._emit(seq, text, tokens or [], True, reason, error)

    def _release_adapter(self, seq: Sequence) -> None:
        if seq.slot >= 0 and seq.req.adapter_id:
            self.registry.release(seq.req.adapter_id)
        seq.slot = -1

    # ---- convenience: run to completion (CLI, tests) ------------------------------------------
    def generate(self, requests: list[GenerationRequest]) -> list["Completion"]:
        """Run the given requests to completion in one continuous batch."""
        done: dict[str, Completion] = {}
        for req in requests:
            comp = done[req.request_id] = Completion(req.request_id)
            req.on_output = comp.add
            self.add(req)
        while self.has_work():
            self.step()
        return [done[r.request_id] for r in requests]


@dataclass
class Completion:
    """All Outputs of one request folded together."""

    request_id: str
    text: str = ""
    token_ids: list[int] = None
    tokens: list[TokenInfo] = None
    stop_reason: StopReason | None = None
    error: str | None = None
    input_token_count: int = 0

    def __post_init__(self) -> None:
        self.token_ids, self.tokens = [], []

    def add(self, out: Output) -> None:
        self.text += out.text
        self.tokens.extend(out.tokens)
        self.token_ids.extend(t.token_id for t in out.tokens)
        self.input_token_count = out.input_token_count
        if out.finished:
            self.stop_reason, self.error = out.stop_reason, out.error
