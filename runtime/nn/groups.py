"""Projections that read the same input, as one 4-bit matmul: q/k/v, and gate/up.

    x [T, hidden] --one fused NF4 matmul--> [T, q + k + v] --split--> q, k, v (views)
                  --each member's LoRA / DoRA on its own slice--> q, k, v

A decode step is ~200 small matmuls; each fused-kernel call has a fixed cost (threads woken,
the input cast to bf16 once per call), so merging the three attention inputs and the two MLP
inputs saves 3 of the 7 calls per layer. Nothing changes in the math: the merged weight is the
members' packed tiles stacked along out_features (the fused layout tiles rows by 32, so rows of
different members never share a tile), and every member keeps its own AdaptedLinear (module
names, LoRA slots, DoRA norms, the standard path) untouched. The members' packed codes become
views of the merged buffer, so nothing is stored twice.

`merge` only happens on the fused CPU kernel (runtime/nn/kernels.py decides), after the model
has moved to its device (`DecoderModel.use_kernels`): on the standard path bitsandbytes
dequantizes per call, and a merged call would only dequantize the same bytes.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


class ProjectionGroup(nn.Module):
    """Members (AdaptedLinear) that share an input; `forward` returns one output per member."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self._members = list(members)  # a plain list: the members stay registered where they are
        self.sizes = [m.base.out_features for m in members]
        self.register_buffer("weight", None, persistent=False)  # merged packed tiles, when merged
        self.register_buffer("bias", None, persistent=False)  # [sum(out)] when any member has one
        self._state = None  # merged fused QuantState

    @property
    def merged(self) -> bool:
        return self.weight is not None

    def forward(self, x: torch.Tensor, ab) -> list[torch.Tensor]:
        # x: [T, in] -> [[T, out_i] for each member]
        if not self.merged or (torch.is_grad_enabled() and x.requires_grad):
            # the merged call has no backward: where a gradient must reach x (training on the
            # served base), each member's own forward, whose fused path carries one (quant.py)
            return [m(x, ab) for m in self._members]
        from runtime.nn.kernels import fused_matmul

        y = fused_matmul(x, self.weight, self._state)  # [T, sum(out)]
        if self.bias is not None:
            y = y + self.bias
        return [m.adapt(x, part, ab) for m, part in zip(self._members, y.split(self.sizes, dim=-1))]

    def merge(self) -> bool:
        """Stack the members' fused tiles into one matmul (all must be on the fused kernel)."""
        self.unmerge()
        bases = [m.base for m in self._members]
        if any(b.kernel != "cpu-fused" for b in bases):
            return False
        self.weight = torch.cat([b.weight for b in bases])  # [sum(out), in/2]
        state = copy.copy(bases[0]._fused_state)
        state.absmax = torch.cat([b._fused_state.absmax for b in bases], dim=1).contiguous()
        state.shape = torch.Size([sum(self.sizes), bases[0].in_features])
        self._state = state
        biases = [b.bias for b in bases]
        if any(v is not None for v in biases):
            dtype = next(v.dtype for v in biases if v is not None)
            self.bias = torch.cat([torch.zeros(n, dtype=dtype) if v is None else v
                                   for v, n in zip(biases, self.sizes)])
        start = 0
        for b, n in zip(bases, self.sizes):
            b.weight = self.weight[start:start + n]  # a view: the codes live once, in the group
            start += n
        return True

    def unmerge(self) -> None:
        if not self.merged:
            return
        for b in (m.base for m in self._members):
            b.weight = b.weight.clone()  # own storage again before the group lets go
        self.weight, self.bias, self._state = None, None, None
