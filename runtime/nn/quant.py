"""The frozen base projection: 4-bit (NF4 / FP4, bitsandbytes) or plain dense.

Quantization happens once, at construction (`QuantLinear.from_dense`), never in forward
(gpt-fast `quantize.py`, torchtune `NF4Linear`). The packed 4-bit weight and its quantization
statistics are buffers, so they appear in `state_dict` and move with `.to(device)`.

The forward is exactly what transformers' `bnb.nn.Linear4bit` computes on the same weights with
the same `BitsAndBytesConfig` (NF4, double quantization, blocksize 64): `bnb.matmul_4bit`, which
also carries gradients to the input, so the trainer backpropagates through a frozen NF4 base.
`reference_forward` is the pure-torch meaning: dequantize, then a dense matmul.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from runtime.config import QuantConfig


class DenseLinear(nn.Module):
    """An unquantized frozen projection (`--quantize none`): `y = x @ W.T + b`."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("weight", weight)  # [out, in]
        self.register_buffer("bias", bias)  # [out] or None

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight


class QuantLinear(nn.Module):
    """A frozen bitsandbytes 4-bit projection: `y = x @ dequant(W4).T + b`."""

    def __init__(self, packed: torch.Tensor, quant_state, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("weight", packed)  # [out*in/2, 1] uint8, two 4-bit codes per byte
        self.register_buffer("bias", bias)  # [out] or None, kept in the compute dtype
        self.quant_state = quant_state
        # The statistics as buffers too, so `state_dict` holds everything needed to rebuild.
        for key, value in quant_state.as_dict(packed=True).items():
            if isinstance(value, torch.Tensor):
                self.register_buffer("weight_stats_" + key.replace(".", "_"), value, persistent=True)

    @classmethod
    def from_dense(cls, weight: torch.Tensor, bias: torch.Tensor | None, quant: QuantConfig):
        import bitsandbytes.functional as bnbf  # imported late: heavy, and absent for `none`

        packed, state = bnbf.quantize_4bit(
            weight.contiguous(),  # [out, in]
            blocksize=quant.blocksize,
            compress_statistics=quant.double_quant,
            quant_type=quant.method,
        )
        return cls(packed, state, bias)

    @property
    def in_features(self) -> int:
        return self.quant_state.shape[1]

    @property
    def out_features(self) -> int:
        return self.quant_state.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import bitsandbytes as bnb

        bias = None if self.bias is None else self.bias.to(x.dtype)
        return bnb.matmul_4bit(x, self.weight, quant_state=self.quant_state, bias=bias)

    def dequantized_weight(self) -> torch.Tensor:
        """The dense weight the 4-bit codes stand for, [out, in] (DoRA norms need it)."""
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(self.weight, self.quant_state)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pure-torch meaning of forward: dequantize, then a dense matmul."""
        return F.linear(x, self.dequantized_weight().to(x.dtype), self.bias)

    def _apply(self, fn, recurse=True):
        # Keep the quant state's own tensors (absmax, code, nested state) on the same device.
        out = super()._apply(fn, recurse)
        probe = fn(torch.empty(0, device=self.weight.device))
        self.quant_state.to(probe.device)
        return out


def make_base_linear(weight: torch.Tensor, bias: torch.Tensor | None, quant: QuantConfig,
                     dtype: torch.dtype) -> nn.Module:
    """A frozen projection from a dense HF weight, quantized per `quant`."""
    if bias is not None:
        bias = bias.to(dtype)
    if quant.method == "none":
        return DenseLinear(weight.to(dtype), bias)
    return QuantLinear.from_dense(weight, bias, quant)
