"""The C++ decode layers (runtime/nn/native.py) against the Python modules they mirror.

They issue the same ATen ops in the same order, so a decode step must give the same bits on
both paths: logits and every KV-cache row written. Covered: one row whose keys are a view of the
pool (consecutive blocks), rows over block tables with ragged lengths, a sliding window, biases
on q/k/v (Qwen2), MHA and GQA; and the rule for which steps the C++ path takes.
"""
from __future__ import annotations

import pytest
import torch

from runtime.config import ModelConfig, QuantConfig
from runtime.nn import native
from runtime.nn.adapter_batch import AdapterBatch
from runtime.nn.attention import AttentionBatch
from runtime.nn.kernels import cpu_has_fused_nf4
from runtime.nn.kv_cache import KVCache, SeqCache
from runtime.nn.model import DecoderModel
from tests.nn.conftest import make_hf_model

pytestmark = pytest.mark.skipif(not cpu_has_fused_nf4() or native.extension() is None,
                                reason="needs AVX512-BF16 (the fused kernel) and the built extension")

#: tiny variants whose every projection the fused kernel takes (out % 32, in % 64)
SHAPES = {
    "llama-gqa": ("llama-tied", {}),
    "llama-mha": ("llama-mha", {}),
    "mistral-window": ("mistral-window", {}),
    "qwen2-bias": ("qwen2-bias", dict(num_attention_heads=2, num_key_value_heads=1)),
}


def fused_model(variant: str) -> DecoderModel:
    base, extra = SHAPES[variant]
    hf = make_hf_model(base) if not extra else _hf_with(base, extra)
    cfg = ModelConfig.from_hf_dict(hf.config.to_dict())
    model = DecoderModel(cfg, hf.state_dict(), QuantConfig("nf4"))
    model.use_kernels("cpu-fused")
    assert model.native is not None, variant
    return model


def _hf_with(base: str, extra: dict):
    from tests.nn import conftest

    cfg_cls, model_cls, own = conftest.VARIANTS[base]
    conftest.VARIANTS["_tmp"] = (cfg_cls, model_cls, {**own, **extra})
    try:
        return make_hf_model("_tmp")
    finally:
        del conftest.VARIANTS["_tmp"]


def decode_state(model: DecoderModel, histories: list[int], interleave: bool, seed: int = 0):
    """A cache holding random keys for sequences of `histories` rows, room for one more each.
    interleave: blocks handed out round-robin (block tables), else each sequence's blocks in one
    run (a lone row's keys are then a view of the pool)."""
    g = torch.Generator().manual_seed(seed)
    cache = KVCache(model.cfg, max_tokens=4096, block_size=4, dtype=model.dtype)
    seqs = [SeqCache() for _ in histories]
    if interleave:
        spacer = SeqCache()  # takes a block after each block handed out: no table is a run
        for step in range(max(histories) + 1):
            for s, n in zip(seqs, histories):
                if step <= n:
                    had = len(s.blocks)
                    cache.reserve(s, 1)
                    s.length += 1
                    if len(s.blocks) > had:
                        cache.reserve(spacer, cache.block_size)
                        spacer.length += cache.block_size
        for s, n in zip(seqs, histories):
            s.length = n
    else:
        for s, n in zip(seqs, histories):
            cache.reserve(s, n + 1)
            s.length = n
    cache.pool.copy_(torch.randn(cache.pool.shape, generator=g) * 0.5)
    tokens = torch.randint(0, model.cfg.vocab_size, (len(seqs),), generator=g)
    positions = torch.tensor(histories)
    return cache, seqs, tokens, positions


def step(model: DecoderModel, cache, seqs, tokens, positions, use_native: bool, adapters=None):
    saved = model.native
    model.native = saved if use_native else None
    try:
        attn = AttentionBatch.with_cache(cache, seqs, [1] * len(seqs))
        with torch.no_grad():
            logits = model(tokens, positions, attn, adapters)
        return logits, attn
    finally:
        model.native = saved


def both_paths(model, histories, interleave):
    cache, seqs, tokens, positions = decode_state(model, histories, interleave)
    twin = KVCache(model.cfg, max_tokens=4096, block_size=4, dtype=model.dtype)
    twin.pool = cache.pool.clone()
    ref, _ = step(model, twin, seqs, tokens, positions, use_native=False)
    got, attn = step(model, cache, seqs, tokens, positions, use_native=True)
    return (ref, twin.pool), (got, cache.pool), attn


@pytest.mark.parametrize("variant", list(SHAPES))
@pytest.mark.parametrize("histories, interleave", [([13], False), ([13], True), ([3, 17, 9, 1], True),
                                                   ([40, 2], False)])
def test_decode_step_is_bit_identical_to_the_modules(variant, histories, interleave):
    model = fused_model(variant)
    (ref, ref_pool), (got, got_pool), attn = both_paths(model, histories, interleave)
    assert native.NativeDecode.takes(attn, None)
    assert (attn.decode_span is not None) == (len(histories) == 1 and not interleave)
    assert torch.equal(got, ref)
    assert torch.equal(got_pool, ref_pool)  # the same keys and values written, in the same rows


def test_window_and_long_context_still_identical():
    model = fused_model("mistral-window")  # sliding_window 8: older keys masked out
    (ref, _), (got, _), _ = both_paths(model, [30, 5, 12], interleave=True)
    assert torch.equal(got, ref)


def test_which_steps_the_native_path_takes(tmp_path):
    model = fused_model("llama-gqa")
    cache, seqs, tokens, positions = decode_state(model, [5, 6], interleave=False)
    decode = AttentionBatch.with_cache(cache, seqs, [1, 1])
    decode.prepare(None)
    assert native.NativeDecode.takes(decode, None)
    prefill = AttentionBatch.with_cache(cache, seqs, [1, 1])
    prefill.rows[1].q_len = 2  # a prompt chunk in the step: the modules take it
    prefill.prepare(None)
    assert not native.NativeDecode.takes(prefill, None)
    base_rows = AdapterBatch.build([3, 3], [1, 1], 3, lora_slots=set(), dora_slots=set(),
                                   embedding_slots=set())
    assert native.NativeDecode.takes(decode, base_rows)  # adapters without LoRA: cache-only
    lora_rows = AdapterBatch.build([0, 3], [1, 1], 3, lora_slots={0}, dora_slots=set(),
                                   embedding_slots=set())
    assert not native.NativeDecode.takes(decode, lora_rows)


def test_not_built_where_a_layer_is_off_the_fused_kernel():
    hf = make_hf_model("qwen2-bias")  # k/v of 16 rows: the fused kernel refuses them
    model = DecoderModel(ModelConfig.from_hf_dict(hf.config.to_dict()), hf.state_dict(), QuantConfig("nf4"))
    model.use_kernels("cpu-fused")
    assert model.native is None
    model = fused_model("llama-gqa")
    model.use_kernels("standard")
    assert model.native is None


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv(native.ENV_SWITCH, "0")
    native.extension.cache_clear()
    try:
        hf = make_hf_model("llama-tied")
        model = DecoderModel(ModelConfig.from_hf_dict(hf.config.to_dict()), hf.state_dict(), QuantConfig("nf4"))
        model.use_kernels("cpu-fused")
        assert model.native is None
    finally:
        monkeypatch.delenv(native.ENV_SWITCH)
        native.extension.cache_clear()
    assert native.extension() is not None
