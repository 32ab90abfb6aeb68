"""Gradient clipping and the optimizer step a chunk of parameters at a time, a pause between chunks.

A LoRA adapter on every projection of the embedded 30-layer model is 420 small tensors. torch's
AdamW on CPU updates them one after the other (its for-loop implementation: the foreach kernels
are for accelerators) and `clip_grad_norm_` takes one norm per tensor: measured on one core,
~14 ms and ~4 ms, each a stretch in which a fine-tuning job inside the server could not hand the
engine thread back (runtime/training/pieces.py). Both are per-tensor work joined by at most one
scalar (clipping's total norm), so both split exactly:

    clip   for chunk: norms += [||g|| for g in chunk]          (pause)
           total = ||stack(norms)||
           for chunk: g *= min(1, max_norm / (total + 1e-6))  (pause)
    step   for chunk: optimizer.step() with its param groups narrowed to the chunk   (pause)

`clip_grad_norm_in_chunks` issues the very ops torch 2.13's `clip_grad_norm_` issues (per device
and dtype group: `_foreach_norm` where foreach is supported, else `linalg.vector_norm` per
tensor; the norm of the stacked norms; `clip_grads_with_norm_`), so it gives torch's bits. Every
optimizer `make_optimizer` builds (torch's AdamW, bitsandbytes' 8-bit and paged ones) updates each
parameter from its own gradient and state alone, so a step narrowed to a chunk at a time is the
whole step bit for bit; the state stays keyed by the parameters and the groups are restored
after each chunk, so `state_dict()` (a checkpoint's optimizer state) has the format it always had.
tests/trainer/test_optim.py checks all three.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype, _has_foreach_support

#: a chunk: at most this many tensors (per-tensor dispatch, ~35 us each for AdamW on one core) ...
CHUNK_TENSORS = 32
#: ... and at most this many elements (AdamW reads and writes ~5 fp32 tensors per element)
CHUNK_ELEMENTS = 1 << 19


def _no_pause() -> None:
    pass


def chunks(tensors: Sequence[torch.Tensor], max_tensors: int = CHUNK_TENSORS,
           max_elements: int = CHUNK_ELEMENTS) -> list[list[torch.Tensor]]:
    """Consecutive runs of `tensors`, each within both limits (a larger tensor alone)."""
    out: list[list[torch.Tensor]] = []
    size = 0
    for t in tensors:
        if not out or len(out[-1]) >= max_tensors or (out[-1] and size + t.numel() > max_elements):
            out.append([])
            size = 0
        out[-1].append(t)
        size += t.numel()
    return out


@torch.no_grad()
def clip_grad_norm_in_chunks(params: Sequence[torch.Tensor], max_norm: float, norm_type: float = 2.0,
                             pause: Callable[[], None] = _no_pause) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type)`, bit for bit, with `pause()`
    after each chunk; returns the total norm."""
    params = list(params)
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    norm_type = float(norm_type)
    norms: list[torch.Tensor] = []
    for (device, _), ([group], _) in _group_tensors_by_device_and_dtype([grads]).items():
        foreach = _has_foreach_support(group, device)
        for chunk in chunks(group):
            norms.extend(torch._foreach_norm(chunk, norm_type) if foreach
                         else [torch.linalg.vector_norm(g, norm_type) for g in chunk])
            pause()
    first_device = grads[0].device
    total = torch.linalg.vector_norm(torch.stack([n.to(first_device) for n in norms]), norm_type)
    for chunk in chunks([p for p in params if p.grad is not None]):
        torch.nn.utils.clip_grads_with_norm_(chunk, max_norm, total)
        pause()
    return total


def step_in_chunks(optimizer: torch.optim.Optimizer, pause: Callable[[], None] = _no_pause) -> None:
    """`optimizer.step()`, a chunk of each group's parameters at a time, `pause()` after each."""
    groups = optimizer.param_groups
    full = [g["params"] for g in groups]
    try:
        for i, group in enumerate(groups):
            for chunk in chunks([p for p in full[i] if p.grad is not None]):
                for g in groups:
                    g["params"] = []
                group["params"] = chunk
                optimizer.step()
                _restore(groups, full)
                pause()
    finally:
        _restore(groups, full)


def _restore(groups: list[dict], full: list[list]) -> None:
    for g, params in zip(groups, full):
        g["params"] = params
