"""write_adapter produces directories that PEFT loads cleanly and read_adapter reads back."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from runtime.adapters.peft_format import read_adapter, write_adapter
from runtime.adapters.types import AdapterFormatError
from tests.peft_factory import load_peft_model, make_peft_adapter, model_config, peft_lora_layers

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
CASES = {
    "lora_dora_all_linear": ("lora", dict(target_modules="all-linear", use_dora=True)),
    "lora_embedding": ("lora", dict(target_modules=["embed_tokens", "v_proj"])),
    "adalora": ("adalora", dict(prune_to_zero=["model.layers.1.self_attn.q_proj"])),
    "prefix": ("prefix_tuning", dict(prefix_projection=True, encoder_hidden_size=16)),
}


def _peft_load_result(base, path):
    """(PEFT's from_pretrained warnings about missing keys, load_adapter's missing / unexpected keys)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = load_peft_model(base, path)
    key_warnings = [str(w.message) for w in caught if "missing adapter keys" in str(w.message)]
    result = peft_model.load_adapter(str(path), adapter_name="again")
    return peft_model, key_warnings, result


@pytest.mark.parametrize("case", CASES)
def test_rewritten_peft_adapter_loads_cleanly_in_peft(bases, tmp_path, case):
    base = bases("llama")
    kind, options = CASES[case]
    original = make_peft_adapter(base, kind, tmp_path / "orig", **options)
    config = json.loads((original / "adapter_config.json").read_text())
    tensors = load_file(str(original / "adapter_model.safetensors"))
    rewritten = tmp_path / "rewritten"
    write_adapter(rewritten, config, tensors)

    peft_model, key_warnings, result = _peft_load_result(base, rewritten)
    assert key_warnings == [] and result.missing_keys == []
    # PEFT's second load_adapter of a prompt-learning adapter reports its one key as unexpected
    # (it loads it by another path); the rewrite must not add anything to PEFT's own report.
    assert result.unexpected_keys == ([] if kind != "prefix_tuning" else ["prompt_embeddings"])
    assert result.unexpected_keys == _peft_load_result(base, original)[2].unexpected_keys
    with safe_open(str(rewritten / "adapter_model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    assert json.loads((rewritten / "adapter_config.json").read_text()) == config
    mc = model_config(base)
    _assert_same_adapter(read_adapter(rewritten, mc), read_adapter(original, mc))
    for layer in peft_lora_layers(peft_model).values():
        again, default = layer.get_delta_weight("again"), layer.get_delta_weight("default")
        torch.testing.assert_close(again, default, atol=0, rtol=0)


def test_minimal_config_from_runtime_adapter(bases, tmp_path):
    """A trainer-style export: a minimal config (a set of targets) and tensors keyed from the Adapter."""
    base = bases("llama")
    mc = model_config(base)
    source = read_adapter(make_peft_adapter(base, "lora", tmp_path / "src", r=4, lora_alpha=8), mc)
    tensors = {}
    for name, module in source.lora.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = module.A
        tensors[f"base_model.model.{name}.lora_B.weight"] = module.B
    targets = {"v_proj", "q_proj"}  # a set, as PEFT holds it in memory
    config = dict(peft_type="LORA", task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=targets)
    write_adapter(tmp_path / "out", config, tensors)

    written = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert written["target_modules"] == ["q_proj", "v_proj"]
    peft_model, key_warnings, result = _peft_load_result(base, tmp_path / "out")
    assert key_warnings == [] and result.missing_keys == [] and result.unexpected_keys == []
    for name, layer in peft_lora_layers(peft_model).items():
        module = source.lora[name]
        expected = module.scale * module.B @ module.A
        torch.testing.assert_close(layer.get_delta_weight("default"), expected, atol=1e-6, rtol=0)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [CONFIG, WEIGHTS]


def test_dropped_key_is_seen_by_peft_and_by_us(bases, tmp_path):
    """Negative control for the clean-load checks above."""
    base = bases("llama")
    original = make_peft_adapter(base, "lora", tmp_path / "orig")
    tensors = load_file(str(original / "adapter_model.safetensors"))
    dropped = sorted(tensors)[0]
    del tensors[dropped]
    write_adapter(tmp_path / "broken", json.loads((original / "adapter_config.json").read_text()), tensors)
    _, key_warnings, result = _peft_load_result(base, tmp_path / "broken")
    assert any("missing adapter keys" in w for w in key_warnings)
    assert any(dropped.replace("lora_A.weight", "lora_A.again.weight") == k for k in result.missing_keys)
    with pytest.raises(AdapterFormatError, match="missing keys"):
        read_adapter(tmp_path / "broken", model_config(base))


def test_write_replaces_existing_files(tmp_path):
    write_adapter(tmp_path, {"peft_type": "PROMPT_TUNING"}, {"prompt_embeddings": torch.ones(2, 3)})
    write_adapter(tmp_path, {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 2},
                  {"prompt_embeddings": torch.zeros(2, 3, dtype=torch.bfloat16)})
    assert load_file(str(tmp_path / "adapter_model.safetensors"))["prompt_embeddings"].dtype == torch.bfloat16
    assert json.loads((tmp_path / "adapter_config.json").read_text())["num_virtual_tokens"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG, WEIGHTS]


def test_write_shares_storage_safely(tmp_path):
    """Views of one tensor (safetensors refuses shared storage) are written as copies."""
    weight = torch.randn(4, 8)
    write_adapter(tmp_path, {"peft_type": "LORA"}, {"a": weight[:2], "b": weight, "c": weight.T})
    loaded = load_file(str(tmp_path / "adapter_model.safetensors"))
    torch.testing.assert_close(loaded["c"], weight.T, atol=0, rtol=0)


@pytest.mark.parametrize(
    "config, tensors, message",
    [
        ({}, {"x": torch.zeros(1)}, "peft_type"),
        ({"peft_type": "LORA"}, {}, "non-empty"),
        ({"peft_type": "LORA"}, {"x": [1.0]}, "bad: \\['x'\\]"),
        ({"peft_type": "LORA", "when": object()}, {"x": torch.zeros(1)}, "not JSON-serialisable"),
    ],
)
def test_write_rejects_bad_input(tmp_path, config, tensors, message):
    with pytest.raises(AdapterFormatError, match=message):
        write_adapter(tmp_path / "out", config, tensors)
    assert not (tmp_path / "out").exists()


def _assert_same_adapter(a, b):
    assert a.peft_type == b.peft_type and a.kind == b.kind and a.lora.keys() == b.lora.keys()
    for name in a.lora:
        for field in ("A", "B", "bias", "magnitude"):
            x, y = getattr(a.lora[name], field), getattr(b.lora[name], field)
            assert (x is None) == (y is None)
            if x is not None:
                torch.testing.assert_close(x, y, atol=0, rtol=0)
        assert a.lora[name].scale == b.lora[name].scale
    for field in ("prompt", "prefix"):
        x, y = getattr(a, field), getattr(b, field)
        assert (x is None) == (y is None)
        if x is not None:
            torch.testing.assert_close(x, y, atol=0, rtol=0)
    assert (a.embedding is None) == (b.embedding is None)
    if a.embedding is not None:
        torch.testing.assert_close(a.embedding.A, b.embedding.A, atol=0, rtol=0)
        torch.testing.assert_close(a.embedding.B, b.embedding.B, atol=0, rtol=0)
