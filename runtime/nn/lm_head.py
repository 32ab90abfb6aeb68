"""The output projection, by batch size: the kernel that measured fastest, exact where it counts.

    logits [n, vocab] = x [n, hidden] @ W.T          (W: the fp32 embedding when tied)

    rows <= INT8_MAX_ROWS   weight-only int8 (per-row scales, torch's int8pack kernel): reads a
                            quarter of the fp32 bytes; 0.56 vs 1.71 ms bf16 vs 6.6 ms fp32 at one
                            row (SmolLM2's 49152 x 576, 2 threads)
    more rows               bf16 (oneDNN), faster than int8 from ~16 rows (3.4 vs 6.2 ms at 32)
    exact mode              the model dtype (`--dtype float32`), nothing approximated

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

    def use(self, approximate: bool) -> str:
        """approximate=False: exact (the model dtype). True: bf16, and int8 for small batches
        where this torch has the kernel. Returns what it runs."""
        self.bf16 = self.int8 = self.int8_scale = self._fused_refine = None
        if not approximate or self.weight.dtype == torch.bfloat16:
            return str(self.weight.dtype).removeprefix("torch.")
        w = self.weight.detach()
        self.bf16 = w.to(torch.bfloat16)
        self._fused_refine = _refine_kernel(w)
        if w.device.type == "cpu" and hasattr(torch, "_weight_int8pack_mm"):
            scale = (w.abs().amax(dim=1) / 127).clamp_min(1e-12)  # [vocab]
            self.int8 = (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
            self.int8_scale = scale.to(torch.bfloat16)
            return f"int8 up to {INT8_MAX_ROWS} rows, else bfloat16; top {EXACT_TOP} exact"
        return f"bfloat16; top {EXACT_TOP} exact"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [n, hidden] -> [n, vocab] in x's dtype
        if self.bf16 is None:
            return F.linear(x, self.weight)
        xb = x.to(torch.bfloat16)
        if self.int8 is not None and x.shape[0] <= INT8_MAX_ROWS:
            logits = torch._weight_int8pack_mm(xb, self.int8, self.int8_scale)
        else:
            logits = F.linear(xb, self.bf16)
        if self._fused_refine is not None and x.dtype == torch.float32 and not (
                x.requires_grad and torch.is_grad_enabled()):
            return self._fused_refine(logits, x, self.weight.detach(), EXACT_TOP)
        return self.refine(x, logits.to(x.dtype))

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
