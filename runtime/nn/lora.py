"""Batched multi-adapter LoRA (and DoRA, and folded AdaLoRA) on one projection.

Every targeted projection computes, for each token t of the packed batch with adapter slot s_t:

    y[t] = base(x[t]) + scale[s] * (B[s] @ (A[s] @ x[t]) + bias[s])               (LoRA)
    y[t] = base(x[t]) + (f[s] - 1) * (base(x[t]) - b0) + f[s] * scale[s] * B[s] A[s] x[t]   (DoRA)

where f[s] = magnitude / ||W + scale * B A||_row is fixed at load (the base is frozen), and b0 is
the base projection's own bias. Slot weights are preallocated [S + 1, ...] tensors, rank padded
to `max_rank`; slot S is always zero, so base-model rows (and slots an adapter does not target)
add nothing and the forward never branches per adapter.

Two fast paths, chosen once per step by `AdapterBatch` (runtime/nn/adapter_batch.py):
- grouped: for each distinct slot, one matmul pair over its rows (prefill, few adapters);
- gather: per-token weight gather + bmm (decode over many distinct adapters).
`lora_delta_reference` is the plain per-token loop both are tested against.

Training (trainer/) uses these same modules with one slot. It makes slot 0 trainable without any
code here: `torch.nn.utils.parametrize` replaces `A` / `B` / `dora` by tensors whose slot 0 is
computed from the trainer's parameters (LoRA A/B, DoRA magnitude, AdaLoRA P * Lambda, Q), so the
forward below is exactly the served one. The one training hook is `dropout`: PEFT's
`lora_dropout` on the LoRA branch's input (an Identity when serving).
"""
from __future__ import annotations

import torch
from torch import nn

from runtime.nn.adapter_batch import AdapterBatch


class LoraSlots(nn.Module):
    """Adapter weights for one projection, one slot per device-resident adapter."""

    def __init__(self, in_features: int, out_features: int, num_slots: int, max_rank: int,
                 dtype: torch.dtype, device=None):
        super().__init__()
        n = num_slots + 1  # + the zero slot
        self.num_slots, self.max_rank = num_slots, max_rank
        self.A = nn.Parameter(torch.zeros(n, max_rank, in_features, dtype=dtype, device=device),
                              requires_grad=False)  # [S+1, r, in]
        self.B = nn.Parameter(torch.zeros(n, out_features, max_rank, dtype=dtype, device=device),
                              requires_grad=False)  # [S+1, out, r]
        self.register_buffer("scale", torch.zeros(n, dtype=dtype, device=device))  # [S+1]
        self.register_buffer("bias", torch.zeros(n, out_features, dtype=dtype, device=device))
        self.register_buffer("dora", torch.ones(n, out_features, dtype=dtype, device=device))
        self.ranks = [0] * n  # true rank per slot (python ints: the grouped path slices by them)
        #: training hook: dropout on the LoRA branch's input (PEFT `lora_dropout`); Identity serving
        self.dropout: nn.Module = nn.Identity()

    def set_slot(self, slot: int, A: torch.Tensor, B: torch.Tensor, scale: float,
                 bias: torch.Tensor | None = None, dora: torch.Tensor | None = None) -> None:
        """Copy one adapter's module weights into `slot` (A: [r, in], B: [out, r])."""
        r = A.shape[0]
        with torch.no_grad():
            self.reset_slot(slot)
            self.A[slot, :r].copy_(A)
            self.B[slot, :, :r].copy_(B)
            self.scale[slot] = scale
            if bias is not None:
                self.bias[slot].copy_(bias * scale)
            if dora is not None:
                self.dora[slot].copy_(dora)
        self.ranks[slot] = r

    def reset_slot(self, slot: int) -> None:
        with torch.no_grad():
            self.A[slot].zero_()
            self.B[slot].zero_()
            self.scale[slot] = 0
            self.bias[slot].zero_()
            self.dora[slot].fill_(1)
        self.ranks[slot] = 0

    def forward(self, x: torch.Tensor, y: torch.Tensor, ab: AdapterBatch,
                base_bias: torch.Tensor | None) -> torch.Tensor:
        # x: [T, in], y = base(x): [T, out]
        delta = lora_delta(self, self.dropout(x), ab)  # [T, out], scaled, with lora bias
        if not ab.any_dora:
            return y + delta
        f = self.dora[ab.token_slots]  # [T, out]
        y0 = y if base_bias is None else y - base_bias
        return y + ((f - 1) * y0 + f * delta)


def lora_delta(m: LoraSlots, x: torch.Tensor, ab: AdapterBatch) -> torch.Tensor:
    """scale[s_t] * (B[s_t] @ A[s_t] @ x[t] + bias[s_t]) for every token t: [T, out]."""
    if ab.use_gather:
        return _delta_gather(m, x, ab)
    return _delta_grouped(m, x, ab)


def _delta_grouped(m: LoraSlots, x: torch.Tensor, ab: AdapterBatch) -> torch.Tensor:
    out = x.new_zeros(x.shape[0], m.B.shape[1])
    for slot, rows in ab.groups:
        r = m.ranks[slot]
        if r == 0:
            continue
        xs = x[rows]  # [n, in]
        d = (xs @ m.A[slot, :r].T) @ m.B[slot, :, :r].T  # [n, out]
        out[rows] = d * m.scale[slot] + m.bias[slot]
    return out


def _delta_gather(m: LoraSlots, x: torch.Tensor, ab: AdapterBatch) -> torch.Tensor:
    rows, slots = ab.adapter_rows, ab.adapter_row_slots  # [n], [n]
    out = x.new_zeros(x.shape[0], m.B.shape[1])
    xa = torch.bmm(m.A[slots], x[rows][:, :, None])  # [n, r, in] @ [n, in, 1] -> [n, r, 1]
    d = torch.bmm(m.B[slots], xa)[:, :, 0]  # [n, out, r] @ [n, r, 1] -> [n, out]
    out[rows] = d * m.scale[slots][:, None] + m.bias[slots]
    return out


def lora_delta_reference(m: LoraSlots, x: torch.Tensor, token_slots: torch.Tensor) -> torch.Tensor:
    """The plain per-token loop that defines `lora_delta`."""
    out = x.new_zeros(x.shape[0], m.B.shape[1])
    for t in range(x.shape[0]):
        s = int(token_slots[t])
        out[t] = m.scale[s] * (m.B[s] @ (m.A[s] @ x[t])) + m.bias[s]  # bias is stored pre-scaled
    return out
