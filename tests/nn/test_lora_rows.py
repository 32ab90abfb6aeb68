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
    got = native.lora_rows_kernel()(y, x, At.T, Bt, m.scales[1], m.bias[1] if bias else None)
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
    native.op("lora_rows_")(y, x, At.T, Bt, m.scales[1], m.bias[1])
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
    k = native.lora_rows_kernel()
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
    native.lora_runs_kernel()(got, x, m.A, m.Bt, m.bias, m.slot_meta, ab.short_runs)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(lora_delta(m, x, ab), expected - y, atol=1e-4, rtol=1e-5)


def test_runs_pass_refuses_what_it_does_not_compute():
    m = many_slots(16, 8, [4, 4], seed=5)
    k = native.lora_runs_kernel()
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


# ---- bf16 slot storage (`--adapter-dtype bfloat16`) -------------------------------------------
def bf16_twin(m: LoraSlots) -> tuple[LoraSlots, LoraSlots]:
    """(fp32 slots, bf16 slots) holding the same bf16-representable weights (m's, rounded)."""
    out = []
    for wdt in (torch.float32, torch.bfloat16):
        t = LoraSlots(m.A.shape[2], m.out_features, m.num_slots, m.max_rank, torch.float32, weight_dtype=wdt)
        for s, r in enumerate(m.ranks):
            if r:
                t.set_slot(s, m.A[s, :r].bfloat16().float(), m.Bt[s, :r].T.bfloat16().float(),
                           scale=m.scales[s], bias=m.bias[s] / m.scales[s] if m.has_bias[s] else None)
        out.append(t)
    assert out[1].A.dtype == out[1].Bt.dtype == torch.bfloat16 and out[1].bias.dtype == torch.float32
    return out[0], out[1]


@pytest.mark.parametrize("in_f, out_f, ranks", [(576, 192, [16] * 64), (1536, 576, [16, 8, 0, 1, 4]),
                                                (7, 5, [2, 3])])
def test_bf16_slots_give_the_fp32_bits_for_the_same_weights(in_f, out_f, ranks):
    """The math stays fp32 (bf16 widens exactly): the runs pass, the few-row loop, the matmul
    runs and the gather path over bf16 slots equal the same paths over fp32 slots holding the
    same values: the runs pass and the loop to the bit."""
    f32, b16 = bf16_twin(many_slots(in_f, out_f, ranks, seed=out_f))
    none = len(ranks)
    used = {s for s, r in enumerate(ranks) if r}
    row_slots = sorted(used)
    lens = [1 + s % LORA_ROWS_MAX for s in row_slots]
    g = torch.Generator().manual_seed(in_f)
    x = torch.randn(sum(lens), in_f, generator=g)
    y = torch.randn(sum(lens), out_f, generator=g)
    ab = AdapterBatch.build(row_slots, lens, none, lora_slots=used)
    runs = native.lora_runs_kernel()
    got, want = y.clone(), y.clone()
    runs(got, x, b16.A, b16.Bt, b16.bias, b16.slot_meta, ab.short_runs)
    runs(want, x, f32.A, f32.Bt, f32.bias, f32.slot_meta, ab.short_runs)
    assert torch.equal(got, want)
    s = row_slots[0]
    rows = native.lora_rows_kernel()
    xs, ys = x[:lens[0]], y[:lens[0]]
    assert torch.equal(rows(ys, xs, b16.weights(s)[0].T, b16.weights(s)[1], b16.scales[s], b16.bias[s]),
                       rows(ys, xs, f32.weights(s)[0].T, f32.weights(s)[1], f32.scales[s], f32.bias[s]))
    long = AdapterBatch.build([s], [LORA_ROWS_MAX + 5], none, lora_slots=used)  # the matmul path
    xl = torch.randn(LORA_ROWS_MAX + 5, in_f, generator=g)
    assert torch.equal(lora_delta(b16, xl, long), lora_delta(f32, xl, long))
    for path in ("gather", "runs"):
        ab_p = AdapterBatch.build(row_slots, lens, none, lora_slots=used, force_path=path)
        torch.testing.assert_close(lora_delta(b16, x, ab_p), lora_delta_reference(f32, x, ab_p.token_slots),
                                   atol=1e-4, rtol=1e-5)


def test_bf16_slots_round_each_weight_once_and_nothing_else():
    """Arbitrary fp32 weights in bf16 slots: the delta is the reference's over the rounded
    weights (to fp32 rounding), and within bf16's rounding of the exact fp32 one."""
    m = many_slots(576, 192, [16, 8], seed=9)
    b16 = LoraSlots(576, 192, 2, 16, torch.float32, weight_dtype=torch.bfloat16)
    for s, r in enumerate(m.ranks):
        b16.set_slot(s, m.A[s, :r], m.Bt[s, :r].T, scale=m.scales[s], bias=m.bias[s] / m.scales[s] if m.has_bias[s] else None)
    rounded, _ = bf16_twin(m)  # fp32 slots holding the rounded weights
    x = torch.randn(6, 576, generator=torch.Generator().manual_seed(4))
    ab = AdapterBatch.build([0, 1], [3, 3], 2, lora_slots={0, 1})
    got = lora_delta(b16, x, ab)
    torch.testing.assert_close(got, lora_delta_reference(rounded, x, ab.token_slots), atol=1e-5, rtol=1e-5)
    exact = lora_delta_reference(m, x, ab.token_slots)
    assert not torch.equal(got, exact)  # the rounding is real...
    torch.testing.assert_close(got, exact, atol=3e-2 * exact.abs().max().item(), rtol=0)  # ...and small
