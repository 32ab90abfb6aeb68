"""Every way an adapter directory can be wrong: AdapterFormatError with a message naming the problem.

Each case copies a valid adapter that PEFT saved, breaks one thing, and reads it.
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import shutil
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

from runtime.adapters.peft_format import read_adapter
from runtime.adapters.types import AdapterFormatError
from runtime.config import ModelConfig
from tests.peft_factory import make_peft_adapter, make_tiny_model, model_config

SOURCES = {
    "lora": ("lora", dict(target_modules=["q_proj", "v_proj"])),
    "lora_emb": ("lora", dict(target_modules=["embed_tokens", "q_proj"])),
    "adalora": ("adalora", dict(target_modules=["q_proj", "v_proj"])),
    "prompt": ("prompt_tuning", dict(num_virtual_tokens=4)),
    "prefix": ("prefix_tuning", dict(num_virtual_tokens=4)),
}
Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """name -> a valid adapter directory saved by PEFT on the tiny llama base."""
    base = make_tiny_model("llama")
    root = tmp_path_factory.mktemp("sources")
    return {name: make_peft_adapter(base, kind, root / name, **opts) for name, (kind, opts) in SOURCES.items()}


@pytest.fixture(scope="module")
def llama():
    return model_config(make_tiny_model("llama"))


# ------------------------------------------------------------------------------ mutations


def set_config(**changes) -> Callable[[Path], None]:
    def mutate(d: Path) -> None:
        config = json.loads((d / "adapter_config.json").read_text())
        config.update(changes)
        (d / "adapter_config.json").write_text(json.dumps(config))
    return mutate


def drop_config(field: str) -> Callable[[Path], None]:
    def mutate(d: Path) -> None:
        config = json.loads((d / "adapter_config.json").read_text())
        del config[field]
        (d / "adapter_config.json").write_text(json.dumps(config))
    return mutate


def edit_tensors(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def mutate(d: Path) -> None:
        tensors = load_file(str(d / "adapter_model.safetensors"))
        edit(tensors)
        save_file(tensors, str(d / "adapter_model.safetensors"), metadata={"format": "pt"})
    return mutate


def put(key: str, value: torch.Tensor) -> Callable[[Path], None]:
    return edit_tensors(lambda t: t.update({key: value}))


def remove(name: str) -> Callable[[Path], None]:
    return lambda d: (d / name).unlink()


def write(name: str, data: bytes) -> Callable[[Path], None]:
    return lambda d: (d / name).write_bytes(data)


def _nan(t: dict) -> None:
    t[f"{Q0}.lora_B.weight"][0, 0] = float("nan")


def _inf(t: dict) -> None:
    t["prompt_embeddings"][1, 2] = float("inf")


def _many_unexpected(t: dict) -> None:
    t.update({f"extra.{i}": torch.zeros(1) for i in range(20)})


def _bin_with_code(d: Path) -> None:
    """A pickle holding an arbitrary object (full unpickling would import and build it)."""
    (d / "adapter_model.safetensors").unlink()
    torch.save({"weights": torch.zeros(2), "obj": datetime.date(2024, 1, 1)}, d / "adapter_model.bin")


def _only_prompt_weights(t: dict) -> None:
    t.clear()
    t["prompt_embeddings"] = torch.zeros(4, 64)


@dataclasses.dataclass
class Case:
    source: str  # which valid adapter to start from (SOURCES)
    message: str  # regex the AdapterFormatError message must contain
    mutate: Callable[[Path], None] | None = None  # breaks the copied directory
    model: Callable[[ModelConfig], ModelConfig] | None = None  # changes the base it is read for
    kwargs: dict = dataclasses.field(default_factory=dict)  # read_adapter keyword arguments


def base(**changes) -> Callable[[ModelConfig], ModelConfig]:
    return lambda mc: dataclasses.replace(mc, **changes)


ADALORA_Q0_MASK = "model.layers.0.self_attn.q_proj.lora_E"

CASES = {
    # files
    "config_missing": Case("lora", "no adapter_config.json", remove("adapter_config.json")),
    "weights_missing": Case("lora", "no adapter_model.safetensors", remove("adapter_model.safetensors")),
    "config_invalid_json": Case("lora", "not valid JSON", write("adapter_config.json", b"{'r': 8,")),
    "config_not_object": Case("lora", "JSON object", write("adapter_config.json", b"[1, 2]")),
    "weights_corrupt": Case("lora", "could not read", write("adapter_model.safetensors", b"\x00garbage")),
    "bin_not_only_tensors": Case("lora", "weights_only", _bin_with_code),
    # peft_type
    "peft_type_missing": Case("lora", "no peft_type", drop_config("peft_type")),
    "peft_type_unsupported": Case("lora", "unsupported peft_type 'IA3'.*LORA", set_config(peft_type="IA3")),
    # LoRA fields that change the forward
    "modules_to_save": Case("lora", "modules_to_save", set_config(modules_to_save=["lm_head"])),
    "trainable_tokens": Case("lora", "trainable_token_indices", set_config(trainable_token_indices=[1, 2])),
    "layer_replication": Case("lora", "layer_replication", set_config(layer_replication=[[0, 2], [1, 2]])),
    "alora": Case("lora", "alora_invocation_tokens", set_config(alora_invocation_tokens=[5, 6])),
    "fan_in_fan_out": Case("lora", "fan_in_fan_out=True", set_config(fan_in_fan_out=True)),
    "bias_all": Case("lora", "bias='all'", set_config(bias="all")),
    "bias_lora_only": Case("adalora", "bias='lora_only'", set_config(bias="lora_only")),
    "qalora": Case("lora", "use_qalora", set_config(use_qalora=True)),
    "target_parameters": Case("lora", "target_parameters", set_config(target_parameters=["experts.down_proj"])),
    "kasa": Case("lora", "kasa_config", set_config(kasa_config={"r": 4})),
    "arrow": Case("lora", "arrow_config", set_config(arrow_config={"top_k": 2})),
    "monteclora": Case("lora", "monteclora_config", set_config(monteclora_config={"num_samples": 2})),
    "bdlora": Case("lora", "use_bdlora", set_config(use_bdlora={"nblocks": 2})),
    "pissa": Case("lora", "modifies the base weights", set_config(init_lora_weights="pissa_niter_4")),
    "loftq": Case("lora", "init_lora_weights='loftq'", set_config(init_lora_weights="loftq")),
    "dora_embedding": Case("lora_emb", "DoRA on embed_tokens", set_config(use_dora=True)),
    "tied_embedding_lora": Case("lora_emb", "lm_head", set_config(ensure_weight_tying=True),
                                model=base(tie_word_embeddings=True)),
    # LoRA config values
    "r_not_int": Case("lora", "r must be an integer", set_config(r="eight")),
    "r_zero": Case("lora", "rank r must be positive", set_config(r=0)),
    "alpha_not_number": Case("lora", "lora_alpha must be a finite number", set_config(lora_alpha="x")),
    "rank_pattern_not_dict": Case("lora", "rank_pattern must be a JSON object", set_config(rank_pattern=[1])),
    "rank_config_mismatch": Case("lora", r"v_proj: lora_A.weight has rank 4 .* r=2",
                                 set_config(r=4, lora_alpha=8, rank_pattern={"v_proj": 2})),
    "targets_nothing": Case("lora", "matches no module", set_config(target_modules=["c_attn"])),
    "targets_lm_head": Case("lora", "lm_head", set_config(target_modules=["q_proj", "lm_head"])),
    # keys
    "key_missing": Case("lora", rf"missing keys: {Q0}.lora_B.weight",
                        edit_tensors(lambda t: t.pop(f"{Q0}.lora_B.weight"))),
    "key_unexpected": Case("lora", "unexpected keys: base_model.model.lm_head.lora_A.weight",
                           put("base_model.model.lm_head.lora_A.weight", torch.zeros(4, 64))),
    "keys_truncated": Case("lora", r"\.\.\. and 12 more", edit_tensors(_many_unexpected)),
    "fewer_layers_than_adapter": Case("lora", "unexpected keys: base_model.model.model.layers.1",
                                      model=base(num_layers=1)),
    "lora_on_prompt_weights": Case("lora", "missing keys: .*unexpected keys: prompt_embeddings",
                                   edit_tensors(_only_prompt_weights)),
    # values
    "nan": Case("lora", rf"{Q0}.lora_B.weight holds non-finite", edit_tensors(_nan)),
    "inf": Case("prompt", "prompt_embeddings holds non-finite", edit_tensors(_inf)),
    "int_dtype": Case("lora", "dtype torch.int8",
                      put(f"{Q0}.lora_A.weight", torch.ones(4, 64, dtype=torch.int8))),
    "float64_dtype": Case("prompt", "dtype torch.float64",
                          put("prompt_embeddings", torch.zeros(4, 64, dtype=torch.float64))),
    # shapes and limits
    "base_hidden_mismatch": Case("lora", r"q_proj.lora_A.weight has shape \[4, 64\], expected \[4, 96\]",
                                 model=base(hidden_size=96)),
    "base_vocab_mismatch": Case("lora_emb", r"embed_tokens.* has shape \[.*128.*\], expected \[.*100.*\]",
                                model=base(vocab_size=100)),
    "rank_above_max": Case("lora", "rank 4, above this server's max_rank=2", kwargs=dict(max_rank=2)),
    "adalora_rank_above_max": Case("adalora", "above this server's max_rank=1", kwargs=dict(max_rank=1)),
    "adalora_mask_wrong_length": Case("adalora", "list of 4 .init_r. booleans",
                                      set_config(rank_pattern={ADALORA_Q0_MASK: [True]})),
    "adalora_mask_unknown_module": Case("adalora", "does not target",
                                        set_config(rank_pattern={"model.layers.0.mlp.up_proj.lora_E": [True] * 4})),
    "adalora_mask_disagrees": Case("adalora", r"q_proj: lora_A has rank \d but .* k=4 \(init_r, no rank_",
                                   set_config(rank_pattern=None)),
    "adalora_dora": Case("adalora", "use_dora", set_config(use_dora=True)),
    # prompt learning
    "prompt_task_type": Case("prompt", "task_type='SEQ_CLS'.*CAUSAL_LM", set_config(task_type="SEQ_CLS")),
    "prefix_task_type_missing": Case("prefix", "task_type=None", set_config(task_type=None)),
    "prompt_too_many_tokens": Case("prompt", "4 virtual tokens, more than the 3",
                                   kwargs=dict(max_virtual_tokens=3)),
    "prompt_context_too_short": Case("prefix", "more than the 3", model=base(max_position_embeddings=4)),
    "prompt_n_mismatch": Case("prompt", r"shape \[4, 64\], expected \[5, 64\]",
                              set_config(num_virtual_tokens=5)),
    "prompt_token_dim": Case("prompt", "token_dim=96.*hidden_size is 64", set_config(token_dim=96)),
    "prompt_hidden_mismatch": Case("prompt", "token_dim=64, but the base model's hidden_size is 96",
                                   model=base(hidden_size=96)),
    "prompt_modules_to_save": Case("prompt", "modules_to_save", set_config(modules_to_save=["lm_head"])),
    "prompt_encoder_decoder": Case("prompt", "encoder-decoder", set_config(num_transformer_submodules=2)),
    "prompt_n_invalid": Case("prompt", "num_virtual_tokens must be a positive",
                             set_config(num_virtual_tokens=0)),
    "prompt_extra_key": Case("prompt", "unexpected keys: extra", put("extra", torch.zeros(1))),
    "prefix_num_layers": Case("prefix", "num_layers=2, but the base model's num_hidden_layers is 3",
                              model=base(num_layers=3)),
    "prefix_heads_not_gqa": Case("prefix", "num_attention_heads=4, but the base model's num_key_value_heads",
                                 set_config(num_attention_heads=4, token_dim=64)),
    "prefix_kv_width": Case("prefix", "token_dim=32, but head_dim . num_key_value_heads of the base model is 16",
                            model=base(head_dim=8)),
}


@pytest.mark.parametrize("case", CASES)
def test_malformed_adapter_is_rejected(sources, llama, tmp_path, case):
    case = CASES[case]
    adapter_dir = tmp_path / "adapter"
    shutil.copytree(sources[case.source], adapter_dir)
    if case.mutate is not None:
        case.mutate(adapter_dir)
    model = case.model(llama) if case.model else llama
    before = _digest(adapter_dir)
    with pytest.raises(AdapterFormatError, match=case.message):
        read_adapter(adapter_dir, model, **case.kwargs)
    assert _digest(adapter_dir) == before, "read_adapter must not touch the directory"


def test_every_source_is_valid(sources, llama):
    for path in sources.values():
        read_adapter(path, llama)


def test_missing_or_wrong_directory(tmp_path, llama):
    with pytest.raises(AdapterFormatError, match="does not exist"):
        read_adapter(tmp_path / "nope", llama)
    (tmp_path / "file").write_text("x")
    with pytest.raises(AdapterFormatError, match="not a directory"):
        read_adapter(tmp_path / "file", llama)


def test_adapter_for_a_bigger_base(tmp_path, llama):
    """An adapter trained on a hidden-96 model, loaded on the hidden-64 one: module, expected, found."""
    path = make_peft_adapter(make_tiny_model("llama", hidden_size=96), "lora", tmp_path)
    with pytest.raises(AdapterFormatError) as error:
        read_adapter(path, llama)
    message = str(error.value)
    assert "model.layers.0.self_attn.q_proj.lora_A.weight" in message
    assert "[4, 96], expected [4, 64]" in message and "different base model" in message


def test_safetensors_preferred_over_bin(sources, tmp_path, llama):
    adapter_dir = tmp_path / "both"
    shutil.copytree(sources["prompt"], adapter_dir)
    torch.save({"prompt_embeddings": torch.zeros(4, 64)}, adapter_dir / "adapter_model.bin")
    expected = load_file(str(adapter_dir / "adapter_model.safetensors"))["prompt_embeddings"]
    torch.testing.assert_close(read_adapter(adapter_dir, llama).prompt, expected, atol=0, rtol=0)


def test_base_model_name_mismatch_is_fine(sources, tmp_path, llama):
    adapter_dir = tmp_path / "renamed"
    shutil.copytree(sources["lora"], adapter_dir)
    set_config(base_model_name_or_path="someone/else-7b", revision="main")(adapter_dir)
    assert read_adapter(adapter_dir, llama).config["base_model_name_or_path"] == "someone/else-7b"


def _digest(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}
