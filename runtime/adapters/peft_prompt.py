"""PEFT prompt learning (PROMPT_TUNING, P_TUNING, PREFIX_TUNING) -> Quiver's prompt / prefix tensors.

All three save one tensor, `prompt_embeddings`:

    PROMPT_TUNING, P_TUNING   [N, hidden]        embeddings prepended to the request at prefill
                                                 (p-tuning: its encoder's output; the encoder
                                                 itself is not saved)
    PREFIX_TUNING             [N, L * 2 * kv_dim]   per-layer keys and values prepended to
                                                 attention (with prefix_projection: the MLP's
                                                 output; the MLP is not saved)

PEFT applies them only for task_type CAUSAL_LM; with any other task type it silently does
nothing, so Quiver refuses such adapters instead of serving the base model under their name.
"""
from __future__ import annotations

from typing import Any

import torch

from runtime.adapters.peft_checks import check_keys, expect_base_value, positive_int, reject_fields, shaped
from runtime.adapters.types import Adapter, AdapterFormatError, AdapterKind
from runtime.config import ModelConfig

PROMPT_KEY = "prompt_embeddings"
#: Prompt-learning fields that change the forward; PEFT's CAUSAL_LM defaults are off.
UNSUPPORTED_PROMPT_FIELDS: dict[str, Any] = {"modules_to_save": None}


def read_prompt_learning(
    config: dict, tensors: dict, model: ModelConfig, *, max_virtual_tokens: int, **_: Any
) -> Adapter:
    """PROMPT_TUNING and P_TUNING (embeddings prepended) and PREFIX_TUNING (KV prepended)."""
    peft_type = config["peft_type"]
    if config.get("task_type") != "CAUSAL_LM":
        raise AdapterFormatError(
            f"{peft_type} adapter has task_type={config.get('task_type')!r}; Quiver serves causal LMs "
            "and needs task_type='CAUSAL_LM' (PEFT silently ignores a prompt-learning adapter of "
            "another task type)"
        )
    reject_fields(config, UNSUPPORTED_PROMPT_FIELDS)
    if config.get("num_transformer_submodules") not in (None, 1):
        raise AdapterFormatError(
            f"num_transformer_submodules={config['num_transformer_submodules']!r}: encoder-decoder "
            "prompt learning is not supported (decoder-only models use 1)"
        )
    n = positive_int(config, "num_virtual_tokens")
    if n > max_virtual_tokens:
        raise AdapterFormatError(
            f"adapter has {n} virtual tokens, more than the {max_virtual_tokens} this server allows "
            "(max_virtual_tokens / the model's context)"
        )
    check_keys(tensors, {PROMPT_KEY})
    if peft_type == "PREFIX_TUNING":
        prefix = prefix_kv(config, tensors[PROMPT_KEY], model, n)
        return Adapter(peft_type=peft_type, kind=AdapterKind.PREFIX, config=config, prefix=prefix)
    prompt = _prompt_embeddings(config, tensors[PROMPT_KEY], model, n)
    return Adapter(peft_type=peft_type, kind=AdapterKind.PROMPT, config=config, prompt=prompt)


def _prompt_embeddings(config: dict, P: torch.Tensor, model: ModelConfig, n: int) -> torch.Tensor:
    expect_base_value(config, "token_dim", model.hidden_size, "the base model's hidden_size")
    return shaped({PROMPT_KEY: P}, PROMPT_KEY, (n, model.hidden_size), f"[num_virtual_tokens, hidden]: N={n}")


def prefix_kv(config: dict, P: torch.Tensor, model: ModelConfig, n: int) -> torch.Tensor:
    """PEFT's flat prefix `P` [N, L*2*kv_dim] -> [L, 2, H_kv, N, head_dim] (keys without rotary).

    PEFT (`PeftModel.get_prompt`): `P.view(N, 2L, H_kv, hd).permute(1, 2, 0, 3)` -> [2L, H_kv, N, hd],
    layer l: K = kv[2l], V = kv[2l + 1]. For GQA, PEFT stores token_dim = head_dim * num_kv_heads
    and num_attention_heads = num_kv_heads.
    """
    L, H, hd = model.num_layers, model.num_kv_heads, model.head_dim
    expect_base_value(config, "num_layers", L, "the base model's num_hidden_layers")
    expect_base_value(config, "num_attention_heads", H, "the base model's num_key_value_heads")
    expect_base_value(config, "token_dim", model.kv_dim, "head_dim * num_key_value_heads of the base model")
    P = shaped({PROMPT_KEY: P}, PROMPT_KEY, (n, L * 2 * model.kv_dim),
               f"[num_virtual_tokens, num_layers * 2 * kv_dim]: N={n}, num_layers={L}, kv_dim={model.kv_dim}")
    kv = P.view(n, 2 * L, H, hd).permute(1, 2, 0, 3)  # [2L, H_kv, N, hd]
    return kv.reshape(L, 2, H, n, hd).contiguous()  # [L, 2, H_kv, N, hd]
