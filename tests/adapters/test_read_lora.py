"""read_adapter on LoRA-family adapters made by PEFT, checked against PEFT's own layers.

For each case PEFT creates the adapter, saves it, and loads it back with PeftModel.from_pretrained;
the oracle is that reloaded model (what a PEFT user would serve): its wrapped modules, and each
layer's `get_delta_weight` (AdaLoRA: its own, B @ (A * E) * alpha / (ranknum + 1e-5)).
"""
from __future__ import annotations

import json

import pytest
import torch

from runtime.adapters.matching import EMBEDDING_NAME
from runtime.adapters.peft_format import lora_target_names, module_scale, read_adapter
from runtime.adapters.types import AdapterFormatError, AdapterKind
from tests.peft_factory import load_peft_model, make_peft_model, model_config, peft_lora_layers, save_peft_model

ATOL = 1e-6

LORA_CASES = {
    "default_targets": ("llama", {}),
    "list": ("llama", dict(target_modules=["k_proj", "down_proj"])),
    "suffix_path": ("llama", dict(target_modules=["self_attn.o_proj", "mlp.up_proj"])),
    "regex": ("llama", dict(target_modules=r".*\.layers\.1\..*_proj")),
    "all_linear": ("llama_tied", dict(target_modules="all-linear")),
    "all_linear_qwen2": ("qwen2", dict(target_modules="all-linear")),
    "all_linear_mistral_hd": ("llama_hd32", dict(target_modules="all-linear")),
    "default_mistral": ("mistral", {}),
    "exclude_list": ("llama", dict(target_modules="all-linear", exclude_modules=["down_proj", "k_proj"])),
    "exclude_regex": ("llama", dict(target_modules=["q_proj", "v_proj"], exclude_modules=r".*\.0\..*")),
    "layers_int": ("llama", dict(target_modules=["q_proj", "gate_proj"], layers_to_transform=1)),
    "layers_list_pattern": (
        "llama",
        dict(target_modules=["v_proj"], layers_to_transform=[0], layers_pattern="layers"),
    ),
    "rank_alpha_patterns": (
        "llama",
        dict(
            target_modules="all-linear",
            r=4,
            lora_alpha=8,
            # dict order decides: layer 0's q_proj hits its own key first, layer 1's hits "q_proj"
            rank_pattern={"layers.0.self_attn.q_proj": 3, "q_proj": 5, r"model\.layers\.1\.mlp\..*": 2},
            alpha_pattern={"v_proj": 16, "^model.layers.0.*": 3},
        ),
    ),
    "rslora": ("llama", dict(target_modules=["q_proj", "o_proj"], r=4, lora_alpha=16, use_rslora=True)),
    "rslora_patterns": ("llama", dict(use_rslora=True, rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 5.5})),
    "dora": ("llama", dict(target_modules="all-linear", use_dora=True)),
    "dora_qwen2": ("qwen2", dict(target_modules=["q_proj", "k_proj"], use_dora=True)),
    "lora_bias": ("qwen2", dict(target_modules=["q_proj", "v_proj", "o_proj"], lora_bias=True)),
    "embed_tokens": ("llama", dict(target_modules=["embed_tokens", "q_proj"])),
    "embed_tokens_tied": ("llama_tied", dict(target_modules=["embed_tokens", "v_proj"], r=6)),
}

ADALORA_CASES = {
    "default_targets": ("llama", {}),
    "all_linear_pruned": ("llama", dict(target_modules="all-linear", lora_alpha=32)),
    "rank_zero": ("llama", dict(prune_to_zero=["model.layers.0.self_attn.v_proj"])),
    "qwen2": ("qwen2", dict(target_modules=["q_proj", "down_proj"], init_r=6, target_r=3)),
}


def _read_and_oracle(bases, tmp_path, base_name, kind, options):
    base = bases(base_name)
    path = save_peft_model(make_peft_model(base, kind, **options), tmp_path / kind)
    adapter = read_adapter(path, model_config(base))
    return adapter, load_peft_model(base, path), json.loads((path / "adapter_config.json").read_text())


@pytest.mark.parametrize("case", LORA_CASES)
def test_lora_matches_peft(bases, tmp_path, case):
    base_name, options = LORA_CASES[case]
    adapter, peft_model, config = _read_and_oracle(bases, tmp_path, base_name, "lora", options)
    layers = peft_lora_layers(peft_model)
    mc = model_config(bases(base_name))

    assert adapter.kind is AdapterKind.LORA and adapter.peft_type == "LORA"
    assert set(lora_target_names(config, mc)) == set(layers)
    assert set(adapter.lora) | ({EMBEDDING_NAME} if adapter.embedding else set()) == set(layers)
    assert adapter.use_dora == bool(options.get("use_dora"))
    for name, layer in layers.items():
        expected = layer.get_delta_weight("default")  # [out, in]; embedding: [vocab, hidden]
        if name == EMBEDDING_NAME:
            got = (adapter.embedding.scale * adapter.embedding.B @ adapter.embedding.A).T
            assert adapter.embedding.scale == layer.scaling["default"]
        else:
            module = adapter.lora[name]
            got = module.scale * module.B @ module.A
            assert module.scale == layer.scaling["default"] == module_scale(config, name, module.rank)
            assert module.rank == layer.r["default"]
            _check_bias_and_magnitude(module, layer)
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def _check_bias_and_magnitude(module, layer):
    peft_bias = layer.lora_B["default"].bias
    assert (module.bias is None) == (peft_bias is None)
    if peft_bias is not None:
        torch.testing.assert_close(module.bias, peft_bias.detach(), atol=0, rtol=0)
    if layer.use_dora["default"]:
        magnitude = layer.lora_magnitude_vector["default"].weight.detach()
        torch.testing.assert_close(module.magnitude, magnitude, atol=0, rtol=0)
    else:
        assert module.magnitude is None


@pytest.mark.parametrize("case", ADALORA_CASES)
def test_adalora_folds_to_peft_delta(bases, tmp_path, case):
    base_name, options = ADALORA_CASES[case]
    adapter, peft_model, config = _read_and_oracle(bases, tmp_path, base_name, "adalora", options)
    layers = peft_lora_layers(peft_model)
    init_r = config["init_r"]

    assert adapter.peft_type == "ADALORA" and adapter.kind is AdapterKind.LORA
    assert set(lora_target_names(config, model_config(bases(base_name)))) == set(layers)
    # Modules pruned to rank 0 are dropped: PEFT's delta for them is exactly zero.
    pruned = {name for name, layer in layers.items() if layer.r["default"] == 0}
    assert set(adapter.lora) == set(layers) - pruned
    for name in pruned:
        assert not layers[name].get_delta_weight("default").any()
    assert any(m.rank < init_r for m in adapter.lora.values()), "training should prune some ranks"
    for name, module in adapter.lora.items():
        layer = layers[name]
        assert module.rank == layer.r["default"]
        expected_scale = layer.scaling["default"] / (layer.ranknum["default"].item() + 1e-5)
        assert module.scale == pytest.approx(expected_scale, rel=1e-6)
        assert module.scale == pytest.approx(config["lora_alpha"] / (init_r + 1e-5), rel=1e-12)
        torch.testing.assert_close(
            module.scale * module.B @ module.A, layer.get_delta_weight("default"), atol=ATOL, rtol=0
        )
    if case == "rank_zero":
        assert "model.layers.0.self_attn.v_proj" in pruned


def test_rank_pattern_order_is_the_files_order(bases, tmp_path):
    """PEFT saves the config with sorted keys, so a rank_pattern whose first-match order differs
    from sorted order does not survive save_pretrained: PEFT's loader fails on it, and so do we,
    with a message naming the module and both ranks."""
    base = bases("llama")
    options = dict(rank_pattern={"q_proj": 5, "layers.0.self_attn.q_proj": 3})  # in memory: both q 5
    path = save_peft_model(make_peft_model(base, "lora", **options), tmp_path / "order")
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_peft_model(base, path)
    with pytest.raises(AdapterFormatError, match=r"layers.0.self_attn.q_proj: lora_A.weight has rank 5 .* r=3"):
        read_adapter(path, model_config(base))


def test_adalora_ignores_r(bases, tmp_path):
    """`r` is not used by AdaLoRA: init_r and the pruned tensors decide the rank."""
    adapter, peft_model, _ = _read_and_oracle(bases, tmp_path, "llama", "adalora", dict(r=2, init_r=4))
    assert max(m.rank for m in adapter.lora.values()) <= 4
    for name, module in adapter.lora.items():
        assert module.rank == peft_lora_layers(peft_model)[name].r["default"]


def test_bin_weights_read_like_safetensors(bases, tmp_path):
    base = bases("llama")
    peft_model = make_peft_model(base, "lora", target_modules=["q_proj", "embed_tokens"], use_rslora=True)
    st = read_adapter(save_peft_model(peft_model, tmp_path / "st"), model_config(base))
    bin_path = save_peft_model(peft_model, tmp_path / "bin", safe_serialization=False)
    assert (bin_path / "adapter_model.bin").is_file() and not (bin_path / "adapter_model.safetensors").exists()
    from_bin = read_adapter(bin_path, model_config(base))
    assert from_bin.lora.keys() == st.lora.keys()
    for name in st.lora:
        torch.testing.assert_close(from_bin.lora[name].A, st.lora[name].A, atol=0, rtol=0)
        torch.testing.assert_close(from_bin.lora[name].B, st.lora[name].B, atol=0, rtol=0)
    torch.testing.assert_close(from_bin.embedding.A, st.embedding.A, atol=0, rtol=0)


def test_half_precision_weights_become_float32(bases, tmp_path):
    base = bases("llama")
    peft_model = make_peft_model(base, "lora").to(torch.bfloat16)
    adapter = read_adapter(save_peft_model(peft_model, tmp_path / "bf16"), model_config(base))
    for name, layer in peft_lora_layers(peft_model).items():
        module = adapter.lora[name]
        assert module.A.dtype == module.B.dtype == torch.float32
        torch.testing.assert_close(module.A, layer.lora_A["default"].weight.detach().float(), atol=0, rtol=0)


def test_adapter_summary_properties(bases, tmp_path):
    base = bases("llama")
    options = dict(target_modules=["q_proj", "down_proj", "embed_tokens"], r=4, rank_pattern={"down_proj": 6})
    adapter, _, _ = _read_and_oracle(bases, tmp_path, "llama", "lora", options)
    assert adapter.rank == 6
    assert adapter.target_modules == ["down_proj", "embed_tokens", "q_proj"]
    assert adapter.num_virtual_tokens == 0
    assert adapter.source.endswith("lora")
    assert adapter.config["peft_type"] == "LORA"
    del base
