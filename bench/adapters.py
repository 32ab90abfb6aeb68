"""Random adapters of every PEFT type, written in PEFT's on-disk format, for benchmarks.

Benchmarks need many adapters fast and without training: weights are random (B != 0, so the
adapter really changes the output) and scaled so the model stays numerically sane. The files are
exactly PEFT's format (runtime.adapters.write_adapter), so PEFT loads the same adapters.
"""
from __future__ import annotations

from pathlib import Path

import torch

from runtime.adapters.peft_format import write_adapter
from runtime.config import ModelConfig

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TYPES = ("lora", "dora", "adalora", "prompt", "ptuning", "prefix")


def _lora_tensors(cfg: ModelConfig, g: torch.Generator, rank: int, dora: bool,
                  targets=PROJECTIONS) -> dict:
    tensors = {}
    for name in cfg.linear_module_names():
        if name.rsplit(".", 1)[-1] not in targets:
            continue
        fan_in, fan_out = cfg.linear_shapes()[name.rsplit(".", 1)[-1]]
        key = f"base_model.model.{name}"
        tensors[f"{key}.lora_A.weight"] = torch.randn(rank, fan_in, generator=g) / fan_in ** 0.5
        tensors[f"{key}.lora_B.weight"] = torch.randn(fan_out, rank, generator=g) * 0.02
        if dora:  # magnitudes near typical row norms of these projections
            tensors[f"{key}.lora_magnitude_vector"] = 1 + 0.05 * torch.randn(fan_out, generator=g)
    return tensors


def write_lora(cfg: ModelConfig, path: Path, seed: int, rank: int = 16, dora: bool = False,
               targets=PROJECTIONS) -> None:
    """targets: the projections adapted (all seven by default; PEFT's own default for Llama
    models is q_proj and v_proj)."""
    g = torch.Generator().manual_seed(seed)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
              "target_modules": list(targets), "lora_dropout": 0.0, "bias": "none", "use_dora": dora,
              "base_model_name_or_path": cfg.name}
    write_adapter(path, config, _lora_tensors(cfg, g, rank, dora, targets))


def write_adalora(cfg: ModelConfig, path: Path, seed: int, init_r: int = 12, keep: int = 8) -> None:
    """AdaLoRA after pruning: each module keeps `keep` of `init_r` ranks (rank_pattern masks)."""
    g = torch.Generator().manual_seed(seed)
    tensors, pattern = {}, {}
    for name in cfg.linear_module_names():
        fan_in, fan_out = cfg.linear_shapes()[name.rsplit(".", 1)[-1]]
        key = f"base_model.model.{name}"
        tensors[f"{key}.lora_A"] = torch.randn(keep, fan_in, generator=g) / fan_in ** 0.5
        tensors[f"{key}.lora_B"] = torch.randn(fan_out, keep, generator=g) * 0.02
        tensors[f"{key}.lora_E"] = torch.randn(keep, 1, generator=g)
        pattern[f"{name}.lora_E"] = [i < keep for i in range(init_r)]
    config = {"peft_type": "ADALORA", "task_type": "CAUSAL_LM", "init_r": init_r, "target_r": keep,
              "lora_alpha": 16, "target_modules": PROJECTIONS, "rank_pattern": pattern,
              "total_step": 1000, "lora_dropout": 0.0, "bias": "none"}
    write_adapter(path, config, tensors)


def write_prompt(cfg: ModelConfig, path: Path, seed: int, n: int = 16, ptuning: bool = False) -> None:
    g = torch.Generator().manual_seed(seed)
    config = {"peft_type": "P_TUNING" if ptuning else "PROMPT_TUNING", "task_type": "CAUSAL_LM",
              "num_virtual_tokens": n, "token_dim": cfg.hidden_size, "num_transformer_submodules": 1,
              "num_layers": cfg.num_layers}
    if ptuning:
        config.update(encoder_reparameterization_type="MLP", encoder_hidden_size=cfg.hidden_size)
    write_adapter(path, config, {"prompt_embeddings": torch.randn(n, cfg.hidden_size, generator=g) * 0.05})


def write_prefix(cfg: ModelConfig, path: Path, seed: int, n: int = 16) -> None:
    g = torch.Generator().manual_seed(seed)
    config = {"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": n,
              "token_dim": cfg.kv_dim, "num_attention_heads": cfg.num_kv_heads,
              "num_layers": cfg.num_layers, "num_transformer_submodules": 1, "prefix_projection": False}
    flat = torch.randn(n, cfg.num_layers * 2 * cfg.kv_dim, generator=g) * 0.5
    write_adapter(path, config, {"prompt_embeddings": flat})


def write_random_adapter(cfg: ModelConfig, kind: str, path: Path, seed: int, rank: int = 16) -> None:
    """One adapter of `kind` (one of TYPES) at `path`."""
    if kind in ("lora", "dora"):
        write_lora(cfg, path, seed, rank, dora=kind == "dora")
    elif kind == "adalora":
        write_adalora(cfg, path, seed)
    elif kind in ("prompt", "ptuning"):
        write_prompt(cfg, path, seed, ptuning=kind == "ptuning")
    elif kind == "prefix":
        write_prefix(cfg, path, seed)
    else:
        raise ValueError(f"unknown adapter kind {kind!r}; one of {', '.join(TYPES)}")
