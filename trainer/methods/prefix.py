"""Prefix tuning (Li & Liang 2021): N trainable key/value rows in front of every layer's attention.

    layer l attends over  [K_l prefix (N) | K of the row's own tokens]   (keys of the prefix
                          [V_l prefix (N) | V of the row's own tokens]    get no rotary)

and the row's tokens take positions N .. N+L-1, exactly as the server runs a prefix adapter
(runtime/nn/attention.py: per-row `prefixes` of shape [L, 2, H_kv, N, head_dim]).

The KV is one flat tensor [N, num_layers * 2 * kv_dim] (PEFT's `prompt_embeddings`, with
kv_dim = num_kv_heads * head_dim for grouped-query models), either trained directly
(PEFT's default init: N(0, 1)) or, with --prefix-projection, produced by PEFT's PrefixEncoder MLP
from an [N, kv_dim] embedding:

    E [N, kv_dim] -> Linear(kv_dim, e) -> tanh -> Linear(e, num_layers * 2 * kv_dim)

Only the final KV is saved, so a projected prefix serves like a plain one.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from runtime.config import ModelConfig
from runtime.nn.attention import AttentionBatch
from runtime.nn.model import DecoderModel
from trainer.batch import PackedBatch
from trainer.config import TrainConfig
from trainer.methods.base import AdapterMethod, ParamModule


class PrefixEncoder(ParamModule):
    """-> flat prefix KV [N, num_layers * 2 * kv_dim], PEFT's PrefixEncoder (training mode)."""

    def __init__(self, n: int, cfg: ModelConfig, encoder_hidden: int, projection: bool, device=None):
        super().__init__()
        flat = cfg.num_layers * 2 * cfg.kv_dim
        self.projection = projection
        if projection:
            self.embedding = nn.Embedding(n, cfg.kv_dim, device=device)
            self.transform = nn.Sequential(nn.Linear(cfg.kv_dim, encoder_hidden, device=device), nn.Tanh(),
                                           nn.Linear(encoder_hidden, flat, device=device))
        else:
            self.embedding = nn.Embedding(n, flat, device=device)

    def forward(self) -> torch.Tensor:
        E = self.embedding.weight
        return self.transform(E) if self.projection else E  # [N, num_layers * 2 * kv_dim]


def prefix_kv(flat: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """[N, L*2*kv_dim] -> [L, 2, H_kv, N, hd], as PEFT's get_prompt (and peft_format._prefix_kv)."""
    n = flat.shape[0]
    kv = flat.view(n, 2 * cfg.num_layers, cfg.num_kv_heads, cfg.head_dim).permute(1, 2, 0, 3)
    return kv.reshape(cfg.num_layers, 2, cfg.num_kv_heads, n, cfg.head_dim)  # [2L, H, N, hd] -> [L, 2, ...]


class PrefixTuningMethod(AdapterMethod):
    peft_type = "PREFIX_TUNING"

    def __init__(self, cfg: TrainConfig, model: DecoderModel):
        super().__init__(cfg, model)
        self.encoder_hidden = cfg.encoder_hidden_size or model.cfg.hidden_size
        self.encoder = PrefixEncoder(cfg.num_virtual_tokens, model.cfg, self.encoder_hidden,
                                     cfg.prefix_projection, model.model.norm.weight.device)

    def hidden(self, model: DecoderModel, batch: PackedBatch) -> torch.Tensor:
        kv = prefix_kv(self.encoder(), self.model_cfg).to(model.dtype)  # [L, 2, H_kv, N, hd]
        attn = AttentionBatch.without_cache(batch.row_lens, prefixes=[kv] * len(batch.row_lens))
        positions = batch.positions(offset=self.cfg.num_virtual_tokens)
        return model(batch.tokens, positions, attn, None, logits_rows=batch.loss_rows, return_hidden=True)

    @torch.no_grad()
    def peft_tensors(self) -> dict[str, torch.Tensor]:
        return {"prompt_embeddings": self.encoder().detach().float().cpu().contiguous()}

    def peft_config(self) -> dict[str, Any]:
        c = self.model_cfg
        # For grouped-query models PEFT stores the KV width and KV head count here.
        return {**self._common_config(), "num_virtual_tokens": self.cfg.num_virtual_tokens,
                "token_dim": c.kv_dim, "num_attention_heads": c.num_kv_heads, "num_layers": c.num_layers,
                "num_transformer_submodules": 1, "prefix_projection": self.cfg.prefix_projection,
                "encoder_hidden_size": self.encoder_hidden, "modules_to_save": None}
