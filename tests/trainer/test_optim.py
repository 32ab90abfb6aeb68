"""Clipping and the optimizer step a chunk of parameters at a time (trainer/optim.py): torch's
clip_grad_norm_ and a whole optimizer step, bit for bit, and the optimizer's state_dict as ever."""
from __future__ import annotations

import pytest
import torch

from trainer import optim as O


@pytest.mark.parametrize("sizes, max_tensors, max_elements, runs", [
    ([1] * 5, 2, 100, [2, 2, 1]),             # the tensor count decides
    ([40, 40, 40, 10], 10, 100, [2, 2]),      # the element count decides
    ([500, 3, 3], 10, 100, [1, 2]),           # a tensor over the limit goes alone
    ([3, 500, 3], 10, 100, [1, 1, 1]),
    ([], 10, 100, []),
])
def test_chunks_are_consecutive_runs_within_both_limits(sizes, max_tensors, max_elements, runs):
    tensors = [torch.empty(n) for n in sizes]
    out = O.chunks(tensors, max_tensors, max_elements)
    assert [len(c) for c in out] == runs
    assert [t for c in out for t in c] == tensors


def _params(seed: int = 0, dtypes=(torch.float32,)) -> list[torch.nn.Parameter]:
    """~420 LoRA-like tensors (A [16, in], B [out, 16]), a few without a gradient."""
    g = torch.Generator().manual_seed(seed)
    params = []
    for i in range(210):
        dtype = dtypes[i % len(dtypes)]
        for shape in ((16, 64), (96 if i % 7 > 3 else 32, 16)):
            p = torch.nn.Parameter(torch.randn(shape, generator=g).to(dtype))
            if i % 50 != 3:
                p.grad = torch.randn(shape, generator=g).to(dtype)
            params.append(p)
    return params


@pytest.mark.parametrize("max_norm", [0.5, 1e6])  # clipped, and not
@pytest.mark.parametrize("norm_type", [2.0, 1.0, float("inf")])
@pytest.mark.parametrize("dtypes", [(torch.float32,), (torch.float32, torch.float64)])
def test_clipping_in_chunks_is_torchs_clip_grad_norm_bit_for_bit(max_norm, norm_type, dtypes):
    ref, mine = _params(dtypes=dtypes), _params(dtypes=dtypes)
    total_ref = torch.nn.utils.clip_grad_norm_(ref, max_norm, norm_type)
    pauses = []
    total = O.clip_grad_norm_in_chunks(mine, max_norm, norm_type, pause=lambda: pauses.append(1))
    assert torch.equal(total, total_ref)
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(ref, mine) if a.grad is not None)
    assert len(pauses) >= 2 * (len(mine) // O.CHUNK_TENSORS)


def _optimizer(kind: str, params):
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    import bitsandbytes as bnb

    return bnb.optim.AdamW8bit(params, lr=1e-2, weight_decay=0.1, min_8bit_size=1024)


@pytest.mark.parametrize("kind", ["adamw", "adamw8bit"])
def test_a_step_in_chunks_is_the_whole_step_and_its_state_dict_the_same(kind):
    ref, mine = _params(seed=1), _params(seed=1)
    opt_ref, opt = _optimizer(kind, ref), _optimizer(kind, mine)
    groups = opt.param_groups[0]["params"]
    g = torch.Generator().manual_seed(2)
    pauses = []
    for step in range(3):
        opt_ref.step()
        O.step_in_chunks(opt, lambda: pauses.append(1))
        for a, b in zip(ref, mine):
            assert torch.equal(a, b), step
            if a.grad is not None:
                a.grad = b.grad = torch.randn(a.shape, generator=g)
    assert opt.param_groups[0]["params"] is groups  # the groups as they were
    assert len(pauses) == 3 * len(O.chunks([p for p in mine if p.grad is not None]))
    sd_ref, sd = opt_ref.state_dict(), opt.state_dict()
    assert sd["param_groups"] == sd_ref["param_groups"] and sd["state"].keys() == sd_ref["state"].keys()
    for i, s in sd_ref["state"].items():
        assert s.keys() == sd["state"][i].keys()
        assert all(_same(v, sd["state"][i][k]) for k, v in s.items()), i
    resumed = _optimizer(kind, _params(seed=1))  # a checkpoint's state loads into a fresh optimizer
    resumed.load_state_dict(sd)


def _same(a, b) -> bool:
    """Equal values, tensors bit for bit, through dicts (bitsandbytes keeps its state in one)."""
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b
