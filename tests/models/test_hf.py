"""Loading Hugging Face directories: tiny random models saved by transformers itself.

transformers is the reference: the config fields are compared with the HF config object, the
bias flags with the HF modules' own biases, and the tensors with the HF model's state_dict.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    Qwen2Config,
)

from runtime.config import UnsupportedModelError
from runtime.models import (
    ModelFilesError,
    expected_shapes,
    load_model_config,
    load_state_dict,
    load_tokenizer,
    resolve_model_dir,
)

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 128}

#: name -> (config, the sliding window Quiver must apply to every layer)
CASES = {
    "llama": (LlamaConfig(**TINY), None),
    "llama_tied": (LlamaConfig(**TINY, tie_word_embeddings=True), None),
    "llama_rope_llama3": (LlamaConfig(**TINY, rope_parameters=LLAMA3_ROPE), None),
    "llama_rope_linear_biases": (
        LlamaConfig(**TINY, rope_parameters={"rope_type": "linear", "factor": 2.0,
                                             "rope_theta": 20000.0},
                    attention_bias=True, mlp_bias=True), None),
    "llama_wide_head_dim": (LlamaConfig(**TINY, head_dim=16), None),
    "mistral_sliding": (MistralConfig(**TINY, sliding_window=16), 16),
    "mistral_full": (MistralConfig(**TINY, sliding_window=None), None),
    "qwen2": (Qwen2Config(**TINY), None),
    "qwen2_tied": (Qwen2Config(**TINY, tie_word_embeddings=True), None),
    "qwen2_all_sliding": (Qwen2Config(**TINY, use_sliding_window=True, sliding_window=8,
                                      max_window_layers=0), 8),
}


def build(hf_config, seed: int = 0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(hf_config).eval()


def reference_tensors(model) -> dict[str, torch.Tensor]:
    """The HF model's state_dict as a checkpoint must provide it (a tied head is the embedding)."""
    tensors = dict(model.state_dict())
    if model.config.tie_word_embeddings:
        del tensors["lm_head.weight"]
    return tensors


def save_bin(model, path: Path) -> Path:
    """A legacy pytorch_model.bin directory (transformers 5 no longer writes one)."""
    path.mkdir()
    model.config.save_pretrained(path)
    torch.save(model.state_dict(), path / "pytorch_model.bin")
    return path


SAVERS = {
    "safetensors": lambda model, path: model.save_pretrained(path) or path,
    "sharded": lambda model, path: model.save_pretrained(path, max_shard_size="20KB") or path,
    "bin": save_bin,
}


@pytest.mark.parametrize("case", CASES)
def test_config_matches_transformers(case, tmp_path):
    hf_config, window = CASES[case]
    model = build(hf_config)
    model.save_pretrained(tmp_path)
    config = load_model_config(tmp_path)
    hf = model.config
    assert config.architecture == hf.model_type
    assert (config.vocab_size, config.hidden_size, config.intermediate_size) == (
        hf.vocab_size, hf.hidden_size, hf.intermediate_size)
    assert (config.num_layers, config.num_heads, config.num_kv_heads, config.head_dim) == (
        hf.num_hidden_layers, hf.num_attention_heads, hf.num_key_value_heads,
        model.model.layers[0].self_attn.head_dim)
    assert config.rms_norm_eps == hf.rms_norm_eps
    assert config.max_position_embeddings == hf.max_position_embeddings
    assert config.tie_word_embeddings == hf.tie_word_embeddings
    assert config.rope_theta == hf.rope_parameters["rope_theta"]
    rope = {k: v for k, v in hf.rope_parameters.items() if k not in ("rope_theta", "type")}
    assert config.rope_scaling == rope
    assert config.sliding_window == window
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert config.attention_bias == (attn.q_proj.bias is not None)
    assert config.o_proj_bias == (attn.o_proj.bias is not None)
    assert config.mlp_bias == (mlp.gate_proj.bias is not None)
    assert config.name == str(tmp_path)


@pytest.mark.parametrize("case", CASES)
def test_expected_shapes_are_the_hf_modules(case):
    model = build(CASES[case][0])
    tensors = reference_tensors(model)
    from runtime.config import ModelConfig

    config = ModelConfig.from_hf_dict(model.config.to_dict())
    assert expected_shapes(config) == {k: tuple(v.shape) for k, v in tensors.items()}


@pytest.mark.parametrize("saver", SAVERS)
@pytest.mark.parametrize("case", ["llama", "llama_tied", "llama_rope_linear_biases", "qwen2",
                                  "qwen2_tied", "mistral_sliding"])
def test_state_dict_equals_model(case, saver, tmp_path):
    model = build(CASES[case][0])
    model_dir = SAVERS[saver](model, tmp_path / "model")
    if saver == "sharded":
        assert (model_dir / "model.safetensors.index.json").is_file()
        assert len(list(model_dir.glob("model-*.safetensors"))) > 1
    loaded = load_state_dict(model_dir)
    expected = reference_tensors(model)
    assert loaded.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(loaded[name], tensor), name


def test_dtype_cast(tmp_path):
    model = build(CASES["qwen2"][0])
    model.save_pretrained(tmp_path)
    loaded = load_state_dict(tmp_path, dtype=torch.bfloat16)
    for name, tensor in reference_tensors(model).items():
        assert loaded[name].dtype == torch.bfloat16
        assert torch.equal(loaded[name], tensor.to(torch.bfloat16)), name


def test_safetensors_preferred_over_bin(tmp_path):
    model = build(CASES["llama"][0])
    model.save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not a pickle")
    assert torch.equal(load_state_dict(tmp_path)["model.norm.weight"],
                       model.state_dict()["model.norm.weight"])


def test_rotary_inv_freq_and_tied_head_copy_are_ignored(tmp_path):
    model = build(CASES["llama_tied"][0])
    model.save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    assert "lm_head.weight" not in tensors
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    tensors["model.rotary_emb.inv_freq"] = torch.ones(4)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    assert load_state_dict(tmp_path).keys() == reference_tensors(model).keys()


def rewrite_weights(model_dir: Path, edit) -> None:
    path = model_dir / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def test_missing_tensor_is_named(tmp_path):
    build(CASES["llama"][0]).save_pretrained(tmp_path)
    rewrite_weights(tmp_path, lambda t: t.pop("model.layers.1.mlp.down_proj.weight"))
    missing = r"missing tensors \(1\): model\.layers\.1\.mlp\.down_proj\.weight"
    with pytest.raises(ModelFilesError, match=missing):
        load_state_dict(tmp_path)


def test_untied_checkpoint_without_lm_head_is_refused(tmp_path):
    build(CASES["llama"][0]).save_pretrained(tmp_path)
    rewrite_weights(tmp_path, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(ModelFilesError, match=r"missing tensors \(1\): lm_head\.weight"):
        load_state_dict(tmp_path)


def test_unexpected_and_misshaped_tensors_are_named(tmp_path):
    build(CASES["llama"][0]).save_pretrained(tmp_path)

    def edit(tensors):
        tensors["model.layers.0.self_attn.q_proj.lora_A.weight"] = torch.zeros(2, 32)
        tensors["model.norm.weight"] = torch.zeros(33)

    rewrite_weights(tmp_path, edit)
    with pytest.raises(ModelFilesError) as info:
        load_state_dict(tmp_path)
    message = str(info.value)
    assert "unexpected tensors (1): model.layers.0.self_attn.q_proj.lora_A.weight" in message
    assert "model.norm.weight: (33,), config implies (32,)" in message


def test_missing_shard_is_named(tmp_path):
    build(CASES["llama"][0]).save_pretrained(tmp_path, max_shard_size="20KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(ModelFilesError, match=f"missing: .*{shard.name}"):
        load_state_dict(tmp_path)


def test_no_weights(tmp_path):
    LlamaConfig(**TINY).save_pretrained(tmp_path)
    with pytest.raises(ModelFilesError, match="has no weights: expected one of model.safetensors"):
        load_state_dict(tmp_path)


class Payload:
    """Pickles as a call to os.mkdir(path): what a malicious pytorch_model.bin would run."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_malicious_bin_is_refused_and_its_payload_never_runs(tmp_path):
    model_dir = save_bin(build(CASES["llama"][0]), tmp_path / "model")
    pwned = tmp_path / "pwned"
    state = torch.load(model_dir / "pytorch_model.bin", weights_only=True)
    state["model.norm.weight"] = Payload(pwned)
    torch.save(state, model_dir / "pytorch_model.bin")
    with pytest.raises(ModelFilesError, match=r"weights_only=True"):
        load_state_dict(model_dir)
    assert not pwned.exists()
    # The file is a live payload: full unpickling (what Quiver never does) runs it.
    torch.load(model_dir / "pytorch_model.bin", weights_only=False)
    assert pwned.is_dir()


@pytest.mark.parametrize("hf_config, name", [
    (GPT2Config(n_layer=1, n_embd=32, n_head=4), "gpt2"),
    (MixtralConfig(**TINY, num_local_experts=4), "mixtral"),
])
def test_unsupported_architecture_is_named(hf_config, name, tmp_path):
    hf_config.save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match=f"unsupported architecture '{name}'"):
        load_model_config(tmp_path)
    with pytest.raises(UnsupportedModelError, match=name):
        load_state_dict(tmp_path)


def test_qwen2_mixing_full_and_sliding_layers_is_refused(tmp_path):
    hf_config = Qwen2Config(**TINY, use_sliding_window=True, sliding_window=8, max_window_layers=1)
    hf_config.save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="mixes full-attention and sliding-window"):
        load_model_config(tmp_path)


def test_prequantized_checkpoint_is_refused(tmp_path):
    d = LlamaConfig(**TINY).to_dict()
    d["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(UnsupportedModelError, match="pre-quantized checkpoint .*gptq"):
        load_model_config(tmp_path)


def test_transformers4_spelling_of_rope(tmp_path):
    """A hub config.json written by transformers 4: rope_scaling with `type`, rope_theta on top."""
    d = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 96,
         "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "rope_theta": 500000.0,
         "rope_scaling": {"type": "linear", "factor": 4.0}, "eos_token_id": [5, 7]}
    (tmp_path / "config.json").write_text(json.dumps(d))
    config = load_model_config(tmp_path)
    assert config.rope_theta == 500000.0
    assert config.rope_scaling == {"rope_type": "linear", "factor": 4.0}
    assert config.eos_token_ids == (5, 7)
    assert config.head_dim == 8


def test_resolve_model_dir_errors(tmp_path):
    with pytest.raises(ModelFilesError, match="does not download Hugging Face Hub ids"):
        resolve_model_dir("HuggingFaceTB/SmolLM2-135M-Instruct")
    with pytest.raises(ModelFilesError, match="does not exist"):
        resolve_model_dir(str(tmp_path / "nowhere"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ModelFilesError, match="is not a directory"):
        resolve_model_dir(str(tmp_path / "file"))
    with pytest.raises(ModelFilesError, match="has no config.json"):
        resolve_model_dir(str(tmp_path))


def test_resolve_model_dir_accepts_a_local_dir(tmp_path):
    LlamaConfig(**TINY).save_pretrained(tmp_path / "m")
    assert resolve_model_dir(str(tmp_path / "m")) == (tmp_path / "m").resolve()


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    build(CASES["llama"][0]).save_pretrained(tmp_path)
    with pytest.raises(ModelFilesError, match="cannot load a tokenizer"):
        load_tokenizer(tmp_path)


QWEN2_V4 = {"model_type": "qwen2", "vocab_size": 96, "hidden_size": 32, "intermediate_size": 48,
            "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
            "sliding_window": 8}


@pytest.mark.parametrize("use_sliding_window, max_window_layers, window", [
    (False, 0, None),   # Qwen2.5 configs: a window is written but switched off
    (True, 0, 8),       # every layer slides
    (True, 4, None),    # sliding starts past the last layer
    (True, 1, "mixed"),
])
def test_qwen2_sliding_window_without_layer_types(use_sliding_window, max_window_layers, window,
                                                  tmp_path):
    """transformers 4 wrote no `layer_types`; the same rule as Qwen2Config derives them."""
    d = {**QWEN2_V4, "use_sliding_window": use_sliding_window,
         "max_window_layers": max_window_layers}
    (tmp_path / "config.json").write_text(json.dumps(d))
    hf_layer_types = Qwen2Config(**d).layer_types
    if window == "mixed":
        assert set(hf_layer_types) == {"full_attention", "sliding_attention"}
        with pytest.raises(UnsupportedModelError, match="mixes"):
            load_model_config(tmp_path)
    else:
        assert load_model_config(tmp_path).sliding_window == window


def test_stop_ids_join_config_generation_config_and_tokenizer(tmp_path):
    """transformers' generate stops on generation_config's ids; trainers append the tokenizer's."""
    from transformers import GenerationConfig, PreTrainedTokenizerFast

    from runtime.models.base import load_base
    from tests.peft_factory import make_tiny_tokenizer

    build(CASES["llama"][0]).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "eos_token_id": 2}))
    GenerationConfig(eos_token_id=[2, 7]).save_pretrained(tmp_path)
    make_tiny_tokenizer(tmp_path, vocab_size=32)
    tok = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    tok.eos_token = "w9"
    tok.save_pretrained(tmp_path)

    assert load_model_config(tmp_path).eos_token_ids == (2, 7)
    base = load_base(str(tmp_path), quantize="none", dtype="float32", device="cpu")
    assert base.config.eos_token_ids == (2, 7, 9)
    assert base.model.cfg.eos_token_ids == (2, 7, 9)  # what the engine stops on
