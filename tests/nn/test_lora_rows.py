"""The few-row LoRA loop (csrc/lora_rows.cpp) against the plain per-token reference."""
from __future__ import annotations

import pytest
import torch

from runtime.nn import native
from runtime.nn.adapter_batch import AdapterBatch
from runtime.nn.lora import LORA_ROWS_MAX, LoraSlots, lora_delta, lora_delta_reference

pytestmark = pytest.mark.skipif(native.extension() is None, reason="the C++ extension is not built")


def slots(in_f: int, out_f: int, rank: int, bias: bool, seed: int) -> LoraSlots:
    g = torch.Generator().manual_seed(seed)
    m = LoraSlots(in_f, out_f, 3, 16, torch.float32)
    # LoRA-sized weights (trained adapters are small): deltas of order one, like real ones
    m.set_slot(1, torch.randn(rank, in_f, generator=g) * in_f ** -0.5,
               torch.randn(out_f, rank, generator=g) * 0.1,
               scale=16 / rank ** 0.5, bias=torch.randn(out_f, generator=g) if bias else None)
    return m


@pytest.mark.parametrize("in_f, out_f", [(576, 192), (1536, 576), (64, 3072), (7, 5)])
@pytest.mark.parametrize("rank", [1, 8, 16])
@pytest.mark.parametrize("rows", [1, 3, LORA_ROWS_MAX])
@pytest.mark.parametrize("bias", [False, True])
def test_rows_equal_the_reference(in_f, out_f, rank, rows, bias):
    m = slots(in_f, out_f, rank, bias, seed=in_f + rank + rows)
    x = torch.randn(rows, in_f, generator=torch.Generator().manual_seed(rows))
    y = torch.randn(rows, out_f)
    At, Bt = m.weights(1)
    got = native.lora_rows_kernel()[0](y, x, At.T, Bt, m.scales[1], m.bias[1] if bias else None)
    ref = y + lora_delta_reference(m, x, torch.full((rows,), 1))
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-5)


def test_in_place_on_a_view_with_a_row_stride():
    m = slots(64, 48, 8, True, seed=1)
    x = torch.randn(5, 64)
    wide = torch.randn(5, 100)  # y is a column slice: rows contiguous, row stride 100
    y = wide[:, 20:68]
    expected = y + lora_delta_reference(m, x, torch.full((5,), 1))
    untouched = wide[:, :20].clone()
    At, Bt = m.weights(1)
    native.lora_rows_kernel()[1](y, x, At.T, Bt, m.scales[1], m.bias[1])
    torch.testing.assert_close(wide[:, 20:68], expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(wide[:, :20], untouched)


def test_the_runs_path_takes_it_for_short_runs_only_and_both_equal_the_reference():
    m = slots(96, 64, 4, True, seed=2)
    for rows in (2, LORA_ROWS_MAX + 3):  # the loop, then the matmuls
        x = torch.randn(rows, 96)
        ab = AdapterBatch.build([1], [rows], 3, lora_slots={1})
        torch.testing.assert_close(lora_delta(m, x, ab), lora_delta_reference(m, x, ab.token_slots),
                                   atol=1e-4, rtol=1e-5)


def test_gradients_still_flow_through_the_matmuls():
    m = slots(32, 16, 4, False, seed=3)
    x = torch.randn(2, 32, requires_grad=True)  # prompt tuning trains through the projections
    ab = AdapterBatch.build([1], [2], 3, lora_slots={1})
    delta = lora_delta(m, x, ab)
    assert delta.grad_fn is not None
    delta.sum().backward()
    At, Bt = m.weights(1)
    torch.testing.assert_close(x.grad, (m.scales[1] * At @ Bt).sum(1).expand(2, -1))


def test_shape_errors_are_errors():
    k = native.lora_rows_kernel()[0]
    with pytest.raises(RuntimeError, match="shapes"):
        k(torch.zeros(2, 8), torch.zeros(2, 4), torch.zeros(3, 5), torch.zeros(3, 8), 1.0, None)
    with pytest.raises(RuntimeError, match="contiguous rows"):
        k(torch.zeros(2, 8), torch.zeros(4, 2).T, torch.zeros(3, 4), torch.zeros(3, 8), 1.0, None)


def many_slots(in_f: int, out_f: int, ranks: list[int], seed: int, max_rank: int = 16) -> LoraSlots:
    """One slot per rank (0: an empty slot, which the pass must skip), every odd slot biased."""
    g = torch.Generator().manual_seed(seed)
    m = LoraSlots(in_f, out_f, len(ranks), max_rank, torch.float32)
    for s, r in enumerate(ranks):
        if r:
            m.set_slot(s, torch.randn(r, in_f, generator=g) * in_f ** -0.5, torch.randn(out_f, r, generator=g) * 0.1,
                       scale=8 / r, bias=torch.randn(out_f, generator=g) if s % 2 else None)
    return m


@pytest.mark.parametrize("in_f, out_f, ranks", [
    (576, 192, [16] * 64),                  # a 64-adapter decode step: over the parallel threshold
    (1536, 576, [16, 8, 0, 1, 16, 4] * 4),  # mixed ranks and empty slots
    (24, 40, [3, 0, 5]),                    # tiny: one thread
    (7, 5, [2, 2]),                         # shapes not a multiple of the vector width
])
def test_runs_pass_equals_the_reference(in_f, out_f, ranks):
    """Every short run of a step (1..8 rows, slots in any order, base rows between) in one
    pass, in place, against the per-token loop; rows outside the runs are left alone."""
    m = many_slots(in_f, out_f, ranks, seed=in_f)
    g = torch.Generator().manual_seed(out_f)
    none = len(ranks)
    order = torch.randperm(len(ranks), generator=g).tolist()
    row_slots, lens = [], []
    for i, s in enumerate(order):
        row_slots += [s, none] if i % 3 == 0 else [s]
        lens += [1 + (i * 5) % LORA_ROWS_MAX, 2] if i % 3 == 0 else [1 + (i * 5) % LORA_ROWS_MAX]
    ab = AdapterBatch.build(row_slots, lens, none, lora_slots={s for s, r in enumerate(ranks) if r})
    assert ab.path == "runs" and len(ab.short_runs) == len(ab.runs)
    x = torch.randn(sum(lens), in_f, generator=g)
    y = torch.randn(sum(lens), out_f, generator=g)
    expected = y + lora_delta_reference(m, x, ab.token_slots)
    got = y.clone()
    native.lora_rows_kernel()[2](got, x, m.A, m.Bt, m.bias, m.slot_meta, ab.short_runs)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(lora_delta(m, x, ab), expected - y, atol=1e-4, rtol=1e-5)


def test_runs_pass_refuses_what_it_does_not_compute():
    m = many_slots(16, 8, [4, 4], seed=5)
    k = native.lora_rows_kernel()[2]
    x, y = torch.zeros(12, 16), torch.zeros(12, 8)
    with pytest.raises(RuntimeError, match="longer than 8 rows"):
        k(y, x, m.A, m.Bt, m.bias, m.slot_meta, torch.tensor([[0, 0, 9]]))
    with pytest.raises(RuntimeError, match="outside the batch"):
        k(y, x, m.A, m.Bt, m.bias, m.slot_meta, torch.tensor([[0, 10, 13]]))
    with pytest.raises(RuntimeError, match="outside the batch"):
        k(y, x, m.A, m.Bt, m.bias, m.slot_meta, torch.tensor([[7, 0, 1]]))  # no such slot
    with pytest.raises(RuntimeError, match="shapes disagree"):
        k(torch.zeros(12, 9), x, m.A, m.Bt, m.bias, m.slot_meta, torch.tensor([[0, 0, 1]]))
    with pytest.raises(RuntimeError, match=r"\[n, 3\] int64"):
        k(y, x, m.A, m.Bt, m.bias, m.slot_meta, torch.tensor([[0, 0, 1]], dtype=torch.int32))
    assert torch.equal(y, torch.zeros(12, 8))  # nothing written by a refused call
