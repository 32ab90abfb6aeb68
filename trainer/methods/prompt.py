"""Prompt tuning (Lester et al. 2021): N trainable embeddings prepended to every input.

    row:   [P_1 .. P_N | x_1 .. x_L]     positions 0 .. N+L-1, no loss on P (labels -100)
            trainable    frozen embeddings of the tokens

The whole model is frozen; only P [N, hidden] trains. Init is PEFT's: RANDOM draws P from
N(0, 1) (nn.Embedding's default); TEXT embeds the tokens of --prompt-init-text, repeated or cut
to N. The saved `prompt_embeddings` is P itself.

`VirtualTokenMethod` is shared with p-tuning (trainer/methods/ptuning.py), which only differs in
how P is produced. Rows carry their own copy of P in the packed batch (the PEFT forward); the
server computes the virtual tokens' KV once per adapter instead, which is the same math because
attention is causal (the virtual tokens never see the request).
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from runtime.nn.attention import AttentionBatch
from runtime.nn.model import DecoderModel
from trainer.batch import PackedBatch
from trainer.config import TrainConfig, TrainConfigError
from trainer.methods.base import AdapterMethod, ParamModule


class VirtualTokenMethod(AdapterMethod):
    """Prompt tuning and p-tuning: `embeddings()` [N, hidden] in front of every row."""

    def embeddings(self) -> torch.Tensor:
        raise NotImplementedError

    def hidden(self, model: DecoderModel, batch: PackedBatch) -> torch.Tensor:
        P = self.embeddings().to(model.dtype)  # [N, hidden]
        n = P.shape[0]
        x = model.embed(batch.tokens, None)  # [T, hidden]
        parts = []
        for row in x.split(batch.row_lens):
            parts += [P, row]
        x = torch.cat(parts)  # [T + rows * N, hidden]
        lens = [n + length for length in batch.row_lens]
        positions = torch.cat([torch.arange(length) for length in lens]).to(x.device)
        rows = batch.loss_rows + n * (batch.loss_row_of + 1)  # shifted past each row's virtual tokens
        return model(None, positions, AttentionBatch.without_cache(lens), None, logits_rows=rows,
                     inputs_embeds=x, return_hidden=True)

    @torch.no_grad()
    def peft_tensors(self) -> dict[str, torch.Tensor]:
        return {"prompt_embeddings": self.embeddings().detach().float().cpu().contiguous()}

    def _prompt_config_fields(self) -> dict[str, Any]:
        c = self.model_cfg
        return {"num_virtual_tokens": self.cfg.num_virtual_tokens, "token_dim": c.hidden_size,
                "num_transformer_submodules": 1, "num_attention_heads": c.num_heads,
                "num_layers": c.num_layers, "modules_to_save": None}


class PromptEmbedding(ParamModule):
    """P [N, hidden]."""

    def __init__(self, init: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(init.float().clone())  # [N, hidden]


class PromptTuningMethod(VirtualTokenMethod):
    peft_type = "PROMPT_TUNING"

    def __init__(self, cfg: TrainConfig, model: DecoderModel, tokenizer):
        super().__init__(cfg, model)
        n, hidden = cfg.num_virtual_tokens, model.cfg.hidden_size
        dev = model.model.norm.weight.device
        if cfg.prompt_init_text:
            init = text_init(model, tokenizer, cfg.prompt_init_text, n)
        else:
            init = torch.randn(n, hidden, device=dev)
        self.prompt = PromptEmbedding(init)

    def embeddings(self) -> torch.Tensor:
        return self.prompt.weight

    def peft_config(self) -> dict[str, Any]:
        text = self.cfg.prompt_init_text
        return {**self._common_config(), **self._prompt_config_fields(),
                "prompt_tuning_init": "TEXT" if text else "RANDOM", "prompt_tuning_init_text": text,
                "tokenizer_name_or_path": self.model_name if text else None, "tokenizer_kwargs": None}


@torch.no_grad()
def text_init(model: DecoderModel, tokenizer, text: str, n: int) -> torch.Tensor:
    """The embeddings of `text`'s tokens, tiled or cut to n rows (PEFT's TEXT init)."""
    ids = tokenizer(text)["input_ids"]
    if not ids:
        raise TrainConfigError("--prompt-init-text has no tokens")
    ids = (ids * math.ceil(n / len(ids)))[:n]
    tokens = torch.tensor(ids, device=model.model.norm.weight.device)
    return model.model.embed_tokens(tokens).float()  # [n, hidden]
