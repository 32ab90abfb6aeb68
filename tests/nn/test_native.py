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


def decode_state(model: DecoderModel, histories: list[int], interleave: bool, seed: int = 0,
                 q_lens: list[int] | None = None):
    """A cache holding random keys for sequences of `histories` rows, room for q_lens[i] more
    each (default one: a decode step; more: a prefill chunk continuing that history).
    interleave: blocks handed out round-robin (block tables), else each sequence's blocks in one
    run (a lone row's keys are then a view of the pool)."""
    g = torch.Generator().manual_seed(seed)
    q_lens = q_lens or [1] * len(histories)
    cache = KVCache(model.cfg, max_tokens=4096, block_size=4, dtype=model.dtype)
    seqs = [SeqCache() for _ in histories]
    if interleave:
        spacer = SeqCache()  # takes a block after each block handed out: no table is a run
        for step in range(max(n + q for n, q in zip(histories, q_lens))):
            for s, n, q in zip(seqs, histories, q_lens):
                if step < n + q:
                    had = len(s.blocks)
                    cache.reserve(s, 1)
                    s.length += 1
                    if len(s.blocks) > had:
                        cache.reserve(spacer, cache.block_size)
                        spacer.length += cache.block_size
        for s, n in zip(seqs, histories):
            s.length = n
    else:
        for s, n, q in zip(seqs, histories, q_lens):
            cache.reserve(s, n + q)
            s.length = n
    cache.pool.copy_(torch.randn(cache.pool.shape, generator=g) * 0.5)
    tokens = torch.randint(0, model.cfg.vocab_size, (sum(q_lens),), generator=g)
    positions = torch.cat([torch.arange(n, n + q) for n, q in zip(histories, q_lens)])
    return cache, seqs, tokens, positions


def step(model: DecoderModel, cache, seqs, tokens, positions, use_native: bool, adapters=None,
         q_lens: list[int] | None = None):
    saved = model.native
    model.native = saved if use_native else None
    try:
        attn = AttentionBatch.with_cache(cache, seqs, q_lens or [1] * len(seqs))
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
    assert attn.decode_lens is not None  # the paged kernel's metadata, on both paths
    assert torch.equal(got, ref)
    assert torch.equal(got_pool, ref_pool)  # the same keys and values written, in the same rows


def test_window_and_long_context_still_identical():
    model = fused_model("mistral-window")  # sliding_window 8: older keys masked out
    (ref, _), (got, _), _ = both_paths(model, [30, 5, 12], interleave=True)
    assert torch.equal(got, ref)


@pytest.mark.parametrize("variant", ["llama-gqa", "mistral-window", "qwen2-bias"])
@pytest.mark.parametrize("histories, q_lens", [([0], [9]), ([5, 0, 12], [1, 7, 1]), ([3, 20], [6, 1]),
                                               ([0, 0], [11, 4])])
def test_prefill_and_mixed_steps_are_bit_identical_to_the_modules(variant, histories, q_lens):
    """Prompt chunks (from scratch or continuing a history) beside decode rows: the chunks are
    attended one by one over their gathered blocks, the decode rows by the paged kernel."""
    model = fused_model(variant)
    cache, seqs, tokens, positions = decode_state(model, histories, True, q_lens=q_lens)
    twin = KVCache(model.cfg, max_tokens=4096, block_size=4, dtype=model.dtype)
    twin.pool = cache.pool.clone()
    ref, _ = step(model, twin, seqs, tokens, positions, False, q_lens=q_lens)
    got, attn = step(model, cache, seqs, tokens, positions, True, q_lens=q_lens)
    assert native.NativeDecode.takes(attn, None) and not attn.all_decode
    assert torch.equal(got, ref)
    assert torch.equal(cache.pool, twin.pool)


@pytest.mark.parametrize("q_lens", [[1, 6, 1, 1], [1, 12, 1, 1], [1, 1, 1, 1]])
def test_lora_on_a_mixed_step_is_bit_identical(q_lens):
    """A prompt chunk of up to 8 tokens joins the C++ runs pass, a longer one takes the addmm."""
    model = fused_model("llama-gqa")
    with_lora(model)
    ab = AdapterBatch.build([0, 2, SLOTS, 4], q_lens, SLOTS, lora_slots=set(range(5)))
    assert ab.path == "runs"
    cache, seqs, tokens, positions = decode_state(model, [4, 9, 2, 7], True, q_lens=q_lens)
    twin = KVCache(model.cfg, max_tokens=4096, block_size=4, dtype=model.dtype)
    twin.pool = cache.pool.clone()
    ref, _ = step(model, twin, seqs, tokens, positions, False, ab, q_lens)
    got, attn = step(model, cache, seqs, tokens, positions, True, ab, q_lens)
    assert native.NativeDecode.takes(attn, ab)
    assert torch.equal(got, ref)


def test_which_steps_the_native_path_takes(tmp_path):
    model = fused_model("llama-gqa")
    cache, seqs, tokens, positions = decode_state(model, [5, 6], interleave=False)
    decode = AttentionBatch.with_cache(cache, seqs, [1, 1])
    decode.prepare(None)
    assert native.NativeDecode.takes(decode, None)
    bf16 = KVCache(model.cfg, max_tokens=64, block_size=4, dtype=torch.bfloat16)
    s = SeqCache()
    bf16.reserve(s, 1)
    other = AttentionBatch.with_cache(bf16, [s], [1])  # a bf16 cache: SDPA, the modules
    other.prepare(None)
    assert not native.NativeDecode.takes(other, None)
    base_rows = AdapterBatch.build([3, 3], [1, 1], 3, lora_slots=set(), dora_slots=set(),
                                   embedding_slots=set())
    assert native.NativeDecode.takes(decode, base_rows)  # adapters without LoRA: cache-only
    capture = AttentionBatch.with_cache(cache, seqs, [1, 1])
    capture.capture = []  # prompt-tuning KV precompute: the modules record each layer's keys
    capture.prepare(None)
    assert not native.NativeDecode.takes(capture, None)


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
    # loaded again in this process: the same build (torch's loader once took flags it had
    # changed itself for new ones and rebuilt the whole extension as quiver_native_v1)
    assert native.extension().__name__ == "quiver_native"


def test_a_build_lock_left_by_a_killed_process_does_not_stop_the_next_load():
    """torch's loader polls its lock file until it is gone; one left by a process killed in the
    loader used to hang every later first model load (native._build_lock)."""
    import subprocess
    import sys

    left = native.build_directory() / "lock"
    left.write_text("")  # what a builder killed mid-build leaves
    try:
        done = subprocess.run([sys.executable, "-c", "from runtime.nn import native; "
                               "print(native.extension() is not None)"],
                              capture_output=True, text=True, timeout=240)
    finally:
        left.unlink(missing_ok=True)
    assert done.returncode == 0 and done.stdout.strip() == "True", done.stderr[-2000:]
    assert "left by a process killed" in done.stderr

# ---- LoRA rows in the C++ layers ------------------------------------------------------------
SLOTS, MAX_RANK = 6, 8
DORA = {2, 4}  # slots whose weights carry DoRA factors (used as DoRA where a test says so)


def with_lora(model: DecoderModel, seed: int = 0, targets: set[str] | None = None,
              weight_dtype: torch.dtype | None = None) -> dict[str, int]:
    """Random LoRA weights in slots 0..4 of every projection (slot 5 empty): ranks differ per
    slot and module, scales are irrational (rslora-like), slot 1 has a LoRA bias, slot 3 targets
    only the MLP. Returns {name: slot}."""
    g = torch.Generator().manual_seed(seed)
    model.allocate_lora_slots(SLOTS, MAX_RANK, targets, weight_dtype=weight_dtype)
    for name, lin in model.adapted_linears().items():
        if lin.lora is None:
            continue
        for slot in range(5):
            if slot == 3 and "mlp" not in name:
                continue
            r = 1 + (slot + len(name)) % MAX_RANK
            lin.lora.set_slot(slot, torch.randn(r, lin.base.in_features, generator=g) * 0.2,
                              torch.randn(lin.base.out_features, r, generator=g) * 0.2,
                              scale=16 / (r ** 0.5) / 7,
                              bias=torch.randn(lin.base.out_features, generator=g) if slot == 1 else None,
                              dora=torch.rand(lin.base.out_features, generator=g) + 0.5 if slot in DORA else None)
    return {f"a{s}": s for s in range(5)}


def adapter_batch(row_slots: list[int], path: str, dora: set[int] = frozenset()) -> AdapterBatch:
    return AdapterBatch.build(row_slots, [1] * len(row_slots), SLOTS, lora_slots=set(range(5)),
                              dora_slots=dora, force_path=path)


def both_paths_with(model, histories, ab):
    cache, seqs, tokens, positions = decode_state(model, histories, interleave=True)
    twin = KVCache(model.cfg, max_tokens=4096, block_size=4, dtype=model.dtype)
    twin.pool = cache.pool.clone()
    ref, _ = step(model, twin, seqs, tokens, positions, use_native=False, adapters=ab)
    got, attn = step(model, cache, seqs, tokens, positions, use_native=True, adapters=ab)
    return ref, got, attn


@pytest.mark.parametrize("variant", ["llama-gqa", "qwen2-bias"])
@pytest.mark.parametrize("row_slots, path", [
    ([0], "runs"),                   # one stream, one adapter
    ([1, 1, 1], "runs"),             # one adapter over every row (a single addmm)
    ([0, SLOTS, 2, 2, 3], "runs"),   # runs, a base row, an adapter that skips attention
    ([0, 1, 2, 3, 4], "runs"),       # one row per slot, in order
    ([4, 0, SLOTS, 2, 0, 1], "runs"),  # out of order, a base row, two runs of one slot
])
def test_lora_rows_are_bit_identical_to_the_modules(variant, row_slots, path):
    model = fused_model(variant)
    with_lora(model)
    ab = adapter_batch(row_slots, path)
    assert ab.path == path and ab.has_lora
    ref, got, attn = both_paths_with(model, [5 + 3 * i for i in range(len(row_slots))], ab)
    assert native.NativeDecode.takes(attn, ab)
    assert torch.equal(got, ref)
    # and the adapters changed something: the stack is not reading empty slots
    base, _, _ = both_paths_with(model, [5 + 3 * i for i in range(len(row_slots))], None)
    assert not torch.equal(base, ref)


@pytest.mark.parametrize("dora", [False, True])
def test_bf16_slots_in_the_stack_are_bit_identical_to_the_modules(dora):
    """`--adapter-dtype bfloat16`: the C++ layers read bf16 slots as the modules do (short runs,
    a long run, DoRA), and both give the bits of fp32 slots holding the same rounded weights."""
    model = fused_model("qwen2-bias")
    with_lora(model, weight_dtype=torch.bfloat16)
    q = model.adapted_linears()["model.layers.0.self_attn.q_proj"].lora
    assert q.A.dtype == torch.bfloat16 and q.bias.dtype == torch.float32
    row_slots = [0, 2, 2, SLOTS, 4] + [1] * 9  # short runs, a base row, a run of 9 rows (addmm)
    ab = AdapterBatch.build(row_slots, [1] * len(row_slots), SLOTS, lora_slots=set(range(5)),
                            dora_slots=DORA if dora else frozenset())
    histories = [5 + 3 * i for i in range(len(row_slots))]
    ref, got, attn = both_paths_with(model, histories, ab)
    assert native.NativeDecode.takes(attn, ab) and torch.equal(got, ref)
    bf16_weights = {n: (lin.lora.A.float(), lin.lora.Bt.float()) for n, lin in model.adapted_linears().items()}
    with_lora(model)  # fp32 slots, then the same rounded weights written over them
    for n, lin in model.adapted_linears().items():
        lin.lora.A.copy_(bf16_weights[n][0]), lin.lora.Bt.copy_(bf16_weights[n][1])
    _, fp32, _ = both_paths_with(model, histories, ab)
    assert torch.equal(got, fp32)


def test_lora_on_some_projections_only():
    model = fused_model("llama-gqa")
    with_lora(model, targets={"v_proj", "down_proj"})
    ab = adapter_batch([0, 2, 4], "runs")
    ref, got, _ = both_paths_with(model, [7, 3, 11], ab)
    assert torch.equal(got, ref)


@pytest.mark.parametrize("variant", ["llama-gqa", "qwen2-bias"])
@pytest.mark.parametrize("row_slots, path", [([2], "runs"), ([0, 2, 2, SLOTS], "runs"), ([0, 1, 2, 3, 4], "runs"),
                                             ([4, SLOTS, 2, 1], "runs")])
def test_dora_rows_are_bit_identical_to_the_modules(variant, row_slots, path):
    """DoRA beside LoRA and base rows: y + (f - 1) * (y - b0) + f * delta, with the projection's
    own bias b0 (Qwen2's q/k/v)."""
    model = fused_model(variant)
    with_lora(model)
    ab = adapter_batch(row_slots, path, dora=DORA)
    assert ab.any_dora and ab.path == path
    ref, got, attn = both_paths_with(model, [6 + 2 * i for i in range(len(row_slots))], ab)
    assert native.NativeDecode.takes(attn, ab)
    assert torch.equal(got, ref)


def test_gather_steps_stay_in_python():
    model = fused_model("llama-gqa")
    with_lora(model)
    cache, seqs, _, _ = decode_state(model, [4, 4], interleave=False)
    attn = AttentionBatch.with_cache(cache, seqs, [1, 1])
    attn.prepare(None)
    assert not native.NativeDecode.takes(attn, adapter_batch([0, 1], "gather"))
    assert native.NativeDecode.takes(attn, adapter_batch([0, 1], "runs", dora={1}))


def test_adapters_loaded_after_the_stack_was_built_are_seen():
    model = fused_model("llama-gqa")
    with_lora(model)
    ab = adapter_batch([2], "runs")
    before, _, _ = both_paths_with(model, [9], ab)
    lin = model.adapted_linears()["model.layers.1.mlp.up_proj"]
    lin.lora.set_slot(2, torch.ones(2, lin.base.in_features), torch.ones(lin.base.out_features, 2), 0.5)
    ref, got, _ = both_paths_with(model, [9], ab)
    assert torch.equal(got, ref) and not torch.equal(got, before)


# ---- the whole step in one call (DecodeStack.step_logits): embedding, layers, norm, head ------

def approximate_model(variant: str = "llama-gqa") -> DecoderModel:
    """The serving head: int8 up to INT8_MAX_ROWS rows, bf16 above, the top EXACT_TOP exact."""
    model = fused_model(variant)
    model.use_kernels("cpu-fused", approximate_head=True)
    assert model.head.int8 is not None and model.native.head_ready
    return model


@pytest.mark.parametrize("variant", ["llama-gqa", "qwen2-bias"])
@pytest.mark.parametrize("histories", [[13], [3, 17, 9], list(range(1, 13))])  # int8 rows / bf16 rows
def test_whole_step_with_the_serving_head_is_bit_identical(variant, histories):
    from runtime.nn.lm_head import INT8_MAX_ROWS

    model = approximate_model(variant)
    (ref, ref_pool), (got, got_pool), attn = both_paths(model, histories, interleave=True)
    assert native.NativeDecode.takes(attn, None)
    assert (len(histories) <= INT8_MAX_ROWS) == (len(histories) < 12)  # both head kernels run
    assert torch.equal(got, ref)
    assert torch.equal(got_pool, ref_pool)


def test_whole_step_picks_the_logits_rows_of_a_mixed_step():
    model = approximate_model()
    q_lens = [1, 7, 1]
    cache, seqs, tokens, positions = decode_state(model, [5, 0, 12], True, q_lens=q_lens)
    twin = KVCache(model.cfg, max_tokens=4096, block_size=4, dtype=model.dtype)
    twin.pool = cache.pool.clone()
    rows = torch.tensor([0, 7, 8])  # each sequence's last token
    out = {}
    for use_native, c in ((False, twin), (True, cache)):
        saved, model.native = model.native, (model.native if use_native else None)
        try:
            with torch.no_grad():
                out[use_native] = model(tokens, positions, AttentionBatch.with_cache(c, seqs, q_lens),
                                        logits_rows=rows)
        finally:
            model.native = saved
    assert out[True].shape == (3, model.cfg.vocab_size)
    assert torch.equal(out[True], out[False]) and torch.equal(cache.pool, twin.pool)


def test_a_position_past_the_rotary_table_falls_back_with_nothing_written():
    model = approximate_model()
    model.rotary._grow(16)  # a short table: the step below reaches past it
    cache, seqs, tokens, positions = decode_state(model, [20, 3], True)
    before = cache.pool.clone()
    attn = AttentionBatch.with_cache(cache, seqs, [1, 1])
    attn.prepare(model.cfg.sliding_window)
    assert model.native.logits(tokens, positions, model.rotary, attn, None, None) is None
    assert torch.equal(cache.pool, before)
    twin = KVCache(model.cfg, max_tokens=4096, block_size=4, dtype=model.dtype)
    twin.pool = before.clone()
    ref, _ = step(model, twin, seqs, tokens, positions, use_native=False)
    got, _ = step(model, cache, seqs, tokens, positions, use_native=True)  # grows the table
    assert model.rotary.cos_table.shape[0] > 20 and torch.equal(got, ref)
    again = AttentionBatch.with_cache(twin, seqs, [1, 1])
    again.prepare(model.cfg.sliding_window)
    assert model.native.logits(tokens, positions, model.rotary, again, None, None) is not None


def test_a_token_outside_the_vocabulary_is_an_index_error_with_nothing_written():
    model = approximate_model()
    cache, seqs, tokens, positions = decode_state(model, [6, 2], True)
    before = cache.pool.clone()
    bad = tokens.clone()
    bad[1] = model.cfg.vocab_size
    with pytest.raises(IndexError, match="out of range"):
        step(model, cache, seqs, bad, positions, use_native=True)
    assert torch.equal(cache.pool, before)
