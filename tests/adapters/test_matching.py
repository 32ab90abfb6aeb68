"""PEFT's target-matching and scaling rules (runtime/adapters/matching.py) against PEFT itself."""
from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft import LoraConfig
from peft.tuners.tuners_utils import check_target_module_exists

from runtime.adapters.matching import hf_module_names, lora_target_names, module_rank, module_scale
from runtime.adapters.types import AdapterFormatError
from tests.peft_factory import model_config

LEAVES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
#: target / exclude entries that only ever match projections or embed_tokens
ENTRIES = LEAVES + ["embed_tokens", "self_attn.q_proj", "mlp.down_proj", "layers.1.mlp.up_proj",
                    "model.layers.0.self_attn.v_proj", "proj"]


@pytest.mark.parametrize("name", ["llama", "llama_tied", "qwen2", "mistral"])
def test_module_tree_is_hfs(bases, name):
    base = bases(name)
    assert hf_module_names(model_config(base)) == [n for n, _ in base.named_modules() if n]


def _assert_matches_peft(config: dict, mc) -> None:
    """Ours == PEFT's check_target_module_exists over the module tree (PEFT fails on no match too)."""
    peft_config = LoraConfig(task_type="CAUSAL_LM", **config)
    expected = [n for n in hf_module_names(mc) if check_target_module_exists(peft_config, n)]
    if not expected:
        with pytest.raises(AdapterFormatError, match="matches no module"):
            lora_target_names(config, mc)
    else:
        assert lora_target_names(config, mc) == expected


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    targets=st.lists(st.sampled_from(ENTRIES), min_size=1, max_size=4, unique=True),
    excludes=st.one_of(st.none(), st.lists(st.sampled_from(ENTRIES), max_size=3, unique=True)),
    layers=st.one_of(st.none(), st.integers(0, 2), st.lists(st.integers(0, 2), max_size=2, unique=True)),
    pattern=st.sampled_from([None, "layers", ["h", "layers"], "h"]),
)
def test_list_targets_match_peft(bases, targets, excludes, layers, pattern):
    config = dict(target_modules=targets, exclude_modules=excludes, layers_to_transform=layers)
    if layers is not None:
        config["layers_pattern"] = pattern
    _assert_matches_peft(config, model_config(bases("llama")))


@pytest.mark.parametrize(
    "regex",
    [
        r".*\.(q|v)_proj",
        r"model\.layers\.1\.mlp\..*_proj",
        r".*embed_tokens|.*\.0\.self_attn\.o_proj",
        r".*_proj",
    ],
)
@pytest.mark.parametrize("exclude", [None, r".*\.1\..*", ["k_proj"]])
def test_regex_targets_match_peft(bases, regex, exclude):
    _assert_matches_peft(dict(target_modules=regex, exclude_modules=exclude), model_config(bases("llama")))


def test_default_and_all_linear(bases):
    mc = model_config(bases("llama_tied"))
    q_and_v = [n for n in mc.linear_module_names() if n.endswith(("q_proj", "v_proj"))]
    assert lora_target_names({}, mc) == q_and_v
    assert lora_target_names({"target_modules": "ALL-LINEAR"}, mc) == mc.linear_module_names()


@pytest.mark.parametrize(
    "config, message",
    [
        (dict(target_modules=["lm_head", "q_proj"]), "lm_head"),
        (dict(target_modules=r".*layers\.0"), "model.layers.0"),
        (dict(target_modules=["norm"]), "model.norm"),
        (dict(target_modules=r"model\.layers\.1\.mlp\..*"), "act_fn"),  # PEFT fails on SiLU too
        (dict(target_modules=["c_attn"]), "matches no module"),
        (dict(target_modules=".*proj", layers_to_transform=[0]), "regex string"),
        (dict(target_modules=["q_proj"], layers_pattern="layers"), "layers_to_transform is not"),
        (dict(target_modules=["q_proj"], layers_to_transform="0"), "layers_to_transform must be"),
        (dict(target_modules=[1, 2]), "target_modules must be"),
        (dict(target_modules=["q_proj"], exclude_modules=3), "exclude_modules must be"),
        (dict(target_modules="model.(layers"), r"invalid regular expression 'model\.\(layers'"),
        (dict(target_modules=["q_proj"], exclude_modules="[q"), "invalid regular expression"),
    ],
)
def test_bad_target_configs(bases, config, message):
    with pytest.raises(AdapterFormatError, match=message):
        lora_target_names(config, model_config(bases("llama")))


def test_scale_follows_patterns_in_dict_order():
    config = dict(
        r=8, lora_alpha=16,
        rank_pattern={"layers.0.self_attn.q_proj": 2, "q_proj": 4},
        alpha_pattern={"^model.layers.1.*": 3, "v_proj": 32},
    )
    q0, q1, v1 = (f"model.layers.{name}" for name in ("0.self_attn.q_proj", "1.self_attn.q_proj", "1.self_attn.v_proj"))
    assert [module_rank(config, n) for n in (q0, q1, v1)] == [2, 4, 8]
    assert module_scale(config, q0, 2) == 16 / 2
    assert module_scale(config, q1, 4) == 3 / 4  # layer 1 matches "^model.layers.1.*"
    assert module_scale(config, v1, 8) == 3 / 8  # "^model.layers.1.*" comes before "v_proj"
    assert module_scale({**config, "use_rslora": True}, q0, 2) == 16 / math.sqrt(2)


def test_bad_pattern_regex():
    with pytest.raises(AdapterFormatError, match="invalid regular expression '\\(q' in rank_pattern"):
        module_rank({"rank_pattern": {"(q": 4}}, "model.layers.0.self_attn.q_proj")


def test_adalora_scale_uses_init_r():
    config = dict(peft_type="ADALORA", r=99, init_r=12, lora_alpha=32, use_rslora=True)
    assert module_scale(config, "model.layers.0.self_attn.q_proj", 3) == 32 / (12 + 1e-5)
    assert module_scale({**config, "lora_alpha": 0}, "model.layers.0.self_attn.q_proj", 3) == 3 / (12 + 1e-5)
