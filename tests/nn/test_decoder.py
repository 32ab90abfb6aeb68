"""runtime/nn decoder vs transformers' own model classes, and packed batches vs solo runs."""
from __future__ import annotations

import pytest
import torch

from runtime.config import ModelConfig, QuantConfig
from runtime.nn.attention import AttentionBatch, attend_reference
from runtime.nn.kv_cache import KVCache, SeqCache
from runtime.nn.model import DecoderModel
from tests.nn.conftest import make_hf_model


def build(hf, quant="none"):
    cfg = ModelConfig.from_hf_dict(hf.config.to_dict())
    return DecoderModel(cfg, hf.state_dict(), QuantConfig(quant))


def solo_logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(ids, torch.arange(len(ids)), AttentionBatch.without_cache([len(ids)]))


@torch.no_grad()
def test_logits_match_transformers(hf_variant):
    name, hf = hf_variant
    model = build(hf)
    ids = torch.randint(0, hf.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(1))
    ref = hf(ids).logits[0]
    out = solo_logits(model, ids[0])
    assert (ref - out).abs().max() <= 1e-4, name


@torch.no_grad()
def test_sliding_window_matters_beyond_window():
    """Guards the mistral parity test: with 24 tokens and window 8, the window changes logits."""
    hf = make_hf_model("mistral-window")
    model = build(hf)
    ids = torch.randint(0, 101, (24,), generator=torch.Generator().manual_seed(2))
    windowed = solo_logits(model, ids)
    model.cfg.sliding_window = None
    full = solo_logits(model, ids)
    assert (windowed - full).abs().max() > 1e-3


def run_cached(model, prompts: list[torch.Tensor], decode_steps: int, cache: KVCache,
               chunk: int | None = None):
    """Prefill all prompts as one packed step (optionally in chunks), then greedy decode steps
    with every sequence in one packed batch. Returns per-sequence lists of logits rows."""
    seqs = [SeqCache() for _ in prompts]
    outs: list[list[torch.Tensor]] = [[] for _ in prompts]
    pending = [p.clone() for p in prompts]
    done = [0] * len(prompts)
    while any(done[i] < len(p) for i, p in enumerate(pending)):  # prefill, possibly chunked
        rows = [i for i, p in enumerate(pending) if done[i] < len(p)]
        q_lens = [min(chunk or 10**9, len(pending[i]) - done[i]) for i in rows]
        for i, n in zip(rows, q_lens):
            cache.reserve(seqs[i], n)
        attn = AttentionBatch.with_cache(cache, [seqs[i] for i in rows], q_lens)
        tokens = torch.cat([pending[i][done[i]: done[i] + n] for i, n in zip(rows, q_lens)])
        positions = torch.cat([torch.arange(done[i], done[i] + n) for i, n in zip(rows, q_lens)])
        logits = model(tokens, positions, attn)
        attn.commit()
        start = 0
        for i, n in zip(rows, q_lens):
            outs[i].extend(logits[start: start + n])
            done[i] += n
            start += n
    for _ in range(decode_steps):
        nxt = [int(o[-1].argmax()) for o in outs]
        for s in seqs:
            cache.reserve(s, 1)
        attn = AttentionBatch.with_cache(cache, seqs, [1] * len(seqs))
        positions = torch.tensor([s.length for s in seqs])
        logits = model(torch.tensor(nxt), positions, attn)
        attn.commit()
        for i in range(len(seqs)):
            outs[i].append(logits[i])
            pending[i] = torch.cat([pending[i], torch.tensor([nxt[i]])])
    return outs, pending, seqs


@pytest.mark.parametrize("variant", ["llama-tied", "mistral-window", "qwen2-bias"])
@pytest.mark.parametrize("chunk", [None, 5])
@torch.no_grad()
def test_packed_batch_equals_solo(variant, chunk):
    """8 prompts of different lengths, packed: prefill and 10 decode steps equal solo runs."""
    hf = make_hf_model(variant)
    model = build(hf)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 101, (n,), generator=g) for n in (1, 3, 7, 12, 4, 9, 16, 2)]
    cache = KVCache(model.cfg, max_tokens=4096, block_size=4, initial_blocks=2)
    outs, full, _ = run_cached(model, prompts, decode_steps=10, cache=cache, chunk=chunk)
    for i, seq in enumerate(full):
        solo = solo_logits(model, seq)  # logits for every position, no cache, alone
        batched = torch.stack(outs[i])
        assert batched.shape == solo.shape
        assert (batched - solo).abs().max() <= 1e-4, i


@torch.no_grad()
def test_cache_blocks_are_returned():
    model = build(make_hf_model("llama-tied"))
    cache = KVCache(model.cfg, max_tokens=64, block_size=4, initial_blocks=1)
    _, _, seqs = run_cached(model, [torch.arange(10), torch.arange(7)], 3, cache)
    assert cache.used_blocks == sum(len(s.blocks) for s in seqs) == 4 + 3
    for s in seqs:
        cache.free(s)
    assert cache.used_blocks == 0 and cache.usage() == 0


def test_cache_full_is_reported():
    from runtime.nn.kv_cache import CacheFull

    model = build(make_hf_model("llama-tied"))
    cache = KVCache(model.cfg, max_tokens=8, block_size=4)
    s = SeqCache()
    cache.reserve(s, 8)
    with pytest.raises(CacheFull):
        cache.reserve(SeqCache(), 1)


@torch.no_grad()
def test_attention_fast_path_equals_reference(monkeypatch):
    """Batched decode + SDPA equals the explicit per-row softmax loop."""
    import runtime.nn.model as model_mod

    model = build(make_hf_model("mistral-window"))
    prompts = [torch.randint(0, 101, (n,)) for n in (3, 11, 6)]
    fast, _, _ = run_cached(model, prompts, 4, KVCache(model.cfg, max_tokens=512, block_size=4))
    monkeypatch.setattr(model_mod, "attend", attend_reference)
    ref, _, _ = run_cached(model, prompts, 4, KVCache(model.cfg, max_tokens=512, block_size=4))
    for a, b in zip(fast, ref):
        assert (torch.stack(a) - torch.stack(b)).abs().max() <= 1e-5


@torch.no_grad()
def test_nf4_matches_transformers_bitsandbytes():
    """Our NF4 model equals transformers loaded with the same BitsAndBytesConfig (fp32 compute),
    on the kernel transformers takes here (fused on AVX512-BF16 CPUs, else standard)."""
    from tests.quiver_factory import bnb_reference_kernel

    import tempfile

    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    hf = make_hf_model("llama-tied")
    hf.config.intermediate_size = 128
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                 bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
        hf4 = AutoModelForCausalLM.from_pretrained(d, quantization_config=bnb, device_map="cpu",
                                                   dtype=torch.float32).eval()
    model = build(hf, "nf4")
    model.use_kernels(bnb_reference_kernel())
    ids = torch.randint(0, 101, (1, 20))
    ref = hf4(ids).logits[0]
    out = solo_logits(model, ids[0])
    assert (ref - out).abs().max() <= 1e-4
    unquantized = solo_logits(build(hf), ids[0])
    assert (unquantized - out).abs().max() > 1e-4  # the quantization really happened


def test_quantized_weight_is_in_state_dict_and_small():
    model = build(make_hf_model("llama-tied"), "nf4")
    sd = model.state_dict()
    w = sd["model.layers.0.self_attn.q_proj.base.weight"]
    assert w.dtype == torch.uint8 and w.numel() == 64 * 64 // 2
    qlin = model.model.layers[0].self_attn.q_proj.base
    x = torch.randn(5, 64)
    assert (qlin(x) - qlin.reference_forward(x)).abs().max() <= 1e-4


def test_gradients_flow_through_frozen_nf4():
    """A training step moves a test parameter (virtual-token embeddings); the base stays frozen."""
    model = build(make_hf_model("llama-tied"), "nf4")
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    prompt = torch.nn.Parameter(torch.randn(3, 64) * 0.1)
    ids = torch.randint(0, 101, (8,))
    opt = torch.optim.SGD([prompt], lr=0.5)
    before = prompt.detach().clone()
    x = torch.cat([prompt, model.model.embed_tokens(ids)])
    logits = model(None, torch.arange(11), AttentionBatch.without_cache([11]), inputs_embeds=x)
    loss = torch.nn.functional.cross_entropy(logits[3:-1], ids[1:])
    loss.backward()
    assert prompt.grad is not None and prompt.grad.abs().sum() > 0
    opt.step()
    assert not torch.equal(prompt.detach(), before)
    assert all(p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, frozen[k]), k


@torch.no_grad()
@pytest.mark.parametrize("variant", ["llama-tied", "mistral-window"])
@pytest.mark.parametrize("scatter", [False, True])
def test_lone_decode_row_reads_its_keys_in_place(variant, scatter, monkeypatch):
    """One sequence decoding alone: consecutive blocks are read as a view of the pool (the span
    path); blocks with a hole (another sequence's freed block) take the gather path. Both equal
    the explicit per-row loop, with and without a sliding window (8) shorter than the context.
    This is the SDPA route (no C++ extension, or a bf16 / CUDA cache): the paged kernel, which
    reads every row in place, is held to the same loop in tests/nn/test_paged_attention.py."""
    import runtime.nn.attention as attention_mod
    import runtime.nn.model as model_mod

    monkeypatch.setattr(attention_mod, "paged_attention", lambda cache: None)
    model = build(make_hf_model(variant))
    prompt = [torch.randint(0, 101, (13,), generator=torch.Generator().manual_seed(4))]
    cache = KVCache(model.cfg, max_tokens=512, block_size=4)
    if scatter:  # blocks 0 and 1 taken, 0 freed: the sequence gets 0, 2, 3, ...
        first, second = SeqCache(), SeqCache()
        cache.reserve(first, 4)
        cache.reserve(second, 4)
        cache.free(first)
    spans = []
    original = AttentionBatch.prepare

    def spy(self, window):
        original(self, window)
        spans.append(self.decode_span is not None)

    monkeypatch.setattr(AttentionBatch, "prepare", spy)
    fast, _, _ = run_cached(model, prompt, 6, cache)
    monkeypatch.setattr(AttentionBatch, "prepare", original)
    monkeypatch.setattr(model_mod, "attend", attend_reference)
    ref, _, _ = run_cached(model, prompt, 6, KVCache(model.cfg, max_tokens=512, block_size=4))
    assert (torch.stack(fast[0]) - torch.stack(ref[0])).abs().max() <= 1e-5
    assert any(spans) is not scatter
