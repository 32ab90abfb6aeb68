"""runtime/nn/lm_head.py: the fast output projection against the plain fp32 matmul."""
from __future__ import annotations

import pytest
import torch

from runtime.nn.lm_head import EXACT_TOP, INT8_MAX_ROWS, LmHead


def head(vocab=4096, hidden=96, seed=0) -> LmHead:
    g = torch.Generator().manual_seed(seed)
    return LmHead(torch.randn(vocab, hidden, generator=g) * 0.05)


def test_exact_mode_is_the_plain_matmul():
    h = head()
    assert h.use(approximate=False) == "float32"
    x = torch.randn(5, 96)
    assert torch.equal(h(x), h.reference(x))


@pytest.mark.parametrize("rows", [1, 2, INT8_MAX_ROWS, INT8_MAX_ROWS + 1, 33])
def test_approximate_head_keeps_the_top_candidates_exact(rows):
    """int8 (few rows) or bf16 (more): the argmax and the best logits are the fp32 ones; the
    rest of the vocabulary is close."""
    h = head(seed=rows)
    h.use(approximate=True)
    x = torch.randn(rows, 96)
    got, ref = h(x), h.reference(x)
    assert torch.equal(got.argmax(-1), ref.argmax(-1))
    top = ref.topk(8, dim=-1).indices
    # the best ones at fp32 accuracy (another summation order: last-bit differences only)
    assert (got.gather(-1, top) - ref.gather(-1, top)).abs().max() <= 1e-5
    assert (got - ref).abs().max() <= 0.02 * ref.abs().max()


def test_near_ties_follow_the_exact_logits():
    """Two tokens 1e-4 apart: an approximate matmul alone may swap them; the head never does."""
    h = head(vocab=512, hidden=64)
    x = torch.randn(1, 64)
    unit = x[0] / x[0].norm() ** 2  # w @ x == 1 for w == unit
    h.weight[3] = 3.0 * unit  # the clear favourites: logit 3.0 ...
    h.weight[7] = 3.0001 * unit  # ... and 3.0001, inside bf16's and int8's rounding
    h.use(approximate=True)
    assert int(h(x).argmax()) == int(h.reference(x).argmax()) == 7
    assert EXACT_TOP >= 2
