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


#: the CPU's own choice, and the choice of a CPU without native bf16 (AVX2: Quiver's int8
#: kernel up to INT8_MAX_ROWS rows, exact above), which any CPU with the extension runs
NATIVE_BF16 = [None, False]


@pytest.mark.parametrize("native_bf16", NATIVE_BF16)
@pytest.mark.parametrize("rows", [1, 2, INT8_MAX_ROWS, INT8_MAX_ROWS + 1, 33])
def test_approximate_head_keeps_the_top_candidates_exact(rows, native_bf16):
    """int8 (few rows) or bf16 (more): the argmax and the best logits are the fp32 ones; the
    rest of the vocabulary is close."""
    h = head(seed=rows)
    h.use(approximate=True, native_bf16=native_bf16)
    x = torch.randn(rows, 96)
    got, ref = h(x), h.reference(x)
    assert torch.equal(got.argmax(-1), ref.argmax(-1))
    top = ref.topk(8, dim=-1).indices
    # the best ones at fp32 accuracy (another summation order: last-bit differences only)
    assert (got.gather(-1, top) - ref.gather(-1, top)).abs().max() <= 1e-5
    assert (got - ref).abs().max() <= 0.02 * ref.abs().max()


@pytest.mark.parametrize("native_bf16", NATIVE_BF16)
def test_near_ties_follow_the_exact_logits(native_bf16):
    """Two tokens 1e-4 apart: an approximate matmul alone may swap them; the head never does."""
    h = head(vocab=512, hidden=64)
    x = torch.randn(1, 64)
    unit = x[0] / x[0].norm() ** 2  # w @ x == 1 for w == unit
    h.weight[3] = 3.0 * unit  # the clear favourites: logit 3.0 ...
    h.weight[7] = 3.0001 * unit  # ... and 3.0001, inside bf16's and int8's rounding
    h.use(approximate=True, native_bf16=native_bf16)
    assert int(h(x).argmax()) == int(h.reference(x).argmax()) == 7
    assert EXACT_TOP >= 2


def _fused_refine():
    from runtime.nn.native import lm_head_refine_kernel

    kernel = lm_head_refine_kernel()
    if kernel is None:
        pytest.skip("no C++ extension here (the torch refine serves)")
    return kernel


def assert_refined(got, approx, x, weight, k):
    """got is `approx` (bf16 logits) as fp32 with each row's k largest made exact: entries
    above a row's k-th largest approximate value are exact, entries below it are the
    approximate value, and of those equal to it (bf16 ties are common) some k in all are
    exact. Exact: the fp32 product, to fp32 accuracy (another summation order)."""
    a = approx.float()
    exact = x @ weight.T  # [n, V]
    kth = a.topk(min(k, a.shape[1]), dim=-1).values[:, -1:]  # [n, 1]
    is_exact = (got - exact).abs() <= 1e-5 * exact.abs() + 1e-6
    is_approx = got == a
    assert (is_exact | is_approx).all()
    assert is_exact[a > kth].all()
    assert is_approx[a < kth].all()
    made_exact = (got != a) | ((a >= kth) & is_exact)
    assert (made_exact.sum(-1) >= min(k, a.shape[1])).all()


@pytest.mark.parametrize("rows,vocab,k", [(1, 4096, EXACT_TOP), (7, 4099, EXACT_TOP), (64, 1000, 5),
                                          (3, 20, 32)])
def test_fused_refine_makes_the_top_candidates_exact(rows, vocab, k):
    """csrc/lm_head.cpp: the k best entries exact, every other the approximate logit as fp32;
    odd vocabularies (a vector tail), k above the vocabulary; and LmHead.refine (its torch
    form) meets the same contract."""
    kernel = _fused_refine()
    g = torch.Generator().manual_seed(rows)
    h = LmHead(torch.randn(vocab, 96, generator=g) * 0.05)
    x = torch.randn(rows, 96, generator=g)
    approx = torch.nn.functional.linear(x.bfloat16(), h.weight.bfloat16())
    assert_refined(kernel(approx, x, h.weight, k), approx, x, h.weight, k)
    if k == EXACT_TOP:
        assert_refined(h.refine(x, approx.float()), approx, x, h.weight, k)


def test_fused_refine_is_what_the_head_runs_on_cpu():
    """The approximate head on CPU takes the fused pass: over bf16 rows (a CPU with native bf16)
    and over the int8 kernel's rows (one without)."""
    from runtime.nn.native import lm_head_int8_kernel

    _fused_refine()
    h = head(vocab=2048)
    h.use(approximate=True, native_bf16=True)
    assert h._fused_refine is not None
    x = torch.randn(INT8_MAX_ROWS + 3, 96)
    approx = torch.nn.functional.linear(x.bfloat16(), h.bf16)
    assert_refined(h(x), approx, x, h.weight, EXACT_TOP)
    h.use(approximate=True, native_bf16=False)
    assert h._fused_refine is not None
    x = torch.randn(INT8_MAX_ROWS, 96)
    assert_refined(h(x), lm_head_int8_kernel()(x, h.int8, h.int8_scale), x, h.weight, EXACT_TOP)


def test_fused_refine_refuses_bad_shapes():
    kernel = _fused_refine()
    w = torch.randn(100, 16)
    with pytest.raises(RuntimeError, match="bf16"):
        kernel(torch.randn(2, 100), torch.randn(2, 16), w, 4)
    with pytest.raises(RuntimeError, match="W must be"):
        kernel(torch.randn(2, 100).bfloat16(), torch.randn(2, 16), torch.randn(99, 16), 4)


def test_without_native_bf16_the_head_is_int8_on_few_rows_and_exact_above():
    """Quiver's int8 kernel (csrc/lm_head.cpp): the int8 weight's fp32 products, scaled and
    rounded to bf16 as torch's int8pack kernel rounds them; no bf16 copy is made."""
    from runtime.nn.native import lm_head_int8_kernel

    kernel = lm_head_int8_kernel()
    if kernel is None:
        pytest.skip("no C++ extension here")
    h = head(vocab=1000, hidden=100)  # a hidden size not a multiple of the kernel's 8 lanes
    assert h.use(approximate=True, native_bf16=False) == f"int8 up to {INT8_MAX_ROWS} rows, else float32; " \
                                                         f"top {EXACT_TOP} exact"
    assert h.bf16 is None and h.copy_bytes() == 1000 * 100 + 2 * 1000
    for rows in range(1, INT8_MAX_ROWS + 1):
        x = torch.randn(rows, 100)
        want = (x @ h.int8.float().T) * h.int8_scale.float()
        got = kernel(x, h.int8, h.int8_scale)
        assert got.dtype == torch.bfloat16
        assert (got.float() - want).abs().max() <= 2 ** -7 * want.abs().max()  # bf16's rounding
    x = torch.randn(INT8_MAX_ROWS + 1, 100)
    assert torch.equal(h(x), h.reference(x))  # more rows: the exact matmul
    with pytest.raises(RuntimeError, match="at most"):
        kernel(x, h.int8, h.int8_scale)
