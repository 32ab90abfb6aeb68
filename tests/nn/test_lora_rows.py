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
