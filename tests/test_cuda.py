"""The CUDA path on a real GPU (marker `cuda`; every test skips without a CUDA device).

    python -m pytest -q -m cuda tests            # what scripts/gpu_check.sh runs on a lent GPU

Three checks on tiny random models (tests/peft_factory.py), each seconds on a GPU:
(a) Quiver's NF4 logits and greedy tokens on CUDA equal transformers + bitsandbytes on CUDA
    (the QLoRA BitsAndBytesConfig of tests/quiver_factory.bnb_base, device_map="cuda");
(b) the LoRA gather path (what AdapterBatch picks on CUDA for many single-token runs) equals the
    per-token reference loop `lora_delta_reference`, on one projection and through the model;
(c) a mixed batch of LoRA, DoRA, prefix and base rows through the Engine on CUDA gives every row
    the greedy tokens it gets alone, with the decode steps on the gather path.

Both sides quantize on the GPU, as `load_base` and transformers do (the model's weights are moved
to CUDA before `DecoderModel` quantizes them), so both hold the same 4-bit codes and statistics.
Everything runs in fp32 with TF32 off (`highest` matmul precision): the two sides then differ
only in summation order (Quiver merges q/k/v and gate/up into one matmul, its own attention and
RMSNorm vs transformers' SDPA), ~1e-6 relative on a 2-layer model whose logits are O(0.1-1).
TOL = 1e-4 (the CPU suite's parity bound) leaves ~100x margin over that, and is well below what
any real discrepancy costs: one wrong 4-bit code moves a weight by ~10% of its block's absmax,
and the test checks that NF4 vs the dense model differ by more than 10 x TOL, so a pass is not
two dense computations agreeing.
"""
from __future__ import annotations

import copy
import tempfile

import pytest
import torch

from runtime.adapters.registry import AdapterRegistry
from runtime.config import ModelConfig, QuantConfig
from runtime.nn.adapter_batch import AdapterBatch
from runtime.nn.lora import LoraSlots, lora_delta, lora_delta_reference
from runtime.nn.model import DecoderModel

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="no CUDA device here: the CUDA checks run on a GPU machine "
                              "(bash scripts/gpu_check.sh)"),
]

DEV = torch.device("cuda")
TOL = 1e-4
IDS = torch.tensor([5, 17, 99, 3, 42, 8, 77, 12, 64, 31, 2, 90])


@pytest.fixture(autouse=True)
def exact_fp32():
    """TF32 off for the test (cuBLAS fp32 matmuls in full precision), restored afterwards."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(before)


# ---- helpers ------------------------------------------------------------------------------------
def cuda_stack(hf, quant: str = "nf4", slots: int = 8, max_rank: int = 16):
    """tests/quiver_factory.QuiverStack over `hf`, built the way `load_base` builds on CUDA:
    weights moved to the GPU first, so bitsandbytes quantizes them there (as transformers does
    with device_map="cuda"); fp32 activations, the "standard" 4-bit kernel (bitsandbytes' CUDA
    kernels), slot tensors on the model's device."""
    from tests.quiver_factory import QuiverStack

    cfg = ModelConfig.from_hf_dict(hf.config.to_dict())
    weights = {k: v.detach().to(DEV) for k, v in hf.state_dict().items()}
    model = DecoderModel(cfg, weights, QuantConfig(quant), torch.float32).to(DEV).eval()
    model.use_kernels("standard")
    return QuiverStack(model, AdapterRegistry(model, slots, max_rank), cfg)


def cuda_logits(stack, rows: list[tuple[torch.Tensor, str]], force_path: str | None = None):
    """QuiverStack.batch_logits on the GPU model: per-row logits (CPU, fp32) and the LoRA path."""
    return stack.batch_logits(rows, force_path, with_path=True)


def bnb_cuda(hf):
    """transformers + bitsandbytes on CUDA: tests/quiver_factory.bnb_base's BitsAndBytesConfig
    (NF4, double quantization, fp32 compute), device_map="cuda"."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                             bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    with tempfile.TemporaryDirectory() as d:
        copy.deepcopy(hf).save_pretrained(d)
        return AutoModelForCausalLM.from_pretrained(d, quantization_config=cfg, device_map="cuda",
                                                    dtype=torch.float32).eval()


@torch.no_grad()
def hf_greedy_cached(model, ids: torch.Tensor, n: int) -> list[int]:
    """Greedy decoding with transformers' KV cache: every step after the prompt is one row, so it
    runs bitsandbytes' CUDA gemv, as Quiver's batch-1 decode does (no EOS handling: n tokens)."""
    out = model(input_ids=ids[None].to(DEV), use_cache=True)
    got = []
    for _ in range(n):
        tok = int(out.logits[0, -1].argmax())
        got.append(tok)
        # `past_key_values` is the argument's name in every transformers 5 (renamed `cache` in
        # 5.2x, the old name still accepted); the output field moved the same way
        cache = getattr(out, "cache", None)
        cache = cache if cache is not None else getattr(out, "past_key_values", None)
        assert cache is not None, "transformers returned no KV cache"
        out = model(input_ids=torch.tensor([[tok]], device=DEV), past_key_values=cache, use_cache=True)
    return got


def tiny_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    from tests.peft_factory import make_tiny_tokenizer

    return AutoTokenizer.from_pretrained(str(make_tiny_tokenizer(tmp_path / "tok")))


@pytest.fixture(scope="module")
def llama():
    from tests.peft_factory import make_tiny_model

    return make_tiny_model("llama", seed=0)


# ---- (a) NF4 on CUDA = transformers + bitsandbytes on CUDA ------------------------------------
def test_nf4_logits_equal_transformers_bnb(llama):
    ref_model = bnb_cuda(llama)
    with torch.no_grad():
        ref = ref_model(input_ids=IDS[None].to(DEV)).logits[0].float().cpu()
        dense = llama(input_ids=IDS[None]).logits[0]
    q = cuda_stack(llama)
    assert q.model.kernels.get("standard"), q.model.kernels
    ours = cuda_logits(q, [(IDS, "")])[0][0]
    err = (ours - ref).abs().max().item()
    assert err <= TOL, f"Quiver NF4 vs transformers-bnb on CUDA: max |diff| {err:.3g} > {TOL}"
    gap = (ref - dense).abs().max().item()
    assert gap > 10 * TOL, f"NF4 vs dense differ by only {gap:.3g}: the check would not discriminate"


def test_nf4_greedy_equals_transformers_bnb(llama, tmp_path):
    """Batch-1 decode (bitsandbytes' CUDA gemv on both sides) through the engine, 16 tokens."""
    expected = hf_greedy_cached(bnb_cuda(llama), IDS, 16)
    q = cuda_stack(llama)
    engine = q.engine(tiny_tokenizer(tmp_path))
    assert engine.device.type == "cuda"
    assert q.greedy(engine, [(IDS.tolist(), "")], 16) == [expected]


# ---- (b) the gather path = the per-token reference --------------------------------------------
IN, OUT, SLOTS, MAX_R = 64, 96, 8, 16


def filled_slots(seed: int, dora: bool = False) -> LoraSlots:
    g = torch.Generator().manual_seed(seed)
    m = LoraSlots(IN, OUT, SLOTS, MAX_R, torch.float32, device=DEV)
    for s in range(SLOTS):
        r = [16, 4, 0, 8, 1, 16, 2, 12][s]  # mixed ranks, one untargeted slot
        if r == 0:
            continue
        m.set_slot(s, torch.randn(r, IN, generator=g).to(DEV), torch.randn(OUT, r, generator=g).to(DEV),
                   scale=float(torch.rand(1, generator=g)) * 2,
                   bias=torch.randn(OUT, generator=g).to(DEV) if s % 3 == 1 else None,
                   dora=(torch.rand(OUT, generator=g) + 0.5).to(DEV) if dora and s % 2 else None)
    return m


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gather_path_equals_reference(seed):
    m = filled_slots(seed)
    g = torch.Generator().manual_seed(100 + seed)
    # single-token rows (decode) over every slot and the base: what prefers gather on CUDA
    # 2 rows per slot and base rows, ordered by slot as the engine orders them
    row_slots = sorted(list(range(SLOTS + 1)) * 2 + torch.randint(0, SLOTS + 1, (3,), generator=g).tolist())
    lora = {s for s in range(SLOTS) if m.ranks[s]}
    ab = AdapterBatch.build(row_slots, [1] * len(row_slots), SLOTS, lora_slots=lora, device=DEV)
    assert ab.path == "gather", "AdapterBatch should pick the gather path for this CUDA decode step"
    assert ab.adapter_rows.device.type == "cuda" and ab.token_slots.device.type == "cuda"
    x = torch.randn(len(row_slots), IN, generator=g).to(DEV)
    y = torch.randn(len(row_slots), OUT, generator=g).to(DEV)
    ref = lora_delta_reference(m, x, ab.token_slots)
    got = lora_delta(m, x, ab)
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-4), (got - ref).abs().max()
    assert torch.allclose(m(x, y, ab, None), y + ref, rtol=1e-5, atol=1e-4)
    # the same delta computed on CPU (a device-independent reference)
    cpu = copy.deepcopy(m).to("cpu")
    ref_cpu = lora_delta_reference(cpu, x.cpu(), ab.token_slots.cpu())
    assert torch.allclose(got.cpu(), ref_cpu, rtol=1e-5, atol=1e-4)
    for path in ("runs", "gather"):  # every path on CUDA agrees
        forced = AdapterBatch.build(row_slots, [1] * len(row_slots), SLOTS, lora_slots=lora,
                                    device=DEV, force_path=path)
        assert torch.allclose(lora_delta(m, x, forced), ref, rtol=1e-5, atol=1e-4), path


def test_gather_path_with_dora_equals_reference():
    m = filled_slots(3, dora=True)
    row_slots = list(range(SLOTS)) * 3 + [SLOTS] * 4
    row_slots.sort()
    lora = {s for s in range(SLOTS) if m.ranks[s]}
    dora = {s for s in lora if s % 2}
    ab = AdapterBatch.build(row_slots, [1] * len(row_slots), SLOTS, lora_slots=lora,
                            dora_slots=dora, device=DEV)
    assert ab.path == "gather" and ab.any_dora
    x, y, b0 = torch.randn(len(row_slots), IN, device=DEV), torch.randn(len(row_slots), OUT, device=DEV), \
        torch.randn(OUT, device=DEV)
    delta = lora_delta_reference(m, x, ab.token_slots)
    f = torch.stack([m.dora[int(s)] if int(s) in dora else torch.ones(OUT, device=DEV)
                     for s in ab.token_slots])
    expected = y + ((f - 1) * (y - b0) + f * delta)
    assert torch.allclose(m(x, y, ab, b0), expected, rtol=1e-5, atol=1e-4)


def test_model_decode_rows_on_gather_equal_runs_and_solo(llama, tmp_path):
    """Through the whole NF4 model on CUDA: 12 one-token rows over 6 LoRA adapters + base rows
    take the gather path, and equal the runs path and each row alone."""
    from tests.peft_factory import make_peft_adapter

    q = cuda_stack(llama, slots=6)
    for i in range(6):
        q.load(f"l{i}", make_peft_adapter(llama, "lora", tmp_path / f"l{i}", seed=i,
                                          target_modules="all-linear", r=4 + 2 * i, lora_alpha=16))
    g = torch.Generator().manual_seed(5)
    names = sorted([f"l{i % 6}" for i in range(12)]) + ["", ""]
    rows = [(torch.randint(0, 128, (1,), generator=g), a) for a in names]
    gathered, path = cuda_logits(q, rows)
    assert path == "gather"
    runs, _ = cuda_logits(q, rows, force_path="runs")
    for (ids, name), a, b in zip(rows, gathered, runs):
        assert (a - b).abs().max() <= TOL, name
        assert (a - cuda_logits(q, [(ids, name)])[0][0]).abs().max() <= TOL, name
    base = cuda_logits(q, [(rows[0][0], "")])[0][0]
    assert (gathered[0] - base).abs().max() > 1e-3, "the adapter must change the output"


# ---- (c) the engine's mixed batch on CUDA ------------------------------------------------------
def test_engine_mixed_batch_equals_solo(llama, tmp_path, monkeypatch):
    from tests.peft_factory import make_peft_adapter

    q = cuda_stack(llama, slots=8)
    adapters = {f"lora{i}": ("lora", dict(target_modules="all-linear", r=8, lora_alpha=16)) for i in range(4)}
    adapters["dora"] = ("lora", dict(target_modules="all-linear", use_dora=True))
    adapters["prefix"] = ("prefix_tuning", dict(num_virtual_tokens=3))
    for i, (name, (kind, opts)) in enumerate(adapters.items()):
        q.load(name, make_peft_adapter(llama, kind, tmp_path / name, seed=10 + i, **opts))
    tokenizer = tiny_tokenizer(tmp_path)

    paths: list[str] = []
    build = AdapterBatch.build.__func__

    def recording_build(cls, *args, **kwargs):
        ab = build(cls, *args, **kwargs)
        paths.append(ab.path)
        return ab

    monkeypatch.setattr(AdapterBatch, "build", classmethod(recording_build))
    prompts = [(IDS[: 4 + i % 7].tolist(), name) for i, name in enumerate(list(adapters) + ["", ""])]
    engine = q.engine(tokenizer, max_batch_tokens=16)  # chunked prefill next to decode rows
    assert engine.device.type == "cuda"
    together = q.greedy(engine, prompts, 12)
    assert "gather" in paths, f"no decode step took the gather path: {sorted(set(paths))}"
    for p, got in zip(prompts, together):
        assert q.greedy(q.engine(tokenizer), [p], 12) == [got], p[1] or "base"
    assert len({tuple(t) for t in together}) > 1, "every row generated the same tokens"
