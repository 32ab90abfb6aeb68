"""Every adapter type and option, served by Quiver, against PEFT computing the same adapter.

Adapters are made by PEFT itself (tests/peft_factory.py) on tiny random bases; Quiver reads the
saved directory and runs its own decoder through the KV-cache path (the serving path).
"""
from __future__ import annotations

import pytest
import torch

from tests.peft_factory import load_peft_model, make_peft_adapter, make_tiny_model, make_tiny_tokenizer
from tests.quiver_factory import QuiverStack, bnb_base, bnb_reference_kernel, peft_greedy, peft_logits

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

CASES = {
    "lora-default-targets": ("lora", {}),
    "lora-all-linear": ("lora", dict(target_modules="all-linear", r=8, lora_alpha=16)),
    "lora-rslora": ("lora", dict(target_modules=["q_proj", "up_proj"], use_rslora=True, r=8)),
    "lora-patterns": ("lora", dict(target_modules=ALL_LINEAR, r=4, rank_pattern={"v_proj": 8, "layers.1.mlp.down_proj": 2},
                                   alpha_pattern={"up_proj": 32, "o_proj": 3})),
    "lora-regex": ("lora", dict(target_modules=r".*layers\.1\.(self_attn\.(q|k)_proj|mlp\.gate_proj)")),
    "lora-exclude": ("lora", dict(target_modules=ALL_LINEAR, exclude_modules=["down_proj", "k_proj"])),
    "lora-layers": ("lora", dict(target_modules=["q_proj", "v_proj", "down_proj"], layers_to_transform=[1],
                                 layers_pattern="layers")),
    "lora-bias": ("lora", dict(target_modules=["q_proj", "down_proj"], lora_bias=True)),
    "dora": ("lora", dict(target_modules=ALL_LINEAR, use_dora=True)),
    "lora-embedding": ("lora", dict(target_modules=["embed_tokens", "q_proj"])),
    "adalora": ("adalora", dict(target_modules=["q_proj", "v_proj", "gate_proj"],
                                prune_to_zero=["model.layers.0.self_attn.v_proj"])),
    "prompt": ("prompt_tuning", dict(num_virtual_tokens=5)),
    "ptuning-mlp": ("p_tuning", dict(encoder_reparameterization_type="MLP")),
    "ptuning-lstm": ("p_tuning", dict(encoder_reparameterization_type="LSTM")),
    "prefix": ("prefix_tuning", dict(num_virtual_tokens=3)),
    "prefix-projection": ("prefix_tuning", dict(prefix_projection=True, encoder_hidden_size=32)),
}

IDS = torch.tensor([5, 17, 99, 3, 42, 8, 77, 12, 64, 31, 2, 90])


@pytest.fixture(scope="module")
def llama():
    return make_tiny_model("llama", seed=0)


@pytest.fixture(scope="module")
def adapters(llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {name: make_peft_adapter(llama, kind, root / name, seed=i, **opts)
            for i, (name, (kind, opts)) in enumerate(CASES.items())}


@pytest.fixture(scope="module")
def stack(llama, adapters):
    q = QuiverStack.from_hf(llama, slots=len(adapters))
    for name, path in adapters.items():
        q.load(name, path)
    return q


@pytest.mark.parametrize("name", list(CASES))
def test_logits_equal_peft(name, llama, adapters, stack):
    peft = load_peft_model(llama, adapters[name])
    ref = peft_logits(peft, IDS)
    ours = stack.logits(IDS, name)
    assert (ours - ref).abs().max() <= 1e-4
    base = stack.logits(IDS, "")
    assert (ours - base).abs().max() > 1e-3, "the adapter must change the output"


@pytest.mark.parametrize("name", list(CASES))
def test_greedy_continuation_equals_peft(name, llama, adapters, stack, tmp_path):
    tokenizer = _tokenizer(tmp_path)
    peft = load_peft_model(llama, adapters[name])
    expected = peft_greedy(peft, IDS.tolist(), 20)
    engine = stack.engine(tokenizer, max_batch_tokens=7)  # chunked prefill
    assert stack.greedy(engine, [(IDS.tolist(), name)], 20) == [expected]


def test_mixed_batch_rows_equal_solo(stack):
    """Every type plus base rows in one packed forward, each row equal to its solo run."""
    g = torch.Generator().manual_seed(7)
    names = list(CASES) + ["", ""]
    rows = [(torch.randint(0, 128, (3 + i % 6,), generator=g), name) for i, name in enumerate(names)]
    assert len(rows) >= 12
    for path in ("runs", "gather"):
        batched = stack.batch_logits(rows, force_path=path)
        for (ids, name), got in zip(rows, batched):
            assert (got - stack.logits(ids, name)).abs().max() <= 1e-4, (path, name)


def test_mixed_generation_equals_solo(stack, tmp_path):
    """The engine's continuous batch (all types at once) equals each request alone."""
    tokenizer = _tokenizer(tmp_path)
    prompts = [(IDS[: 4 + i % 7].tolist(), name) for i, name in enumerate(list(CASES) + [""])]
    together = stack.greedy(stack.engine(tokenizer, max_batch_tokens=16), prompts, 12)
    for p, got in zip(prompts, together):
        assert stack.greedy(stack.engine(tokenizer), [p], 12) == [got], p[1]


NF4_CASES = ["lora-all-linear", "dora", "adalora", "prompt", "prefix-projection", "lora-embedding"]


@pytest.mark.parametrize("name", NF4_CASES)
def test_nf4_greedy_equals_peft_on_bitsandbytes(name, llama, adapters, tmp_path):
    """NF4 + double quant on both sides: Quiver's greedy tokens equal PEFT over transformers-bnb,
    both on the 4-bit kernel transformers takes on this machine (the fused one on AVX512-BF16
    CPUs); DoRA on the standard layout on both sides, since PEFT's DoRA misreads the fused one."""
    from peft import PeftModel

    repack = name != "dora"
    peft = PeftModel.from_pretrained(bnb_base(llama, repack), str(adapters[name])).eval()
    q = QuiverStack.from_hf(llama, quant="nf4", slots=2,
                            kernel=bnb_reference_kernel() if repack else "standard")
    q.load(name, adapters[name])
    assert (q.logits(IDS, name) - peft_logits(peft, IDS)).abs().max() <= 1e-4
    expected = peft_greedy(peft, IDS.tolist(), 20)
    assert q.greedy(q.engine(_tokenizer(tmp_path)), [(IDS.tolist(), name)], 20) == [expected]


@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
def test_other_architectures(arch, tmp_path):
    base = make_tiny_model(arch, seed=1)
    q = QuiverStack.from_hf(base, slots=3)
    for kind, opts in [("lora", dict(target_modules="all-linear", use_dora=True)),
                       ("prefix_tuning", {}), ("prompt_tuning", {})]:
        path = make_peft_adapter(base, kind, tmp_path, **opts)
        q.load(kind, path)
        ref = peft_logits(load_peft_model(base, path), IDS)
        assert (q.logits(IDS, kind) - ref).abs().max() <= 1e-4, kind


def test_eviction_rotation_stays_correct(llama, tmp_path):
    """4 device slots, 10 adapters requested in rotation: every output equals its PEFT reference."""
    q = QuiverStack.from_hf(llama, slots=4)
    paths = {}
    for i in range(10):
        kind, opts = [("lora", dict(target_modules="all-linear")), ("prefix_tuning", {}),
                      ("lora", dict(use_dora=True))][i % 3]
        paths[f"a{i}"] = make_peft_adapter(llama, kind, tmp_path / f"a{i}", seed=100 + i, **opts)
        q.load(f"a{i}", paths[f"a{i}"])
    refs = {a: peft_logits(load_peft_model(llama, p), IDS) for a, p in paths.items()}
    for round_ in range(2):
        for a in paths:
            assert (q.logits(IDS, a) - refs[a]).abs().max() <= 1e-4, (round_, a)
    assert q.registry.evictions >= 16
    resident = [i for i in q.registry.list() if i.state.value == "device"]
    assert len(resident) == 4


def _tokenizer(tmp_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(make_tiny_tokenizer(tmp_path / "tok")))


def test_random_mixes_equal_solo(stack):
    """Property: any mix of adapters (any type, any rank and targets) and lengths, batched,
    equals each row run alone."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    names = list(CASES) + [""]
    rows_st = st.lists(st.tuples(st.sampled_from(names), st.integers(1, 9), st.integers(0, 2**16)),
                       min_size=1, max_size=10)

    @settings(max_examples=15, deadline=None)
    @given(rows_st)
    def check(spec):
        rows = [(torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(seed)), name)
                for name, n, seed in spec]
        for (ids, name), got in zip(rows, stack.batch_logits(rows)):
            assert (got - stack.logits(ids, name)).abs().max() <= 1e-4, name

    check()
