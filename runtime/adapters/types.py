"""Adapters in Quiver's runtime form: what a PEFT directory becomes after parsing and folding.

Every PEFT type reduces to one of three forward mechanisms (design.md, "the layer contract"):

    LoRA-like (LORA, DoRA, ADALORA)  -> per-projection low-rank delta  y += s * B @ (A @ x)
    virtual tokens (PROMPT_TUNING,   -> N embeddings prepended to the request at prefill
                    P_TUNING)
    prefix (PREFIX_TUNING)           -> N key/value rows per layer prepended to attention

Formats are adapted here, at load time, never in forward: AdaLoRA's A*E fold, p-tuning's
encoder output, prefix tuning's flat KV reshaped to [L, 2, H_kv, N, hd].
Tensors here live on the host (CPU), in float32; the nn layers copy them into device slots.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import torch


class AdapterKind(str, Enum):
    """The runtime mechanism an adapter uses (not its PEFT type)."""

    LORA = "lora"
    PROMPT = "prompt"
    PREFIX = "prefix"


class AdapterFormatError(ValueError):
    """A PEFT directory that Quiver will not load; the message says what to fix."""


@dataclass
class LoraModule:
    """One targeted projection's low-rank delta: `y += scale * (B @ (A @ x) + bias)`."""

    A: torch.Tensor  # [r, in]   (AdaLoRA: A * E, pruned rows dropped)
    B: torch.Tensor  # [out, r]
    scale: float  # alpha / r, alpha / sqrt(r) (rslora), or alpha / (init_r + 1e-5) (AdaLoRA)
    bias: torch.Tensor | None = None  # [out]  lora_B bias (lora_bias=True), scaled with the delta
    magnitude: torch.Tensor | None = None  # [out]  DoRA magnitude vector

    @property
    def rank(self) -> int:
        return self.A.shape[0]


@dataclass
class LoraEmbedding:
    """LoRA on the token embedding: `E[ids] + scale * (A.T[ids] @ B.T)`."""

    A: torch.Tensor  # [r, vocab]
    B: torch.Tensor  # [hidden, r]
    scale: float


@dataclass
class Adapter:
    """A parsed, validated adapter, ready to be copied into device slots."""

    peft_type: str  # LORA | ADALORA | PROMPT_TUNING | P_TUNING | PREFIX_TUNING
    kind: AdapterKind
    config: dict  # the adapter_config.json as read (for ListAdapters and re-export)
    #: LoRA-like: full HF module name (`model.layers.3.mlp.down_proj`) -> delta
    lora: dict[str, LoraModule] = field(default_factory=dict)
    embedding: LoraEmbedding | None = None
    use_dora: bool = False
    #: PROMPT: the virtual-token embeddings prepended at prefill.
    prompt: torch.Tensor | None = None  # [N, hidden]
    #: PREFIX: per-layer key/value rows, keys WITHOUT rotary.
    prefix: torch.Tensor | None = None  # [num_layers, 2, H_kv, N, head_dim]
    source: str = ""  # directory it was read from

    @property
    def rank(self) -> int:
        """Largest LoRA rank over all modules (0 for prompt / prefix adapters)."""
        ranks = [m.rank for m in self.lora.values()]
        if self.embedding is not None:
            ranks.append(self.embedding.A.shape[0])
        return max(ranks, default=0)

    @property
    def num_virtual_tokens(self) -> int:
        if self.prompt is not None:
            return self.prompt.shape[0]
        if self.prefix is not None:
            return self.prefix.shape[3]
        return 0

    @property
    def target_modules(self) -> list[str]:
        """Sorted leaf names targeted (`q_proj`, ..., `embed_tokens`)."""
        leaves = {name.rsplit(".", 1)[-1] for name in self.lora}
        if self.embedding is not None:
            leaves.add("embed_tokens")
        return sorted(leaves)

    @property
    def nbytes(self) -> int:
        tensors: list[torch.Tensor | None] = [self.prompt, self.prefix]
        for m in self.lora.values():
            tensors += [m.A, m.B, m.bias, m.magnitude]
        if self.embedding is not None:
            tensors += [self.embedding.A, self.embedding.B]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)
