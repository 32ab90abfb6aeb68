"""PEFT's rules for which modules a LoRA / AdaLoRA config adapts, and at what scale.

A PEFT config does not list the adapted modules; it gives rules that PEFT evaluates against the
base model's `named_modules()` when the adapter is created or loaded. Quiver has no HF model
object, so it rebuilds the module tree of a Llama-family decoder from `ModelConfig` and evaluates
the same rules (peft 0.21.2: `tuners_utils.check_target_module_exists`,
`_maybe_include_all_linear_layers`, `utils.other.get_pattern_key`, `LoraLayer.update_layer`):

    model                                   containers, norms, act_fn, rotary_emb and lm_head
    model.embed_tokens                      are matchable names too: a config that matches
    model.layers.{i}                        them is one Quiver cannot serve (PEFT itself fails
    model.layers.{i}.self_attn.{q,k,v,o}_proj   on most of them), so it is rejected
    model.layers.{i}.mlp.{gate,up,down}_proj
    model.norm, model.rotary_emb, lm_head

Rules, in PEFT's order, for each module name:
  1. `exclude_modules`: a string is `re.fullmatch`ed; a list entry excludes the name if it equals
     it or the name ends with "." + entry.
  2. `target_modules`: null -> the architecture default (q_proj, v_proj); "all-linear" -> every
     decoder projection (never lm_head); a string -> `re.fullmatch`; a list -> equal or ends with
     "." + entry, and only then `layers_to_transform` filters on the layer index, taken from the
     first `.<layers_pattern>.<idx>.` segment (any `.<word>.<idx>.` when no pattern is given).
  3. Per-module rank / alpha (LoRA): `rank_pattern` / `alpha_pattern` keys are tried in dict
     order with `re.match(rf"(.*\\.)?({key})$", name)`; the first match wins.
"""
from __future__ import annotations

import math
import re
from typing import Any

from runtime.adapters.types import AdapterFormatError
from runtime.config import ModelConfig

EMBEDDING_NAME = "model.embed_tokens"
ALL_LINEAR = "all-linear"

#: PEFT's default `target_modules` (TRANSFORMERS_MODELS_TO_{LORA,ADALORA}_TARGET_MODULES_MAPPING).
DEFAULT_TARGET_MODULES = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
}

#: PEFT's AdaLoRA adds this to the rank in its scaling divisor.
ADALORA_EPS = 1e-5


def hf_module_names(model: ModelConfig) -> list[str]:
    """Every non-root name in `named_modules()` of the HF `*ForCausalLM` for this config, in order."""
    names = ["model", EMBEDDING_NAME, "model.layers"]
    for layer in range(model.num_layers):
        prefix = f"model.layers.{layer}"
        names += [prefix, f"{prefix}.self_attn"]
        names += [f"{prefix}.self_attn.{leaf}" for leaf in ("q_proj", "k_proj", "v_proj", "o_proj")]
        names += [f"{prefix}.mlp"]
        names += [f"{prefix}.mlp.{leaf}" for leaf in ("gate_proj", "up_proj", "down_proj")]
        names += [f"{prefix}.mlp.act_fn", f"{prefix}.input_layernorm", f"{prefix}.post_attention_layernorm"]
    return names + ["model.norm", "model.rotary_emb", "lm_head"]


def lora_target_names(config: dict, model: ModelConfig) -> list[str]:
    """Full names of the modules a LoRA / AdaLoRA config adapts on this base, in model order.

    Raises AdapterFormatError when the rules match nothing, or match a module that Quiver does not
    adapt (lm_head, norms, containers): PEFT would fail on the latter too, or adapt lm_head.
    """
    targets, excludes = _targets(config, model), _excludes(config)
    layers, patterns = _layer_filter(config, targets)
    modules_to_save = config.get("modules_to_save") or []
    try:
        matched = [
            name
            for name in hf_module_names(model)
            if not _excluded(name, excludes, modules_to_save) and _targeted(name, targets, layers, patterns)
        ]
    except re.error as e:
        raise AdapterFormatError(
            f"invalid regular expression {e.pattern!r} in target_modules / exclude_modules / "
            f"layers_pattern: {e}"
        ) from e
    if not matched:
        raise AdapterFormatError(
            f"target_modules={config.get('target_modules')!r} matches no module of the base model "
            f"({model.architecture}, {model.num_layers} layers; e.g. {model.linear_module_names()[0]})"
        )
    supported = set(model.linear_module_names()) | {EMBEDDING_NAME}
    unsupported = [name for name in matched if name not in supported]
    if unsupported:
        raise AdapterFormatError(
            f"target_modules={config.get('target_modules')!r} matches {', '.join(unsupported[:5])}: "
            "Quiver adapts only the decoder projections (q/k/v/o_proj, gate/up/down_proj) and "
            "embed_tokens"
        )
    return matched


def module_rank(config: dict, module_name: str) -> int:
    """The LoRA rank PEFT builds for this module: `rank_pattern`'s first match, else `r`."""
    rank = _pattern_value(_dict_field(config, "rank_pattern"), module_name, config.get("r", 8))
    return _int_field(rank, "r")


def module_scale(config: dict, module_name: str, rank: int) -> float:
    """PEFT's scaling of one module's delta `B @ A` (rank: the module's actual rank).

    LoRA: `alpha / rank` (`alpha / sqrt(rank)` with use_rslora), alpha from `alpha_pattern`'s first
    match, else `lora_alpha`. AdaLoRA: `lora_alpha / (init_r + 1e-5)`: the divisor stays init_r
    after pruning, and alpha <= 0 means alpha = rank (AdaLoraLayer.update_layer).
    """
    if config.get("peft_type") == "ADALORA":
        alpha = _number_field(config.get("lora_alpha", 8), "lora_alpha")
        init_r = _int_field(config.get("init_r", 12), "init_r")
        return (alpha if alpha > 0 else float(rank)) / (init_r + ADALORA_EPS)
    if rank <= 0:
        raise AdapterFormatError(f"{module_name}: LoRA rank must be positive, got {rank}")
    alpha = _pattern_value(_dict_field(config, "alpha_pattern"), module_name, config.get("lora_alpha", 8))
    alpha = _number_field(alpha, "lora_alpha")
    return alpha / math.sqrt(rank) if config.get("use_rslora", False) else alpha / rank


def _pattern_value(patterns: dict, name: str, default: Any) -> Any:
    """peft.utils.other.get_pattern_key + dict.get: first key (dict order) matching the name."""
    for key in patterns:
        try:
            if re.match(rf"(.*\.)?({key})$", name):
                return patterns[key]
        except re.error as e:
            raise AdapterFormatError(
                f"invalid regular expression {key!r} in rank_pattern / alpha_pattern: {e}"
            ) from e
    return patterns.get(name, default)


def _targets(config: dict, model: ModelConfig) -> str | list[str]:
    targets = config.get("target_modules")
    if targets is None:
        return DEFAULT_TARGET_MODULES[model.architecture]
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        # PEFT expands this to the names of all nn.Linear modules except the output embedding.
        return model.linear_module_names()
    if isinstance(targets, str):
        return targets
    return _str_list(targets, "target_modules")


def _excludes(config: dict) -> str | list[str]:
    excludes = config.get("exclude_modules")
    if excludes is None or isinstance(excludes, str):
        return excludes or []
    return _str_list(excludes, "exclude_modules")


def _layer_filter(config: dict, targets: str | list[str]) -> tuple[int | list[int] | None, list[str]]:
    """(`layers_to_transform`, `layers_pattern` as a list), validated as PEFT's config does."""
    layers, patterns = config.get("layers_to_transform"), config.get("layers_pattern")
    if isinstance(targets, str) and (layers is not None or patterns is not None):
        raise AdapterFormatError(
            "layers_to_transform / layers_pattern cannot be combined with a regex string "
            "target_modules (PEFT rejects this config too)"
        )
    if patterns and layers is None:
        raise AdapterFormatError(
            "layers_pattern is set but layers_to_transform is not (PEFT rejects this too)"
        )
    if layers is not None and not isinstance(layers, int):
        if not isinstance(layers, list) or not all(isinstance(i, int) for i in layers):
            raise AdapterFormatError(f"layers_to_transform must be an int or a list of ints, not {layers!r}")
    if isinstance(patterns, str):
        patterns = [patterns]
    return layers, _str_list(patterns or [], "layers_pattern")


def _excluded(name: str, excludes: str | list[str], modules_to_save: list[str]) -> bool:
    if isinstance(excludes, str):
        if re.fullmatch(excludes, name):
            return True
    elif name in excludes or any(name.endswith(f".{e}") for e in excludes):
        return True
    # PEFT never puts an adapter layer inside a modules_to_save module.
    return any(re.match(rf"(^|.*\.){m}($|\..*)", name) for m in modules_to_save)


def _targeted(name: str, targets: str | list[str], layers: Any, patterns: list[str]) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    if name in targets:  # an exact name skips the layer filter, as in PEFT
        return True
    if not any(name.endswith(f".{t}") for t in targets):
        return False
    if layers is None or layers == []:
        return True
    index = _layer_index(name, patterns)
    if index is None:
        return False
    return index == layers if isinstance(layers, int) else index in layers


def _layer_index(name: str, patterns: list[str]) -> int | None:
    """The first `.<pattern>.<idx>.` index in the name (lazy: the outermost numbered segment)."""
    match = None
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    for pattern in patterns:
        match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
        if match is not None:
            break
    return int(match.group("idx")) if match else None


def _str_list(value: Any, field: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise AdapterFormatError(f"{field} must be null, a string or a list of strings, not {value!r}")
    return value


def _dict_field(config: dict, field: str) -> dict:
    value = config.get(field) or {}
    if not isinstance(value, dict):
        raise AdapterFormatError(
            f"{field} must be a JSON object mapping module patterns to values, not {value!r}"
        )
    return value


def _int_field(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise AdapterFormatError(f"{field} must be an integer, not {value!r}")
    return value


def _number_field(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise AdapterFormatError(f"{field} must be a finite number, not {value!r}")
    return float(value)
