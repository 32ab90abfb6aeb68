"""The frozen base projection: 4-bit (NF4 / FP4, bitsandbytes) or plain dense.

Quantization happens once, at construction (`QuantLinear.from_dense`), never in forward
(gpt-fast `quantize.py`, torchtune `NF4Linear`). The packed 4-bit weight and its quantization
statistics are buffers, so they appear in `state_dict` and move with `.to(device)`.

The forward is exactly what transformers' `bnb.nn.Linear4bit` computes on the same weights with
the same `BitsAndBytesConfig` (NF4, double quantization, blocksize 64) on the same machine: the
fused CPU kernel where transformers takes it (AVX512-BF16, eval mode), `bnb.matmul_4bit` on the
standard layout elsewhere; which one is runtime/nn/kernels.py's choice, made once at load. Both
carry gradients to the input, so the trainer backpropagates through a frozen NF4 base.
`reference_forward` is the pure-torch meaning: dequantize, then a dense matmul.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from runtime.config import QuantConfig

#: the most rows the cpu-gemv kernel takes (csrc/nf4_gemv.cpp kGemvRowsMax): decode steps; more
#: rows amortize bitsandbytes' dequantization over the batch and take its standard path
GEMV_MAX_ROWS = 8


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

    kernel = "dense"

    def use_kernel(self, kernel: str) -> str:
        """Nothing to switch: a dense projection runs F.linear whatever the 4-bit kernel."""
        return self.kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight

    def resident_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())


class QuantLinear(nn.Module):
    """A frozen bitsandbytes 4-bit projection: `y = x @ dequant(W4).T + b`.

    Two layouts of the same 4-bit codes (runtime/nn/kernels.py picks one per projection):
    - standard: bitsandbytes' `quantize_4bit` output [out*in/2, 1] with its (nested) statistics;
    - cpu-fused: the AVX512-BF16 kernel's tiles [out, in/2] with bf16 absmax [in/bs, out],
      made once by `use_kernel("cpu-fused")`. The standard `quant_state` is kept beside it (a
      few bytes per 64 weights), so `dequantized_weight` still reads the standard statistics:
      DoRA norms and gradients never see the packed bytes (PEFT's DoRA does, and breaks).
    The cpu-gemv kernel (CPUs without AVX512-BF16) reads the standard layout, with each block's
    absmax dequantized to fp32 once (4 bytes per 64 weights) beside it.
    """

    def __init__(self, packed: torch.Tensor, quant_state, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("weight", packed)  # standard: [out*in/2, 1] uint8, two codes a byte
        self.register_buffer("bias", bias)  # [out] or None, kept in the compute dtype
        self.quant_state = quant_state  # always the standard layout's statistics
        self.kernel = "standard"
        self._fused_state = None  # the packed layout's QuantState (bf16 absmax), when fused
        self._gemv = None  # cpu-gemv: (absmax fp32 [blocks], code values [16]) (`_gemv_state`)
        # The statistics as buffers too, so `state_dict` holds everything needed to rebuild.
        for key, value in quant_state.as_dict(packed=True).items():
            if isinstance(value, torch.Tensor):
                self.register_buffer("weight_stats_" + key.replace(".", "_"), value, persistent=True)

    @classmethod
    def from_dense(cls, weight: torch.Tensor, bias: torch.Tensor | None, quant: QuantConfig):
        from runtime.nn.kernels import quiet_bitsandbytes_import

        quiet_bitsandbytes_import()
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

    def use_kernel(self, kernel: str) -> str:
        """Switch to `kernel` ("standard", "cpu-fused" or "cpu-gemv"); returns the kernel this
        layer runs (shapes a kernel refuses stay standard)."""
        from runtime.nn.kernels import fused_shape_ok, gemv_shape_ok

        if kernel == self.kernel:
            return kernel
        if kernel not in ("standard", "cpu-fused", "cpu-gemv"):
            raise ValueError(f"unknown 4-bit kernel {kernel!r}")
        bs = self.quant_state.blocksize
        if kernel == "cpu-fused" and not fused_shape_ok(self.out_features, self.in_features, bs) or \
                kernel == "cpu-gemv" and not gemv_shape_ok(self.in_features, bs):
            kernel = "standard"
        self.weight, self._fused_state, self._gemv = self.standard_codes(), None, None
        if kernel == "cpu-fused":
            from bitsandbytes.functional import _convert_weight_packed_for_cpu

            state = copy.deepcopy(self.quant_state)  # the conversion rewrites the state in place
            self.weight, self._fused_state = _convert_weight_packed_for_cpu(self.weight, state)
        elif kernel == "cpu-gemv":
            self._gemv = self._gemv_state()
        self.kernel = kernel
        return kernel

    def _gemv_state(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The gemv's statistics: each block's absmax in fp32 (the nested statistics dequantized
        once, as bitsandbytes' dequantization does at every call) and the code's 16 values."""
        import bitsandbytes.functional as bnbf

        st = self.quant_state
        absmax = bnbf.dequantize_blockwise(st.absmax, st.state2) + st.offset if st.nested else st.absmax
        return absmax.float().contiguous(), st.code.float().contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "cpu-fused":
            if torch.is_grad_enabled() and x.requires_grad:
                return _FusedMatmul.apply(x, self)
            return self.fused_forward(x)
        if self.kernel == "cpu-gemv" and self.gemv_takes(x):
            return self.gemv_forward(x)
        import bitsandbytes as bnb

        bias = None if self.bias is None else self.bias.to(x.dtype)
        return bnb.matmul_4bit(x, self.weight, quant_state=self.quant_state, bias=bias)

    def gemv_takes(self, x: torch.Tensor) -> bool:
        """The gemv runs fp32 inputs of at most GEMV_MAX_ROWS rows that need no gradient (decode
        steps); prefill chunks and training take bitsandbytes' standard path."""
        return (x.dtype == torch.float32 and x.numel() <= GEMV_MAX_ROWS * self.in_features
                and not (torch.is_grad_enabled() and x.requires_grad))

    def gemv_forward(self, x: torch.Tensor) -> torch.Tensor:
        """csrc/nf4_gemv.cpp on the standard codes: the dequantized matmul up to fp32 summation
        order (reference_forward is its meaning)."""
        from runtime.nn.native import nf4_gemv_kernel

        absmax, lut = self._gemv
        rows = x.reshape(-1, self.in_features)
        y = nf4_gemv_kernel()(rows if rows.stride(-1) == 1 else rows.contiguous(), self.weight.view(-1),
                              absmax, lut, self.out_features, self.quant_state.blocksize)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def fused_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The fused kernel (no autograd): bf16 inside, `x`'s dtype out, as transformers does."""
        from runtime.nn.kernels import fused_matmul

        y = fused_matmul(x, self.weight, self._fused_state)  # [.., out] in x.dtype
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def resident_bytes(self) -> int:
        """Codes and statistics as held (buffers), plus the fused layout's bf16 absmax."""
        n = sum(t.numel() * t.element_size() for t in self.buffers())
        if self._fused_state is not None:
            n += self._fused_state.absmax.numel() * self._fused_state.absmax.element_size()
        if self._gemv is not None:
            n += sum(t.numel() * t.element_size() for t in self._gemv)
        return n

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # A state_dict always holds the standard layout, whatever kernel runs: with the
        # statistics beside it, it rebuilds the layer anywhere (as bitsandbytes' Linear4bit does).
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.kernel == "cpu-fused":
            destination[prefix + "weight"] = self.standard_codes()

    def standard_codes(self) -> torch.Tensor:
        """The 4-bit codes in bitsandbytes' standard layout ([out*in/2, 1] uint8)."""
        if self.kernel != "cpu-fused":
            return self.weight
        return unpack_fused_codes(self.weight, self.out_features, self.in_features)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight the 4-bit codes stand for, [out, in], from the standard statistics
        (DoRA norms and gradients need it; the same values on every kernel), in `dtype` (default:
        the statistics' own). bitsandbytes dequantizes in fp32 and rounds once to `dtype`, so a
        bf16 weight is exactly `dequantized_weight().to(torch.bfloat16)`, made ~4x faster."""
        import bitsandbytes.functional as bnbf

        state = self.quant_state
        if dtype is not None and dtype != state.dtype:
            state = copy.copy(state)  # shallow: the same absmax / code tensors, another output dtype
            state.dtype = dtype
        return bnbf.dequantize_4bit(self.standard_codes(), state)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pure-torch meaning of forward: dequantize, then a dense matmul."""
        return F.linear(x, self.dequantized_weight().to(x.dtype), self.bias)

    def _apply(self, fn, recurse=True):
        # Keep the quant state's own tensors (absmax, code, nested state) on the same device.
        out = super()._apply(fn, recurse)
        probe = fn(torch.empty(0, device=self.weight.device))
        self.quant_state.to(probe.device)
        if self._fused_state is not None:
            self._fused_state.to(probe.device)
        return out


class _FusedMatmul(torch.autograd.Function):
    """The fused kernel forward; the backward (to the input only: the base is frozen) through
    the standard dequantized weight, as bitsandbytes' own `MatMul4Bit` does. The fused op has no
    backward of its own, and a base built for serving may still be asked for input gradients.

    The backward computes in bf16, as its forward does (the fused kernel rounds x and computes in
    bf16, runtime/nn/kernels.py), and as `quiver train`'s bf16 base does through `MatMul4Bit`:

        grad_x = (grad.bf16 @ dequant(W4).bf16).to(grad.dtype)      # [.., out] @ [out, in]

    so the input gradient carries the precision the forward it differentiates has. On the CPUs
    that have the fused kernel (AVX512-BF16) that matmul and the bf16 dequantization measured ~4x
    faster than in fp32: it was most of why training on the served base ran at 0.75x `quiver
    train`'s rate (README, "Fine-tuning in the server")."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, lin: "QuantLinear") -> torch.Tensor:
        ctx.lin = lin
        return lin.fused_forward(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        w = ctx.lin.dequantized_weight(torch.bfloat16)  # [out, in]
        return (grad.to(torch.bfloat16) @ w).to(grad.dtype), None


def unpack_fused_codes(packed: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """Invert the fused kernel's tiling: [out, in/2] tiles -> the standard [out*in/2, 1] bytes.

    The fused layout groups 32 output rows x 2 input columns into 64 codes and stores code j of
    a group in the low nibble of byte j and code 32 + j in its high nibble (code m of a group is
    row m // 2, column m % 2 of the tile). The standard layout holds row-major codes, two a byte,
    the first in the high nibble. Lossless: the same codes, only moved.

    So bytes 2r and 2r + 1 of a tile hold row r's two codes (low nibbles) and row 16 + r's (high
    nibbles). The nibbles are moved four bytes at a time in int32 words (a word = two such byte
    pairs), then one permute puts rows in order: every training backward on the served base
    unpacks each weight (`dequantized_weight`), and the byte-wise version cost ~4x as much.
    tests/nn/test_kernels.py checks it against the code-by-code meaning above.
    """
    n, k = out_features, in_features
    words = packed.view(torch.int32)  # bytes (b0, b1, b2, b3) = rows (r, r+1)'s byte pairs
    low = ((words << 4) & 0x00F000F0) | ((words >> 8) & 0x000F000F)  # byte 0 / 2: row r / r+1
    high = (words & 0x00F000F0) | ((words >> 12) & 0x000F000F)  # byte 0 / 2: row 16+r / 17+r
    pairs = (low | (high << 8)).view(torch.uint8).view(n // 32, k // 2, 16, 2)  # [.., r, half]
    return pairs.permute(0, 3, 2, 1).reshape(-1, 1)  # [out/32, half, 16 rows, in/2] row-major


def make_base_linear(weight: torch.Tensor, bias: torch.Tensor | None, quant: QuantConfig,
                     dtype: torch.dtype) -> nn.Module:
    """A frozen projection from a dense HF weight, quantized per `quant`."""
    if bias is not None:
        bias = bias.to(dtype)
    if quant.method == "none":
        return DenseLinear(weight.to(dtype), bias)
    return QuantLinear.from_dense(weight, bias, quant)
