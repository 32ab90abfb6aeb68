"""Reading a Hugging Face base-model directory: config.json, weights, tokenizer.

The decoder in runtime/nn uses HF's own parameter names, so a checkpoint loads as a plain
name -> tensor dict with no renaming. What this module adds is strictness at the edge: every
tensor the config implies must be present with the shape the config implies, and anything
else is an error naming the keys, because a silently half-loaded base serves fluent garbage.

Weight files, first match wins (safetensors is preferred when a directory holds both):

    model.safetensors                 one file
    model.safetensors.index.json      shards listed in its weight_map
    pytorch_model.bin                 torch.load(weights_only=True): tensors only, never code
    pytorch_model.bin.index.json      sharded .bin, same restriction

Hub ids are not downloaded: no machine Quiver targets reaches a hub, so `--model` takes a
local directory (or nothing, for the embedded default, runtime/models/embedded.py).
"""
from __future__ import annotations

import json
import pickle
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file

from runtime.config import ModelConfig, UnsupportedModelError
from runtime.models.embedded import embedded_model_dir


class ModelFilesError(ValueError):
    """A base-model directory is missing, incomplete or unreadable; the message says what."""


def resolve_model_dir(model: str | None) -> Path:
    """The directory to load: the embedded default for None, else `model` as a local HF dir."""
    if model is None:
        return embedded_model_dir()
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelFilesError(
            f"model directory {model!r} does not exist. Quiver does not download Hugging Face "
            f"Hub ids: download the model first (e.g. `huggingface-cli download {model} "
            "--local-dir DIR`) and pass DIR, or omit --model for the embedded default"
        )
    if not path.is_dir():
        raise ModelFilesError(f"{model!r} is not a directory: pass a Hugging Face model directory")
    if not (path / "config.json").is_file():
        raise ModelFilesError(
            f"{path} has no config.json: it is not a Hugging Face model directory"
        )
    return path.resolve()


def load_model_config(model_dir: str | Path) -> ModelConfig:
    """ModelConfig from `config.json`.

    UnsupportedModelError names what is wrong: a non-Llama-family architecture (gpt2, mixtral,
    ...) or a pre-quantized checkpoint, whose tensors are not the HF decoder's.
    """
    path = Path(model_dir) / "config.json"
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelFilesError(f"{path} does not exist") from None
    except json.JSONDecodeError as e:
        raise ModelFilesError(f"{path} is not valid JSON: {e}") from None
    quant = d.get("quantization_config")
    if quant:
        method = quant.get("quant_method", "unknown") if isinstance(quant, dict) else quant
        raise UnsupportedModelError(
            f"{model_dir} is a pre-quantized checkpoint (quantization_config: {method}); Quiver "
            "quantizes a full-precision (fp32/fp16/bf16) base itself"
        )
    return ModelConfig.from_hf_dict(d, name=str(model_dir)).with_stop_ids(_generation_eos(Path(model_dir)))


def _generation_eos(model_dir: Path):
    """`eos_token_id` of generation_config.json: transformers' `generate` stops on these ids
    (often a list that adds the chat template's end-of-turn token to config.json's one)."""
    path = model_dir / "generation_config.json"
    try:
        return json.loads(path.read_text()).get("eos_token_id") if path.is_file() else None
    except (json.JSONDecodeError, AttributeError):
        return None


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the HF decoder for `config` has, name -> shape (nn.Linear: [out, in])."""
    h = config.hidden_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config.vocab_size, h)}
    biased = {"q_proj", "k_proj", "v_proj"} if config.attention_bias else set()
    if config.o_proj_bias:
        biased.add("o_proj")
    if config.mlp_bias:
        biased |= {"gate_proj", "up_proj", "down_proj"}
    linear_shapes = config.linear_shapes()
    for module in config.linear_module_names():
        leaf = module.rsplit(".", 1)[1]
        in_features, out_features = linear_shapes[leaf]
        shapes[f"{module}.weight"] = (out_features, in_features)
        if leaf in biased:
            shapes[f"{module}.bias"] = (out_features,)
    for layer in range(config.num_layers):
        shapes[f"model.layers.{layer}.input_layernorm.weight"] = (h,)
        shapes[f"model.layers.{layer}.post_attention_layernorm.weight"] = (h,)
    shapes["model.norm.weight"] = (h,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, h)
    return shapes


def load_state_dict(
    model_dir: str | Path, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """All base-model tensors of `model_dir` under HF names, floating ones cast to `dtype`.

    Checked against the config: a missing, unexpected or mis-shaped tensor raises
    ModelFilesError naming it. Rotary `inv_freq` buffers (recomputed by the runtime) and a
    tied checkpoint's stored copy of lm_head (HF ties it to the embedding) are dropped.
    """
    model_dir = Path(model_dir)
    config = load_model_config(model_dir)
    tensors: dict[str, torch.Tensor] = {}
    for file in weight_files(model_dir):
        # Cast file by file, so a bf16 -> fp32 load peaks at one shard's worth of extra memory.
        tensors.update(_cast(_read_weight_file(file), dtype))
    tensors = _drop_derived(tensors, config)
    check_tensors(tensors, expected_shapes(config), where=str(model_dir))
    return tensors


def check_tensors(tensors: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]],
                  where: str) -> None:
    """Raise ModelFilesError listing missing, unexpected and mis-shaped tensors, if any."""
    missing = sorted(expected.keys() - tensors.keys())
    unexpected = sorted(tensors.keys() - expected.keys())
    misshaped = sorted(f"{k}: {tuple(tensors[k].shape)}, config implies {expected[k]}"
                       for k in expected.keys() & tensors.keys()
                       if tuple(tensors[k].shape) != expected[k])
    found = {"missing tensors": missing, "unexpected tensors": unexpected,
             "wrong shapes": misshaped}
    problems = [f"{label} ({len(keys)}): {_preview(keys)}" for label, keys in found.items() if keys]
    if problems:
        raise ModelFilesError(f"the weights in {where} do not match its config.json; "
                              + "; ".join(problems))


def weight_files(model_dir: Path) -> list[Path]:
    """The weight files of `model_dir` in the first format present (see the module docstring)."""
    for name, files_of in _WEIGHT_LAYOUTS:
        path = model_dir / name
        if path.is_file():
            return files_of(path)
    raise ModelFilesError(
        f"{model_dir} has no weights: expected one of {', '.join(n for n, _ in _WEIGHT_LAYOUTS)}"
    )


def load_tokenizer(model_dir: str | Path):
    """The directory's tokenizer via transformers' AutoTokenizer, local files only."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ModelFilesError(f"cannot load a tokenizer from {model_dir}: {e}") from e


def _shards_of(index: Path) -> list[Path]:
    """Shard files named by an HF `*.index.json` weight_map, each checked to exist."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ModelFilesError(f"{index} is not an HF shard index (no weight_map): {e}") from None
    shards = [index.parent / name for name in sorted(set(weight_map.values()))]
    absent = [s.name for s in shards if not s.is_file()]
    if absent:
        raise ModelFilesError(f"{index} lists shards that are missing: {_preview(absent)}")
    return shards


#: (file name, its weight files) in order of preference.
_WEIGHT_LAYOUTS: tuple[tuple[str, Callable[[Path], list[Path]]], ...] = (
    ("model.safetensors", lambda p: [p]),
    ("model.safetensors.index.json", _shards_of),
    ("pytorch_model.bin", lambda p: [p]),
    ("pytorch_model.bin.index.json", _shards_of),
)


def _read_weight_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(str(path), device="cpu")
    return _read_pickled_tensors(path)


def _read_pickled_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A pytorch_model.bin, unpickled with weights_only=True.

    A .bin is a pickle, and full unpickling runs whatever code the file names; weights_only
    admits tensors and plain containers only, so a file with anything else is refused here
    rather than executed.
    """
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ModelFilesError(
            f"refused to load {path}: it holds objects other than tensors, and Quiver only reads "
            "pytorch_model.bin with torch.load(weights_only=True), never full unpickling. "
            f"Convert it to safetensors with a trusted tool if you trust its source. ({e})"
        ) from None
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelFilesError(f"{path} is not a flat name -> tensor state dict")
    return obj


def _cast(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}


def _drop_derived(tensors: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Remove tensors the runtime derives itself: rotary inv_freq, a tied lm_head's copy."""
    return {
        k: v for k, v in tensors.items()
        if not k.endswith("rotary_emb.inv_freq")
        and not (config.tie_word_embeddings and k == "lm_head.weight")
    }


def _preview(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")
