"""Reading and writing adapters in Hugging Face PEFT's on-disk format (checked against peft 0.21.2).

A PEFT adapter is a directory:

    adapter_config.json          {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 8, ...}
    adapter_model.safetensors    tensors (metadata {"format": "pt"}); or adapter_model.bin, a
                                 pickle, read here only with torch.load(weights_only=True)

Tensor keys are `base_model.model.` + the HF module path, without PEFT's in-memory adapter name
(`...q_proj.lora_A.weight` on disk, `...q_proj.lora_A.default.weight` in memory):

    LORA      <module>.lora_A.weight [r, in]     <module>.lora_B.weight [out, r]
              <module>.lora_B.bias [out]         (lora_bias)
              <module>.lora_magnitude_vector [out]   (use_dora)
              model.embed_tokens.lora_embedding_A [r, vocab], .lora_embedding_B [hidden, r]
    ADALORA   <module>.lora_A [k, in]   <module>.lora_B [out, k]   <module>.lora_E [k, 1]
              (k = pruned rank: the True count of rank_pattern["<module>.lora_E"], may be 0)
    PROMPT_TUNING, P_TUNING   prompt_embeddings [N, hidden]   (p-tuning: the encoder's output)
    PREFIX_TUNING             prompt_embeddings [N, num_layers * 2 * kv_dim]

Everything is adapted at load time into the runtime form of runtime/adapters/types.py:

    matching.py      which modules a LoRA / AdaLoRA config adapts, and each module's scale
    peft_lora.py     LoRA, DoRA, rsLoRA, lora_bias, embedding LoRA; AdaLoRA folded to LoRA
                     (A' = A * E, scale alpha / (init_r + 1e-5)); fields Quiver rejects
    peft_prompt.py   prompt / p-tuning embeddings; prefix KV -> [num_layers, 2, H_kv, N, head_dim]
    peft_checks.py   key, shape and value checks shared by those

Quiver is stricter than PEFT, which loads non-strictly (missing keys only warn, unknown config
keys are dropped): every problem raises AdapterFormatError saying what to fix, and nothing is
changed on failure. Config keys Quiver does not know are ignored, as PEFT does.
"""
from __future__ import annotations

import json
import os
import pickle
import uuid
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from runtime.adapters.matching import lora_target_names, module_scale
from runtime.adapters.peft_lora import read_lora
from runtime.adapters.peft_prompt import read_prompt_learning
from runtime.adapters.types import Adapter, AdapterFormatError
from runtime.config import ModelConfig

__all__ = ["read_adapter", "write_adapter", "lora_target_names", "module_scale", "SUPPORTED_PEFT_TYPES"]

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
SUPPORTED_PEFT_TYPES = ("LORA", "ADALORA", "PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING")
ACCEPTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

#: How each supported peft_type is parsed, validated and folded.
_READERS: dict[str, Callable[..., Adapter]] = {
    "LORA": read_lora,
    "ADALORA": read_lora,
    "PROMPT_TUNING": read_prompt_learning,
    "P_TUNING": read_prompt_learning,
    "PREFIX_TUNING": read_prompt_learning,
}


def read_adapter(
    path: str | os.PathLike,
    model: ModelConfig,
    *,
    max_rank: int = 64,
    max_virtual_tokens: int | None = None,
) -> Adapter:
    """Read, validate and fold a PEFT adapter directory for this base model.

    max_rank: the largest LoRA rank accepted (the device slot rank).
    max_virtual_tokens: the most prompt / prefix tokens accepted; None means the model's context
    minus one request token.

    `adapter_model.safetensors` is preferred; `adapter_model.bin` (a pickle) is read only with
    `torch.load(weights_only=True)`, which refuses anything but tensors and plain containers, so
    no code from the file runs. Returns a new Adapter (float32 host tensors) or raises
    AdapterFormatError; there are no side effects either way.
    """
    root = Path(path)
    config = read_config(root)
    reader = _READERS[_peft_type(config)]
    tensors = read_tensors(root)
    if max_virtual_tokens is None:
        max_virtual_tokens = model.max_position_embeddings - 1
    adapter = reader(config, tensors, model, max_rank=max_rank, max_virtual_tokens=max_virtual_tokens)
    adapter.source = str(root)
    return adapter


def write_adapter(adapter_dir: str | os.PathLike, config: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Write `adapter_config.json` + `adapter_model.safetensors` as PEFT's `save_pretrained` does.

    Keys must already be PEFT's on-disk keys (see the module docstring). The config is written
    as given (sets become sorted lists, keys sorted, indent 2); PEFT fills defaults for missing
    fields on load. Each file is replaced atomically.
    """
    if not isinstance(config.get("peft_type"), str):
        raise AdapterFormatError("write_adapter: config needs a peft_type string (e.g. 'LORA')")
    bad = [k for k, t in tensors.items() if not isinstance(k, str) or not isinstance(t, torch.Tensor)]
    if bad or not tensors:
        raise AdapterFormatError(
            f"write_adapter: tensors must be a non-empty str -> Tensor dict (bad: {bad[:5]})"
        )
    try:
        text = json.dumps(config, indent=2, sort_keys=True, default=_json_default)
    except TypeError as e:
        raise AdapterFormatError(f"write_adapter: config is not JSON-serialisable: {e}") from e
    root = Path(adapter_dir)
    root.mkdir(parents=True, exist_ok=True)
    # clone: safetensors refuses tensors that share storage (tied or sliced views)
    host = {k: t.detach().to("cpu").contiguous().clone() for k, t in tensors.items()}
    _atomic_write(root / SAFETENSORS_NAME, lambda p: save_file(host, str(p), metadata={"format": "pt"}))
    _atomic_write(root / CONFIG_NAME, lambda p: p.write_text(text + "\n", encoding="utf-8"))


# --------------------------------------------------------------------------------------- files


def read_config(root: Path) -> dict:
    """The parsed `adapter_config.json` of an adapter directory."""
    if not root.exists():
        raise AdapterFormatError(f"adapter directory {root} does not exist")
    if not root.is_dir():
        raise AdapterFormatError(f"adapter path {root} is not a directory (expected a PEFT adapter dir)")
    path = root / CONFIG_NAME
    if not path.is_file():
        raise AdapterFormatError(f"{root} has no {CONFIG_NAME}: not a PEFT adapter directory")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterFormatError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{path} must hold a JSON object, not {type(config).__name__}")
    return config


def read_tensors(root: Path) -> dict[str, torch.Tensor]:
    """All tensors of the adapter, as float32, after dtype and finiteness checks."""
    raw = _load_weights(root)
    tensors = {}
    for key, t in raw.items():
        if t.dtype not in ACCEPTED_DTYPES:
            raise AdapterFormatError(
                f"tensor {key} has dtype {t.dtype}; adapters must be float32, float16 or bfloat16"
            )
        # copy=True: safetensors hands out tensors backed by a private mmap of the file. Kept
        # as they are, a file later rewritten in place (`cp new.safetensors ...`) would change
        # the registered weights under the server, and a truncated one kill it with SIGBUS the
        # next time the host copy is read (re-filling an evicted device slot).
        tensors[key] = t.to(torch.float32, copy=True)
    # One float64 sum per tensor is finite iff every element is (a float32 sum cannot overflow
    # float64): half the ops of isfinite(t).all(), and hot-load latency is a served figure.
    sums = [t.sum(dtype=torch.float64) for t in tensors.values()]
    if sums and not bool(torch.isfinite(torch.stack(sums)).all()):
        bad = next(k for k, t in tensors.items() if not torch.isfinite(t).all())
        raise AdapterFormatError(
            f"tensor {bad} holds non-finite values (NaN or Inf): the adapter is corrupt"
        )
    return tensors


def _load_weights(root: Path) -> dict[str, torch.Tensor]:
    safetensors_path, bin_path = root / SAFETENSORS_NAME, root / BIN_NAME
    if safetensors_path.is_file():
        try:
            return load_file(str(safetensors_path), device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise AdapterFormatError(f"could not read {safetensors_path}: {e}") from e
    if not bin_path.is_file():
        raise AdapterFormatError(
            f"{root} has no {SAFETENSORS_NAME} (or {BIN_NAME}): the adapter weights are missing"
        )
    try:
        raw = torch.load(bin_path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError) as e:
        lines = str(e).strip().splitlines() or [type(e).__name__]
        reason = next((line.strip() for line in lines if "WeightsUnpickler error" in line), lines[0])
        raise AdapterFormatError(
            f"could not read {bin_path} with torch.load(weights_only=True) (only tensors are "
            f"accepted from a pickle; convert it to safetensors): {reason}"
        ) from e
    if not isinstance(raw, dict) or not all(
        isinstance(k, str) and isinstance(t, torch.Tensor) for k, t in raw.items()
    ):
        raise AdapterFormatError(f"{bin_path} must hold a dict of name -> tensor")
    return raw


def _atomic_write(path: Path, write: Callable[[Path], Any]) -> None:
    """write(tmp) next to `path`, then rename over it: readers never see a half-written file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _json_default(value: Any) -> Any:
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"{type(value).__name__} {value!r} is not JSON-serialisable")


def _peft_type(config: dict) -> str:
    peft_type = config.get("peft_type")
    if peft_type is None:
        raise AdapterFormatError(
            f"{CONFIG_NAME} has no peft_type (expected one of {', '.join(SUPPORTED_PEFT_TYPES)})"
        )
    if peft_type not in SUPPORTED_PEFT_TYPES:
        raise AdapterFormatError(
            f"unsupported peft_type {peft_type!r}: Quiver loads {', '.join(SUPPORTED_PEFT_TYPES)}"
        )
    return peft_type
