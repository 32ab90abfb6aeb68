"""Copying a parsed adapter into (and out of) a device slot of the decoder.

A slot is an index into every projection's preallocated LoRA tensors (runtime/nn/lora.py), plus,
for prompt and prefix adapters, a per-slot KV prefix. Loading is a copy into that index; nothing
is allocated per adapter on the hot path (except the embedding-LoRA tables, made the first time
an adapter needs them).

What each kind leaves in its slot:
    LoRA / DoRA / AdaLoRA  A, B, scale (+ lora bias, DoRA factor f = m / ||W + s B A||_row)
    prompt / p-tuning      kv_prefix = the base model's KV of the virtual tokens (positions 0..N-1)
    prefix tuning          kv_prefix = the adapter's own per-layer KV (no rotary)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from runtime.adapters.types import Adapter, AdapterKind, LoraModule
from runtime.nn.model import DecoderModel


@dataclass
class SlotState:
    """What the engine needs to know about a filled slot, per step."""

    kind: AdapterKind
    dora: bool = False
    embedding: bool = False
    kv_prefix: torch.Tensor | None = None  # [L, 2, H_kv, N, hd] on the model's device

    @property
    def num_prefix_tokens(self) -> int:
        return 0 if self.kv_prefix is None else self.kv_prefix.shape[3]


def dora_factor(model: DecoderModel, name: str, m: LoraModule) -> torch.Tensor:
    """f = magnitude / ||W + scale * B @ A|| per output row, W the (dequantized) base weight."""
    lin = model.adapted_linears()[name]
    W = lin.base.dequantized_weight().float()  # [out, in]
    norm = torch.linalg.norm(W + m.scale * (m.B.float() @ m.A.float()).to(W.device), dim=1)
    return m.magnitude.to(norm.device).float() / norm  # [out]


@torch.no_grad()
def write_slot(model: DecoderModel, slot: int, adapter: Adapter) -> SlotState:
    """Fill `slot` with `adapter` (every projection is written: untargeted ones are zeroed)."""
    clear_slot(model, slot)
    if adapter.kind is AdapterKind.LORA:
        return _write_lora(model, slot, adapter)
    dev, dtype = model.model.norm.weight.device, model.dtype
    if adapter.kind is AdapterKind.PROMPT:
        kv = model.virtual_token_kv(adapter.prompt.to(dev, dtype))
    else:
        kv = adapter.prefix.to(dev, dtype)
    return SlotState(adapter.kind, kv_prefix=kv)


def _write_lora(model: DecoderModel, slot: int, adapter: Adapter) -> SlotState:
    linears = model.adapted_linears()
    dev = model.model.norm.weight.device
    for name, m in adapter.lora.items():
        lora = linears[name].lora
        if lora is None:
            raise ValueError(f"no LoRA slots allocated on {name}")
        f = dora_factor(model, name, m) if m.magnitude is not None else None
        lora.set_slot(slot, m.A.to(dev), m.B.to(dev), m.scale,
                      None if m.bias is None else m.bias.to(dev), f)
    if adapter.embedding is not None:
        if model.embed_lora is None:
            model.allocate_embedding_slots()
        e = adapter.embedding
        model.embed_lora.set_slot(slot, e.A.to(dev), e.B.to(dev), e.scale)
    return SlotState(AdapterKind.LORA, dora=adapter.use_dora, embedding=adapter.embedding is not None)


@torch.no_grad()
def clear_slot(model: DecoderModel, slot: int) -> None:
    """Zero a slot everywhere: rows that still point at it compute the base model."""
    for lin in model.adapted_linears().values():
        if lin.lora is not None:
            lin.lora.reset_slot(slot)
    if model.embed_lora is not None:
        model.embed_lora.reset_slot(slot)
