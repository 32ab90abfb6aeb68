"""The output projection, by batch size: the kernel that measured fastest, exact where it counts.

    logits [n, vocab] = x [n, hidden] @ W.T          (W: the fp32 embedding when tied)

    rows <= INT8_MAX_ROWS   weight-only int8 (per-row scales, torch's int8pack kernel): reads a
                            quarter of the fp32 bytes; 0.56 vs 1.71 ms bf16 vs 6.6 ms fp32 at one
                            row (SmolLM2's 49152 x 576, 2 threads)
    more rows               bf16 (oneDNN), faster than int8 from ~16 rows (3.4 vs 6.2 ms at 32)
    exact mode              the model dtype (`--dtype float32`), nothing approximated

That is on CPUs that compute bf16 natively (AVX512-BF16, AMX). Elsewhere (AVX2) torch's int8
and bf16 matmuls are slower than fp32 (23 and 39 ms vs 15 ms at one row, 2 AMD Zen 3 cores), so
rows <= INT8_MAX_ROWS take Quiver's own int8 kernel (csrc/lm_head.cpp `lm_head_int8`, fp32
sums, bf16 out as torch's) and more rows the exact fp32 matmul.

After an approximate matmul the EXACT_TOP best candidates of each row are recomputed in the
model dtype: int8 / bf16 move a logit by ~0.1-0.4%, enough to swap two near-tied tokens, so
without this the greedy choice and the top logprobs could differ from transformers' fp32 head.
The rest of the vocabulary keeps its approximate logit (the far tail of a sampling
distribution only). On CPU the conversion, the top-k and the exact products run as one pass
over each row (csrc/lm_head.cpp: torch's to / topk / gather / bmm / scatter read the [n, vocab]
logits four times, ~5% of a 64-row decode step); `refine` is its torch form and the path without
the extension. `reference` is the plain matmul everything is tested against.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: candidates per row whose logit is recomputed exactly after an approximate matmul
EXACT_TOP = 32
#: up to this many rows the int8 kernel is faster than bf16 (measured, see the docstring)
INT8_MAX_ROWS = 8


class LmHead(nn.Module):
    def __init__(self, weight: torch.Tensor):
        super().__init__()
        # [vocab, hidden] in the model dtype, owned by the model (tied: the embedding); held
        # outside the module's registries so state_dict does not list it twice
        self._weight = (weight,)
        self.register_buffer("bf16", None, persistent=False)  # [vocab, hidden]
        self.register_buffer("int8", None, persistent=False)  # [vocab, hidden]
        self.register_buffer("int8_scale", None, persistent=False)  # [vocab] bf16
        self._fused_refine = None  # csrc/lm_head.cpp's kernel, where `use` found it applies
        self._int8_kernel = None  # csrc/lm_head.cpp's int8 matmul, on CPUs without native bf16

    def use(self, approximate: bool, native_bf16: bool | None = None) -> str:
        """approximate=False: exact (the model dtype). True: bf16, and int8 for small batches
        where this torch has the kernel; on a CPU without native bf16 (native_bf16 None: ask
        the CPU), int8 for small batches on Quiver's kernel and exact above. Returns what it runs."""
        from runtime.nn.kernels import native_bf16_cpu
        from runtime.nn.native import lm_head_int8_kernel

        self.bf16 = self.int8 = self.int8_scale = self._fused_refine = self._int8_kernel = None
        exact = str(self.weight.dtype).removeprefix("torch.")
        if not approximate or self.weight.dtype == torch.bfloat16:
            return exact
        w = self.weight.detach()
        cpu = w.device.type == "cpu"
        if native_bf16 is None:
            native_bf16 = not cpu or native_bf16_cpu()
        if not native_bf16:
            self._int8_kernel = lm_head_int8_kernel() if cpu and w.dtype == torch.float32 else None
            if self._int8_kernel is None:
                return exact  # nothing here beats the exact matmul
        else:
            self.bf16 = w.to(torch.bfloat16)
        self._fused_refine = _refine_kernel(w)
        if cpu and (self._int8_kernel is not None or hasattr(torch, "_weight_int8pack_mm")):
            scale = (w.abs().amax(dim=1) / 127).clamp_min(1e-12)  # [vocab]
            self.int8 = (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
            self.int8_scale = scale.to(torch.bfloat16)
            above = "bfloat16" if self.bf16 is not None else exact
            return f"int8 up to {INT8_MAX_ROWS} rows, else {above}; top {EXACT_TOP} exact"
        return f"bfloat16; top {EXACT_TOP} exact"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [n, hidden] -> [n, vocab] in x's dtype
        logits = self._approximate(x)  # [n, vocab] bf16, or None: exact
        if logits is None:
            return F.linear(x, self.weight)
        if self._fused_refine is not None and x.dtype == torch.float32 and not (
                x.requires_grad and torch.is_grad_enabled()):
            return self._fused_refine(logits, x, self.weight.detach(), EXACT_TOP)
        return self.refine(x, logits.to(x.dtype))

    def _approximate(self, x: torch.Tensor) -> torch.Tensor | None:
        """The approximate logits `use` chose for x's row count, or None where it is exact."""
        if self.int8 is not None and x.shape[0] <= INT8_MAX_ROWS:
            if self._int8_kernel is not None and x.dtype == torch.float32 and not (
                    x.requires_grad and torch.is_grad_enabled()):  # (no backward: exact then)
                return self._int8_kernel(x, self.int8, self.int8_scale)
            if self.bf16 is not None:
                return torch._weight_int8pack_mm(x.to(torch.bfloat16), self.int8, self.int8_scale)
        if self.bf16 is None:
            return None
        return F.linear(x.to(torch.bfloat16), self.bf16)

    def refine(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Recompute each row's EXACT_TOP best logits from the exact weight, in place."""
        k = min(EXACT_TOP, logits.shape[-1])
        top = logits.topk(k, dim=-1, sorted=False).indices  # [n, k]
        exact = torch.bmm(self.weight[top], x[:, :, None])[:, :, 0]  # [n, k, h] @ [n, h, 1]
        return logits.scatter_(-1, top, exact)

    def copy_bytes(self) -> int:
        """Bytes of the approximate copies (none in the exact mode)."""
        return sum(t.numel() * t.element_size() for t in (self.bf16, self.int8, self.int8_scale)
                   if t is not None)

    @property
    def weight(self) -> torch.Tensor:
        return self._weight[0]

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


def _refine_kernel(weight: torch.Tensor):
    """csrc/lm_head.cpp's fused exact pass for a CPU fp32 contiguous weight, else None (then
    `LmHead.refine` in torch)."""
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or not weight.is_contiguous():
        return None
    from runtime.nn.native import lm_head_refine_kernel

    return lm_head_refine_kernel()
