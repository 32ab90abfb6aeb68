"""P-tuning (Liu et al. 2021, "GPT Understands, Too"): virtual tokens produced by an encoder.

Like prompt tuning, N virtual-token embeddings are prepended to every row; but they are not
trained directly. A prompt encoder reparameterises them, which trains more stably:

    E [N, hidden] --MLP:  Linear(h, e) ReLU Linear(e, e) ReLU Linear(e, h) ------------> P [N, hidden]
                  --LSTM: biLSTM(h -> e, 2 layers) -> Linear(2e, 2e) ReLU Linear(2e, h) -> P

(e = --encoder-hidden-size), exactly PEFT's PromptEncoder, with PyTorch's default inits. Only
the encoder's OUTPUT P is saved (`prompt_embeddings`), so at serving time a p-tuning adapter is
just a prompt-tuning adapter; the encoder is discarded.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from runtime.nn.model import DecoderModel
from trainer.config import TrainConfig
from trainer.methods.base import ParamModule
from trainer.methods.prompt import VirtualTokenMethod

LSTM_LAYERS = 2  # PEFT's encoder_num_layers default (the MLP always has three Linear layers)


class PromptEncoder(ParamModule):
    """E [N, hidden] through an MLP or a bidirectional LSTM + MLP head -> P [N, hidden]."""

    def __init__(self, n: int, hidden: int, encoder_hidden: int, kind: str, device=None):
        super().__init__()
        self.kind = kind
        self.embedding = nn.Embedding(n, hidden, device=device)
        if kind == "lstm":
            self.lstm_head = nn.LSTM(hidden, encoder_hidden, num_layers=LSTM_LAYERS,
                                     bidirectional=True, batch_first=True, device=device)
            self.mlp_head = nn.Sequential(
                nn.Linear(2 * encoder_hidden, 2 * encoder_hidden, device=device), nn.ReLU(),
                nn.Linear(2 * encoder_hidden, hidden, device=device))
        else:
            self.mlp_head = nn.Sequential(
                nn.Linear(hidden, encoder_hidden, device=device), nn.ReLU(),
                nn.Linear(encoder_hidden, encoder_hidden, device=device), nn.ReLU(),
                nn.Linear(encoder_hidden, hidden, device=device))

    def forward(self) -> torch.Tensor:
        E = self.embedding.weight  # [N, hidden]
        if self.kind == "lstm":
            E = self.lstm_head(E[None])[0][0]  # [N, 2 * encoder_hidden]
        return self.mlp_head(E)  # [N, hidden]


class PTuningMethod(VirtualTokenMethod):
    peft_type = "P_TUNING"

    def __init__(self, cfg: TrainConfig, model: DecoderModel):
        super().__init__(cfg, model)
        hidden = model.cfg.hidden_size
        self.encoder_hidden = cfg.encoder_hidden_size or hidden
        self.encoder = PromptEncoder(cfg.num_virtual_tokens, hidden, self.encoder_hidden, cfg.encoder,
                                     model.model.norm.weight.device)

    def embeddings(self) -> torch.Tensor:
        return self.encoder()

    def peft_config(self) -> dict[str, Any]:
        return {**self._common_config(), **self._prompt_config_fields(),
                "encoder_reparameterization_type": self.cfg.encoder.upper(),
                "encoder_hidden_size": self.encoder_hidden, "encoder_num_layers": LSTM_LAYERS,
                "encoder_dropout": 0.0}
