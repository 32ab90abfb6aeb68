"""The paged decode-attention kernel (csrc/paged_attention.cpp) against the plain reference.

`attend` takes the kernel for decode rows over a CPU fp32 cache; `attend_reference` is the
per-row explicit softmax that defines attention here. Shapes cover MHA and GQA groups, head
dims, block sizes, ragged histories, non-consecutive blocks and sliding windows; bad metadata is
an error, not a read outside the pool.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.config import ModelConfig
from runtime.nn import native
from runtime.nn.attention import AttentionBatch, attend, attend_reference
from runtime.nn.kv_cache import KVCache, SeqCache

pytestmark = pytest.mark.skipif(native.extension() is None, reason="the C++ extension is not built")


def config(heads: int, kv_heads: int, head_dim: int) -> ModelConfig:
    return ModelConfig(architecture="llama", vocab_size=32, hidden_size=heads * head_dim,
                       intermediate_size=64, num_layers=2, num_heads=heads, num_kv_heads=kv_heads,
                       head_dim=head_dim, rms_norm_eps=1e-6, max_position_embeddings=4096,
                       tie_word_embeddings=True)


def decode_batch(cfg, histories, block_size, seed, window=None, scatter=True):
    g = torch.Generator().manual_seed(seed)
    cache = KVCache(cfg, max_tokens=16384, block_size=block_size)
    seqs, spacer = [SeqCache() for _ in histories], SeqCache()
    for s, n in zip(seqs, histories):
        for _ in range(n + 1):  # one row at a time, a spacer block between blocks: tables scatter
            had = len(s.blocks)
            cache.reserve(s, 1)
            s.length += 1
            if scatter and len(s.blocks) > had:
                cache.reserve(spacer, block_size)
                spacer.length += block_size
        s.length = n
    cache.pool.copy_(torch.randn(cache.pool.shape, generator=g))
    attn = AttentionBatch.with_cache(cache, seqs, [1] * len(seqs))
    attn.prepare(window)
    T = len(seqs)
    q = torch.randn(T, cfg.num_heads, cfg.head_dim, generator=g)
    k = torch.randn(T, cfg.num_kv_heads, cfg.head_dim, generator=g)
    v = torch.randn(T, cfg.num_kv_heads, cfg.head_dim, generator=g)
    return cache, attn, q, k, v


shapes = st.fixed_dictionaries({
    "heads": st.sampled_from([(4, 4), (4, 2), (9, 3), (8, 1)]),
    "head_dim": st.sampled_from([8, 16, 64]),
    "block_size": st.sampled_from([1, 4, 16]),
    "histories": st.lists(st.integers(0, 70), min_size=1, max_size=6),
    "window": st.sampled_from([None, 1, 5, 32]),
    "seed": st.integers(0, 1000),
})


@settings(max_examples=40, deadline=None)
@given(shapes)
def test_paged_kernel_equals_the_reference(case):
    cfg = config(*case["heads"], case["head_dim"])
    cache, attn, q, k, v = decode_batch(cfg, case["histories"], case["block_size"], case["seed"],
                                        case["window"])
    assert attn.decode_lens is not None  # the kernel's path, not SDPA
    ref_cache = KVCache(cfg, max_tokens=4096, block_size=case["block_size"])
    ref_cache.pool = cache.pool.clone()
    ref_attn = AttentionBatch.with_cache(ref_cache, [r.seq for r in attn.rows], [1] * len(attn.rows))
    ref_attn.sliding_window = case["window"]
    for layer in range(cfg.num_layers):
        got = attend(attn, layer, q, k, v)
        ref = attend_reference(ref_attn, layer, q, k, v)
        torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-5)
    assert torch.equal(cache.pool, ref_cache.pool)  # both wrote the new keys into the same rows


@pytest.mark.parametrize("sharpness", [0.01, 8.0, 40.0])
def test_flat_and_sharp_softmax(sharpness):
    """The kernel's vector exp over the whole range the scores take: near-uniform weights, and
    scores hundreds apart (most weights underflow to zero, as in an fp32 softmax)."""
    cfg = config(9, 3, 64)
    cache, attn, q, k, v = decode_batch(cfg, [3, 40, 130], 16, seed=9)
    q = q * sharpness
    ref_cache = KVCache(cfg, max_tokens=16384, block_size=16)
    ref_cache.pool = cache.pool.clone()
    ref_attn = AttentionBatch.with_cache(ref_cache, [r.seq for r in attn.rows], [1] * 3)
    torch.testing.assert_close(attend(attn, 0, q, k, v), attend_reference(ref_attn, 0, q, k, v),
                               atol=2e-5, rtol=1e-5)


def test_long_context_one_row():
    cfg = config(9, 3, 64)  # SmolLM2's attention shape
    cache, attn, q, k, v = decode_batch(cfg, [1500], 16, seed=3, scatter=False)
    ref_cache = KVCache(cfg, max_tokens=4096, block_size=16)
    ref_cache.pool = cache.pool.clone()
    ref_attn = AttentionBatch.with_cache(ref_cache, [attn.rows[0].seq], [1])
    torch.testing.assert_close(attend(attn, 1, q, k, v), attend_reference(ref_attn, 1, q, k, v),
                               atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("histories, window", [([1500, 10], None), ([900, 300, 5], 400), ([700], 3)])
def test_split_keys_merge_to_the_reference(histories, window):
    """Few rows, many keys: each row's keys are split into chunks attended in parallel and merged
    by their softmax maxima (a short row gets empty chunks; a window cuts the first ones)."""
    cfg = config(9, 3, 64)
    cache, attn, q, k, v = decode_batch(cfg, histories, 16, seed=5, window=window)
    ref_cache = KVCache(cfg, max_tokens=16384, block_size=16)
    ref_cache.pool = cache.pool.clone()
    ref_attn = AttentionBatch.with_cache(ref_cache, [r.seq for r in attn.rows], [1] * len(histories))
    ref_attn.sliding_window = window
    saved = torch.get_num_threads()
    for threads in (1, 2, 4):  # how many chunks depends on the threads
        torch.set_num_threads(threads)
        try:
            got = attend(attn, 0, q, k, v)
        finally:
            torch.set_num_threads(saved)
        torch.testing.assert_close(got, attend_reference(ref_attn, 0, q, k, v), atol=2e-5, rtol=1e-5)


def test_bad_metadata_is_an_error_not_a_wild_read():
    cfg = config(4, 2, 16)
    cache, attn, q, _, _ = decode_batch(cfg, [5, 9], 4, seed=0)
    kernel = native.paged_attention(cache)
    table, lens, los = attn.decode_table, attn.decode_lens, attn.decode_los
    bad = table.clone()
    bad[1, 0] = cache.capacity_blocks + 7
    with pytest.raises(RuntimeError, match="names block"):
        kernel(q, cache.pool, 0, bad, lens, los)
    with pytest.raises(RuntimeError, match="sees keys"):
        kernel(q, cache.pool, 0, table, lens * 0, los)  # no visible key
    with pytest.raises(RuntimeError, match="sees keys"):
        kernel(q, cache.pool, 0, table[:, :1], lens, los)  # more keys than the table holds


def test_not_used_for_other_dtypes():
    cfg = config(4, 2, 16)
    cache = KVCache(cfg, max_tokens=64, block_size=4, dtype=torch.bfloat16)
    assert native.paged_attention(cache) is None  # bf16 cache: SDPA over gathered keys
