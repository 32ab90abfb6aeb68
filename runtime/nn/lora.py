"""Batched multi-adapter LoRA (and DoRA, and folded AdaLoRA) on one projection.

Every targeted projection computes, for each token t of the packed batch with adapter slot s_t:

    y[t] = base(x[t]) + scale[s] * (B[s] @ (A[s] @ x[t]) + bias[s])               (LoRA)
    y[t] = base(x[t]) + (f[s] - 1) * (base(x[t]) - b0) + f[s] * scale[s] * B[s] A[s] x[t]   (DoRA)

where f[s] = magnitude / ||W + scale * B A||_row is fixed at load (the base is frozen), and b0 is
the base projection's own bias. Slot weights are preallocated [S + 1, ...] tensors, rank padded
to `max_rank`; slot S is always zero, so base-model rows (and slots an adapter does not target)
add nothing and the forward never branches per adapter. B is stored transposed (`Bt`, [r, out]
per slot) so that the second matmul reads it row-major: addmm with a transposed operand costs
about twice as much on CPU for these skinny shapes.

Two fast paths, chosen once per step by `AdapterBatch` (runtime/nn/adapter_batch.py):
- runs: on CPU without autograd, every run of up to LORA_ROWS_MAX consecutive same-slot tokens
  (decode rows) in one parallel C++ pass (csrc/lora_rows.cpp `lora_runs_`, each slot's weights
  streamed once); each longer run (a prompt chunk; every run under autograd or on CUDA) one
  matmul pair on views (nothing copied), the second fused with the add (addmm); a run over the
  whole batch (training, one adapter) skips the scatter too;
- gather: per-token weight gather + bmm (CUDA, many single-token runs; CPU ones without the
  C++ pass).
`lora_delta_reference` is the plain per-token loop both are tested against.

Training (trainer/) uses these same modules with one slot. It makes slot 0 trainable without any
code here: `torch.nn.utils.parametrize` replaces `A` / `Bt` / `dora` by tensors whose slot 0 is
computed from the trainer's parameters (LoRA A/B, DoRA magnitude, AdaLoRA P * Lambda, Q), so the
forward below is exactly the served one. The one training hook is `dropout`: PEFT's
`lora_dropout` on the LoRA branch's input (an Identity when serving).
"""
from __future__ import annotations

import torch
from torch import nn

from runtime.nn.adapter_batch import LORA_ROWS_MAX, AdapterBatch
from runtime.nn.native import lora_rows_kernel, lora_runs_kernel


class LoraSlots(nn.Module):
    """Adapter weights for one projection, one slot per device-resident adapter."""

    def __init__(self, in_features: int, out_features: int, num_slots: int, max_rank: int,
                 dtype: torch.dtype, device=None, weight_dtype: torch.dtype | None = None):
        """dtype: the activations'; weight_dtype: A and Bt's storage (default dtype). bf16 storage
        under fp32 activations (`--adapter-dtype bfloat16`) halves the bytes a many-adapter
        decode step streams; the math stays in `dtype` (weights widen exactly), so the only
        change is each weight rounded to bf16 once, at load: none for adapters saved in bf16."""
        super().__init__()
        n = num_slots + 1  # + the zero slot
        wdt = weight_dtype or dtype
        self.num_slots, self.max_rank = num_slots, max_rank
        self.A = nn.Parameter(torch.zeros(n, max_rank, in_features, dtype=wdt, device=device),
                              requires_grad=False)  # [S+1, r, in]
        self.Bt = nn.Parameter(torch.zeros(n, max_rank, out_features, dtype=wdt, device=device),
                               requires_grad=False)  # [S+1, r, out] (PEFT's lora_B transposed)
        self.register_buffer("scale", torch.zeros(n, dtype=dtype, device=device))  # [S+1]
        self.register_buffer("bias", torch.zeros(n, out_features, dtype=dtype, device=device))
        self.register_buffer("dora", torch.ones(n, out_features, dtype=dtype, device=device))
        self.ranks = [0] * n  # true rank per slot (python ints: the runs path slices by them)
        self.scales = [0.0] * n  # `scale` as python floats (addmm's alpha)
        self.has_bias = [False] * n  # LoRA bias (PEFT `lora_bias`) per slot: skip the add if not
        #: the three lists above as one float64 row per slot (rank, scale, has_bias), for the C++
        #: decode layers (runtime/nn/native.py), which read them without Python; not a buffer
        self.slot_meta = torch.zeros(n, 3, dtype=torch.float64)
        #: slot -> (A[slot, :r].T, Bt[slot, :r]) views, made once at load rather than per call
        self._views: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        #: training hook: dropout on the LoRA branch's input (PEFT `lora_dropout`); Identity serving
        self.dropout: nn.Module = nn.Identity()

    @property
    def out_features(self) -> int:
        return self.Bt.shape[2]

    def set_slot(self, slot: int, A: torch.Tensor, B: torch.Tensor, scale: float,
                 bias: torch.Tensor | None = None, dora: torch.Tensor | None = None) -> None:
        """Copy one adapter's module weights into `slot` (A: [r, in], B: [out, r])."""
        r = A.shape[0]
        with torch.no_grad():
            self.reset_slot(slot)
            self.A[slot, :r].copy_(A)
            self.Bt[slot, :r].copy_(B.T)
            if bias is not None:
                self.bias[slot].copy_(bias * scale)
                self.has_bias[slot] = True
            if dora is not None:
                self.dora[slot].copy_(dora)
        self.bind_slot(slot, r, scale)  # syncs slot_meta, has_bias included
        self._views[slot] = (self.A[slot, :r].T, self.Bt[slot, :r])

    def bind_slot(self, slot: int, rank: int, scale: float) -> None:
        """Set a slot's true rank and scale (the trainer calls this for the slot it trains)."""
        with torch.no_grad():
            self.scale[slot] = scale
        self.ranks[slot], self.scales[slot] = rank, float(scale)
        self._views.pop(slot, None)
        self._sync_meta(slot)

    def reset_slot(self, slot: int) -> None:
        with torch.no_grad():
            self.A[slot].zero_()
            self.Bt[slot].zero_()
            self.scale[slot] = 0
            self.bias[slot].zero_()
            self.dora[slot].fill_(1)
        self.ranks[slot], self.scales[slot] = 0, 0.0
        self.has_bias[slot] = False
        self._views.pop(slot, None)
        self._sync_meta(slot)

    def _sync_meta(self, slot: int) -> None:
        self.slot_meta[slot] = torch.tensor([self.ranks[slot], self.scales[slot], self.has_bias[slot]],
                                            dtype=torch.float64)

    def weights(self, slot: int, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(A^T [in, r], B^T [r, out]) of a slot at its true rank, in `dtype` if given (bf16
        slots widened for fp32 math: a copy of one slot, only where the dtypes differ)."""
        views = self._views.get(slot)
        if views is None:  # a slot the trainer parametrizes: its tensors change every step
            r = self.ranks[slot]
            views = (self.A[slot, :r].T, self.Bt[slot, :r])
        if dtype is not None and views[0].dtype != dtype:
            return views[0].to(dtype), views[1].to(dtype)
        return views

    def _apply(self, fn, *args, **kwargs):
        self._views.clear()  # .to() / .cuda() move the storage the cached views point into
        out = super()._apply(fn, *args, **kwargs)
        for slot, r in enumerate(self.ranks):
            if r and not torch.nn.utils.parametrize.is_parametrized(self):
                self._views[slot] = (self.A[slot, :r].T, self.Bt[slot, :r])
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor, ab: AdapterBatch,
                base_bias: torch.Tensor | None) -> torch.Tensor:
        # x: [T, in], y = base(x): [T, out]
        x = self.dropout(x)
        if not ab.any_dora:
            return y + _delta_gather(self, x, ab) if ab.use_gather else _add_runs(self, x, y, ab)
        delta = lora_delta(self, x, ab)  # [T, out], scaled, with lora bias
        f = self.dora[ab.token_slots]  # [T, out]
        y0 = y if base_bias is None else y - base_bias
        return y + ((f - 1) * y0 + f * delta)


def lora_delta(m: LoraSlots, x: torch.Tensor, ab: AdapterBatch) -> torch.Tensor:
    """scale[s_t] * (B[s_t] @ A[s_t] @ x[t] + bias[s_t]) for every token t: [T, out]."""
    if ab.use_gather:
        return _delta_gather(m, x, ab)  # already [T, out], zero on base rows
    return _add_runs(m, x, x.new_zeros(x.shape[0], m.out_features), ab)


def _targeted_runs(m: LoraSlots, ab: AdapterBatch) -> list[tuple[int, int, int]]:
    return [(slot, a, b) for slot, a, b in ab.runs if m.ranks[slot]]  # slots this module targets


def _native_rows(m: LoraSlots, x: torch.Tensor) -> bool:
    """Few-row runs may take csrc/lora_rows.cpp (CPU fp32 without autograd: two matmuls'
    dispatch cost more than their math; training's matmuls carry the gradients)."""
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return False
    return not (torch.is_grad_enabled() and (x.requires_grad or m.A.requires_grad or m.Bt.requires_grad))


def _run_add(m: LoraSlots, x: torch.Tensor, y: torch.Tensor, slot: int) -> torch.Tensor:
    """y + one slot's delta for the tokens of one run: x [n, in], y [n, out] -> [n, out]."""
    kernel = lora_rows_kernel() if x.shape[0] <= LORA_ROWS_MAX and _native_rows(m, x) else None
    if kernel is not None:  # reads bf16 slots as they are
        At, Bt = m.weights(slot)
        return kernel(y, x, At.T, Bt, m.scales[slot], m.bias[slot] if m.has_bias[slot] else None)
    At, Bt = m.weights(slot, x.dtype)  # [in, r], [r, out]
    out = torch.addmm(y, x @ At, Bt, alpha=m.scales[slot])  # y + s * (x A^T) B^T
    return out + m.bias[slot] if m.has_bias[slot] else out


def _add_runs(m: LoraSlots, x: torch.Tensor, y: torch.Tensor, ab: AdapterBatch) -> torch.Tensor:
    """y + lora_delta(m, x, ab): each run's delta is added into its own rows (the short runs
    all in one C++ pass where it applies, else one fused addmm a run)."""
    runs = _targeted_runs(m, ab)
    if len(runs) == 1 and runs[0][1] == 0 and runs[0][2] == x.shape[0]:
        return _run_add(m, x, y, runs[0][0])  # one adapter over every token: training, identical
    y = y.clone()  # the caller's y stays as it was
    kernel = lora_runs_kernel() if _native_rows(m, x) else None
    if kernel is not None and ab.short_runs.numel():
        kernel(y, x, m.A, m.Bt, m.bias, m.slot_meta, ab.short_runs)  # skips untargeted slots
        runs = [r for r in runs if r[2] - r[1] > LORA_ROWS_MAX]
    for slot, a, b in runs:
        At, Bt = m.weights(slot, x.dtype)
        rows = y[a:b]  # a view: the addmm_ writes the run's rows in place
        rows.addmm_(x[a:b] @ At, Bt, alpha=m.scales[slot])
        if m.has_bias[slot]:
            rows += m.bias[slot]
    return y


def _delta_gather(m: LoraSlots, x: torch.Tensor, ab: AdapterBatch) -> torch.Tensor:
    rows, slots = ab.adapter_rows, ab.adapter_row_slots  # [n], [n]
    out = x.new_zeros(x.shape[0], m.out_features)
    A, Bt = m.A[slots].to(x.dtype), m.Bt[slots].to(x.dtype)  # [n, r, in], [n, r, out] (bf16 slots widened)
    xa = torch.bmm(A, x[rows][:, :, None])  # [n, r, in] @ [n, in, 1] -> [n, r, 1]
    d = torch.bmm(xa.transpose(1, 2), Bt)[:, 0]  # [n, 1, r] @ [n, r, out] -> [n, out]
    out[rows] = d * m.scale[slots][:, None] + m.bias[slots]
    return out


def lora_delta_reference(m: LoraSlots, x: torch.Tensor, token_slots: torch.Tensor) -> torch.Tensor:
    """The plain per-token loop that defines `lora_delta`."""
    out = x.new_zeros(x.shape[0], m.out_features)
    for t in range(x.shape[0]):
        s = int(token_slots[t])
        A, Bt = m.A[s].to(x.dtype), m.Bt[s].to(x.dtype)  # bf16 slots: widened, exact
        out[t] = m.scale[s] * (Bt.T @ (A @ x[t])) + m.bias[s]  # bias is stored pre-scaled
    return out
