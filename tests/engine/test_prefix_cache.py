"""Automatic prefix caching and shared virtual-token KV (runtime/nn/kv_cache.py, engine.py).

The reference is the same engine with `prefix_cache=False`: every test runs the same requests,
arriving at the same steps, through both, and asks for the same tokens, for every adapter type
and for mixed batches, greedy and seeded sampling, across evictions, preemptions and a reload.
Each test also checks that the cache really was used (hits, shared blocks), so that an engine
that silently stopped caching could not pass, and that every block's reference count is back
to zero once the requests end. Tiny random models and PEFT-made adapters (tests/peft_factory.py).
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime.engine.params import SamplingParams, StoppingParams
from runtime.engine.request import GenerationRequest
from tests.peft_factory import make_peft_adapter, make_tiny_model, make_tiny_tokenizer
from tests.quiver_factory import QuiverStack

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
#: name -> (PEFT kind, options); virtual-token counts chosen against block size 4: 5 leaves a
#: partial block of virtual rows (the request's own first rows share it), 8 fills two blocks
ADAPTERS = {
    "lora": ("lora", dict(target_modules=["q_proj", "v_proj"])),
    "dora": ("lora", dict(target_modules=ALL_LINEAR, use_dora=True)),
    "adalora": ("adalora", dict(target_modules=["q_proj", "v_proj", "gate_proj"])),
    "prompt": ("prompt_tuning", dict(num_virtual_tokens=5)),
    "ptuning": ("p_tuning", dict(num_virtual_tokens=8)),
    "prefix": ("prefix_tuning", dict(num_virtual_tokens=8)),
    "prefix3": ("prefix_tuning", dict(num_virtual_tokens=3)),
}
NAMES = ["", *ADAPTERS]  # "" = the base model
BLOCK = 4
SYSTEM = [5, 17, 99, 3, 42, 8, 77, 12, 64, 31, 2, 90, 7, 19]  # 14 tokens: 3 full blocks + 2


@pytest.fixture(scope="module")
def llama():
    return make_tiny_model("llama", seed=0)


@pytest.fixture(scope="module")
def adapter_dirs(llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("prefix-adapters")
    return {name: make_peft_adapter(llama, kind, root / name, seed=i + 1, **opts)
            for i, (name, (kind, opts)) in enumerate(ADAPTERS.items())}


@pytest.fixture(scope="module")
def stack(llama, adapter_dirs):
    q = QuiverStack.from_hf(llama, slots=len(ADAPTERS))
    for name, path in adapter_dirs.items():
        q.load(name, path)
    return q


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(make_tiny_tokenizer(tmp_path_factory.mktemp("tok"))))


def request(ids, adapter="", n=8, seed=None):
    sampling = SamplingParams() if seed is None else SamplingParams(temperature=0.9, top_k=40, seed=seed)
    return GenerationRequest(list(ids), adapter_id=adapter, sampling=sampling,
                             stopping=StoppingParams(max_new_tokens=n, ignore_eos=True))


def drive(engine, arrivals):
    """Run requests through `engine`; arrivals: [(step index at which it is added, request)].
    Checks the cache's invariants after every step; returns each request's token ids."""
    done = {}

    def collect(out):
        done.setdefault(out.request_id, []).extend(t.token_id for t in out.tokens)

    pending = sorted(arrivals, key=lambda a: a[0])
    step = 0
    while pending or engine.has_work():
        while pending and pending[0][0] <= step:
            req = pending.pop(0)[1]
            req.on_output = collect
            engine.add(req)
        engine.step()
        engine.cache.check([s.kv for s in engine.running])
        step += 1
    return [done[r.request_id] for _, r in arrivals]


def clone(arrivals):
    """The same requests with fresh ids (a request object goes through one engine)."""
    return [(t, GenerationRequest(list(r.prompt_ids), r.adapter_id, r.sampling, r.stopping))
            for t, r in arrivals]


def both(stack, tokenizer, arrivals, **kw):
    """(with the prefix cache, without it, the cached engine): the same requests through each."""
    cached = stack.engine(tokenizer, kv_block_size=BLOCK, **kw)
    plain = stack.engine(tokenizer, kv_block_size=BLOCK, prefix_cache=False, **kw)
    got = drive(cached, clone(arrivals))
    want = drive(plain, clone(arrivals))
    assert_released(cached)
    assert_released(plain)
    return got, want, cached


def assert_released(engine):
    cache = engine.cache
    assert cache.used_blocks == 0
    assert all(cache.refcount(b) == 0 for b in range(cache.capacity_blocks))
    cache.check([])


def shared_prompts(adapter, k=4, seed=None):
    """A first request alone, then k-1 more with the same system prompt and other user turns."""
    first = [(0, request(SYSTEM + [11, 13], adapter, seed=seed))]
    later = [(12, request(SYSTEM + [20 + i] * (1 + i), adapter, seed=None if seed is None else seed + i))
             for i in range(1, k)]
    return first + later


@pytest.mark.parametrize("sampling_seed", [None, 1234], ids=["greedy", "seeded"])
@pytest.mark.parametrize("name", NAMES, ids=[n or "base" for n in NAMES])
def test_outputs_equal_without_cache(stack, tokenizer, name, sampling_seed):
    got, want, engine = both(stack, tokenizer, shared_prompts(name, seed=sampling_seed))
    assert got == want
    # the three later requests each found the system prompt's full blocks in the cache
    n_virtual = {"prompt": 5, "ptuning": 8, "prefix": 8, "prefix3": 3}.get(name, 0)
    per_request = (n_virtual + len(SYSTEM)) // BLOCK * BLOCK - n_virtual
    assert engine.prefix_stats.hits >= 3 * per_request > 0


def test_mixed_batch_all_types_equal_without_cache(stack, tokenizer):
    """Every adapter and the base at once, all with the same tokens: each adapter reuses only
    its own blocks (a LoRA adapter's KV is never served to another adapter or the base)."""
    arrivals = [(0, request(SYSTEM + [1], name)) for name in NAMES]
    arrivals += [(10, request(SYSTEM + [2, 3], name, seed=7 if i % 2 else None)) for i, name in enumerate(NAMES)]
    got, want, engine = both(stack, tokenizer, arrivals, max_batch_tokens=40)
    assert got == want
    assert engine.prefix_stats.hits > 0


def test_no_kv_shared_across_adapters(stack, tokenizer):
    """A prompt cached under the base is no hit for an adapter, nor one adapter's for another."""
    engine = stack.engine(tokenizer, kv_block_size=BLOCK)
    drive(engine, [(0, request(SYSTEM, ""))])
    hits = engine.prefix_stats.hits
    drive(engine, [(0, request(SYSTEM, "lora")), (0, request(SYSTEM, "dora"))])
    assert engine.prefix_stats.hits == hits
    drive(engine, [(0, request(SYSTEM, "lora"))])
    assert engine.prefix_stats.hits == hits + len(SYSTEM) // BLOCK * BLOCK
    assert_released(engine)


def test_equal_after_evictions(stack, tokenizer):
    """A budget far below what the prompts would keep cached: blocks are evicted LRU and
    later requests recompute what was dropped, with the same tokens as without the cache."""
    arrivals = []
    for wave in range(4):
        for i, name in enumerate(["", "lora", "prompt", "prefix"]):
            stem = SYSTEM if (wave + i) % 2 else SYSTEM[::-1]
            arrivals.append((wave * 12, request(stem + [wave, i], name, n=6)))
    got, want, engine = both(stack, tokenizer, arrivals, kv_cache_tokens=96, max_running=4)
    assert got == want
    assert engine.cache.evicted_blocks > 0 and engine.prefix_stats.hits > 0


def test_equal_across_preemptions(stack, tokenizer):
    """Too little KV for the running set: sequences are preempted and recomputed (their own
    cached blocks found again), tokens equal to the run without the cache."""
    arrivals = [(0, request(SYSTEM + [i] * 6, NAMES[i % len(NAMES)], n=24, seed=i if i % 3 else None))
                for i in range(10)]
    cached = stack.engine(tokenizer, kv_block_size=BLOCK, kv_cache_tokens=160)
    plain = stack.engine(tokenizer, kv_block_size=BLOCK, kv_cache_tokens=160, prefix_cache=False)
    preempted = [0, 0]
    for k, engine in enumerate((cached, plain)):
        step = engine.step

        def counting(step=step, k=k):
            stats = step()
            preempted[k] += stats.preempted
            return stats
        engine.step = counting
    got, want = drive(cached, clone(arrivals)), drive(plain, clone(arrivals))
    assert got == want
    assert preempted[0] > 0 and preempted[1] > 0
    assert cached.prefix_stats.hits > 0
    assert_released(cached)


def test_reload_invalidates_blocks(stack, tokenizer, adapter_dirs):
    """An adapter id unloaded and loaded again with other weights: its old blocks are never
    served (the load generation is in the key); the outputs are the new adapter's."""
    engine = stack.engine(tokenizer, kv_block_size=BLOCK)
    prompt = SYSTEM + [3, 1]
    before = drive(engine, [(0, request(prompt, "lora"))])
    hits = engine.prefix_stats.hits
    stack.registry.remove("lora")
    stack.load("lora", adapter_dirs["dora"])  # same id, other weights
    try:
        after = drive(engine, [(0, request(prompt, "lora"))])
        assert engine.prefix_stats.hits == hits  # nothing of the old generation matched
        want = drive(stack.engine(tokenizer, kv_block_size=BLOCK, prefix_cache=False),
                     [(0, request(prompt, "dora"))])
        assert after == want and after != before
        again = drive(engine, [(0, request(prompt, "lora"))])
        assert again == after and engine.prefix_stats.hits > hits  # the new generation's blocks
    finally:
        stack.registry.remove("lora")
        stack.load("lora", adapter_dirs["lora"])
    assert_released(engine)


def test_cancel_and_unload_with_requests_in_flight(stack, tokenizer, adapter_dirs):
    """Cancelled requests and an adapter unloaded under running ones give their blocks back;
    a block another request holds is never freed under it."""
    engine = stack.engine(tokenizer, kv_block_size=BLOCK)
    reqs = [request(SYSTEM + [i], "prefix", n=30) for i in range(4)]
    for r in reqs:
        engine.add(r)
    for _ in range(3):
        engine.step()
    shared = engine.running[0].kv.blocks[:2]  # the 8 virtual rows: two shared blocks
    assert all(s.kv.blocks[:2] == shared for s in engine.running)
    assert engine.cache.refcount(shared[0]) == 4
    engine.cancel(reqs[0].request_id)
    stack.registry.remove("prefix")  # in flight: dropped when the last one ends
    engine.step()
    assert engine.cache.refcount(shared[0]) == 3
    engine.cache.check([s.kv for s in engine.running])
    while engine.has_work():
        engine.step()
    assert_released(engine)
    stack.load("prefix", adapter_dirs["prefix"])


@pytest.mark.parametrize("prefix_cache", [True, False])
def test_virtual_tokens_held_once(stack, tokenizer, prefix_cache):
    """Many requests of one prefix-tuning adapter: its 8 virtual rows live in two blocks that
    every request references (with or without the prompt prefix cache), not one copy each."""
    engine = stack.engine(tokenizer, kv_block_size=BLOCK, prefix_cache=prefix_cache)
    for i in range(12):
        engine.add(request([i + 1, 2 * i + 3, 7], "prefix", n=4))
    engine.step()
    assert len(engine.running) == 12
    heads = {tuple(s.kv.blocks[:2]) for s in engine.running}
    assert len(heads) == 1
    assert engine.cache.refcount(next(iter(heads))[0]) == 12
    tails = [b for s in engine.running for b in s.kv.blocks[2:]]
    assert len(tails) == len(set(tails))  # everything after the virtual rows is private
    while engine.has_work():
        engine.step()
    assert_released(engine)


@settings(max_examples=12, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 2), st.integers(0, len(NAMES) - 1), st.integers(0, 9),
                          st.integers(0, 30), st.booleans()), min_size=2, max_size=9),
       st.sampled_from([64, 120, 4096]))
def test_property_random_sharing(stack, tokenizer, spec, budget):
    """Random prompts made of a few shared stems, cut at random lengths, under random adapters,
    arriving at random steps, with a KV budget that may force evictions and preemptions: the
    tokens always equal the run without the cache, and every reference is given back."""
    stems = [SYSTEM, SYSTEM[:9] + [60, 61, 62, 63, 64, 65], list(range(30, 50))]
    arrivals = []
    for stem, adapter, cut, tail, seeded in spec:
        ids = stems[stem][: 3 + cut] + [tail % 128, (tail * 7) % 128][: 1 + tail % 2]
        arrivals.append((tail % 6, request(ids, NAMES[adapter], n=5, seed=tail if seeded else None)))
    got, want, _ = both(stack, tokenizer, arrivals, kv_cache_tokens=budget, max_batch_tokens=24)
    assert got == want


def test_prefix_cache_unit_chain_and_lru():
    """The cache alone: a hit needs the whole prefix and the namespace to match; released
    cached blocks are reused before they are evicted, oldest tail first."""
    from runtime.config import ModelConfig
    from runtime.nn.kv_cache import KVCache, SeqCache

    cfg = ModelConfig("llama", vocab_size=16, hidden_size=8, intermediate_size=16, num_layers=1,
                      num_heads=2, num_kv_heads=1, head_dim=4, rms_norm_eps=1e-6,
                      max_position_embeddings=64, tie_word_embeddings=False)
    cache = KVCache(cfg, max_tokens=32, block_size=4, initial_blocks=8)
    toks = list(range(10))
    a = SeqCache()
    assert cache.match(a, "ns", toks, 2) == 0
    cache.reserve(a, 10)
    a.length = 10
    cache.register(a, toks, 99)
    assert a.hashed == 2 and cache.cached_blocks == 2  # full blocks only
    b = SeqCache()
    assert cache.match(b, "ns", toks[:8] + [0, 0], 9) == 8 and b.blocks == a.blocks[:2]
    c, d = SeqCache(), SeqCache()
    assert cache.match(c, "other", toks, 9) == 0
    assert cache.match(d, "ns", [9] + toks[1:], 9) == 0  # first block differs: nothing after it
    cache.check([a, b, c, d])
    for s in (a, b, c, d):
        cache.free(s)
    assert cache.used_blocks == 0 and cache.cached_blocks == 2
    e = SeqCache()
    cache.reserve(e, 4 * 6)  # the 6 free blocks, no eviction yet
    assert cache.cached_blocks == 2 and cache.evicted_blocks == 0
    f = SeqCache()
    cache.reserve(f, 4)  # now the LRU cached block goes: the tail (block 2 of the chain)
    assert cache.evicted_blocks == 1
    g = SeqCache()
    assert cache.match(g, "ns", toks, 9) == 4  # the head is still cached
    cache.check([e, f, g])
