"""Batched multi-adapter LoRA fast paths vs the plain per-token reference loop (property tests)."""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.nn import native
from runtime.nn.adapter_batch import AdapterBatch, prefer_gather
from runtime.nn.lora import LoraSlots, lora_delta, lora_delta_reference

IN, OUT, SLOTS, MAX_R = 24, 40, 6, 8


def filled_slots(seed: int, ranks: list[int], dora: list[bool]) -> LoraSlots:
    g = torch.Generator().manual_seed(seed)
    m = LoraSlots(IN, OUT, SLOTS, MAX_R, torch.float32)
    for s, r in enumerate(ranks):
        if r == 0:
            continue
        m.set_slot(s, torch.randn(r, IN, generator=g), torch.randn(OUT, r, generator=g),
                   scale=float(torch.rand(1, generator=g)) * 2,
                   bias=torch.randn(OUT, generator=g) if s % 2 else None,
                   dora=(torch.rand(OUT, generator=g) + 0.5) if dora[s] else None)
    return m


def _fp32_atol(ref: torch.Tensor) -> float:
    """fp32 rounding of sums whose terms reach the output's scale: 1e-6 of its largest value (an
    element near zero next to ones near 90, seed 10000, differs by 1.4e-5 between bmm and a
    matrix-vector product), and never below 1e-5."""
    return max(1e-5, 1e-6 * ref.abs().max().item())


batches = st.fixed_dictionaries({
    "seed": st.integers(0, 10_000),
    "ranks": st.lists(st.integers(0, MAX_R), min_size=SLOTS, max_size=SLOTS),
    "dora": st.lists(st.booleans(), min_size=SLOTS, max_size=SLOTS),
    "rows": st.lists(st.tuples(st.integers(-1, SLOTS - 1), st.integers(1, 9)), min_size=1, max_size=24),
})


@settings(max_examples=60, deadline=None)
@given(batches)
def test_delta_fast_paths_equal_reference(case):
    m = filled_slots(case["seed"], case["ranks"], case["dora"])
    row_slots = [SLOTS if s < 0 else s for s, _ in case["rows"]]
    lens = [n for _, n in case["rows"]]
    x = torch.randn(sum(lens), IN, generator=torch.Generator().manual_seed(case["seed"] + 1))
    lora = {s for s, r in enumerate(case["ranks"]) if r > 0}
    ref = None
    for path in ("runs", "gather"):
        ab = AdapterBatch.build(row_slots, lens, SLOTS, lora_slots=lora, force_path=path)
        got = lora_delta(m, x, ab)
        if ref is None:
            ref = lora_delta_reference(m, x, ab.token_slots)
        assert torch.allclose(got, ref, atol=_fp32_atol(ref), rtol=1e-5), path


@settings(max_examples=30, deadline=None)
@given(batches)
def test_dora_combination_equals_reference(case):
    """y = base + (f - 1) * (base - b0) + f * delta, per token with its own slot's f."""
    m = filled_slots(case["seed"], case["ranks"], case["dora"])
    row_slots = [SLOTS if s < 0 else s for s, _ in case["rows"]]
    lens = [n for _, n in case["rows"]]
    g = torch.Generator().manual_seed(case["seed"] + 2)
    x = torch.randn(sum(lens), IN, generator=g)
    y, b0 = torch.randn(sum(lens), OUT, generator=g), torch.randn(OUT, generator=g)
    lora = {s for s, r in enumerate(case["ranks"]) if r > 0}
    dora = {s for s in lora if case["dora"][s]}
    ab = AdapterBatch.build(row_slots, lens, SLOTS, lora_slots=lora, dora_slots=dora)
    got = m(x, y, ab, b0)
    delta = lora_delta_reference(m, x, ab.token_slots)
    expected = torch.empty_like(y)
    for t in range(len(x)):
        s = int(ab.token_slots[t])
        f = m.dora[s] if s in dora else torch.ones(OUT)
        expected[t] = y[t] + ((f - 1) * (y[t] - b0) + f * delta[t])
    assert torch.allclose(got, expected, atol=_fp32_atol(expected), rtol=1e-5)


def test_zero_slot_and_untargeted_rows_add_nothing():
    m = filled_slots(0, [4, 0, 2, 8, 1, 3], [False] * SLOTS)
    x = torch.randn(5, IN)
    ab = AdapterBatch.build([SLOTS, 1], [3, 2], SLOTS, lora_slots={0, 2, 3, 4, 5})
    assert not ab.has_lora
    assert torch.equal(lora_delta(m, x, ab), torch.zeros(5, OUT))


def test_reset_slot_is_a_no_op_slot():
    m = filled_slots(1, [4] * SLOTS, [True] * SLOTS)
    m.reset_slot(3)
    x = torch.randn(4, IN)
    ab = AdapterBatch.build([3], [4], SLOTS, lora_slots={3}, dora_slots={3})
    y = torch.randn(4, OUT)
    assert torch.equal(m(x, y, ab, None), y)


def test_runs_merge_neighbouring_rows_of_one_slot():
    """Consecutive rows of one slot make one run; base rows and untargeted slots make none."""
    ab = AdapterBatch.build([2, 2, SLOTS, 2, 1, 1, 4], [3, 1, 2, 1, 1, 1, 2], SLOTS, lora_slots={1, 2})
    assert ab.runs == [(2, 0, 4), (2, 6, 7), (1, 7, 9)]


def test_one_run_over_every_token_equals_reference():
    """The training / single-adapter shortcut (no scatter) against the per-token loop."""
    m = filled_slots(3, [4, 8, 2, 0, 1, 5], [False] * SLOTS)
    for slot in (0, 1):  # without and with a LoRA bias
        ab = AdapterBatch.build([slot, slot], [5, 3], SLOTS, lora_slots={slot})
        assert ab.runs == [(slot, 0, 8)] and not ab.use_gather
        x = torch.randn(8, IN)
        assert torch.allclose(lora_delta(m, x, ab), lora_delta_reference(m, x, ab.token_slots),
                              atol=1e-5, rtol=1e-5)


def test_path_choice():
    """CPU fp32 with the C++ runs pass: runs, whatever the mix; CUDA, and CPU without the pass
    (a bf16 step), gather many single-token runs."""
    prefill = AdapterBatch.build([0, 1], [50, 40], SLOTS, lora_slots={0, 1})
    decode = AdapterBatch.build(list(range(SLOTS)), [1] * SLOTS, SLOTS, lora_slots=set(range(SLOTS)))
    expected = "runs" if native.lora_runs_kernel() is not None else "gather"
    assert (prefill.path, decode.path) == ("runs", expected)
    assert decode.short_runs.tolist() == [[s, s, s + 1] for s in range(SLOTS)]
    assert prefill.short_runs.shape == (0, 3)  # prompt chunks: the matmuls
    bf16 = AdapterBatch.build(list(range(SLOTS)), [1] * SLOTS, SLOTS, lora_slots=set(range(SLOTS)),
                              dtype=torch.bfloat16)
    assert bf16.path == "gather"
    assert prefer_gather(num_runs=SLOTS, num_tokens=SLOTS, device_type="cuda")
    assert not prefer_gather(num_runs=2, num_tokens=90, device_type="cuda")
    assert not prefer_gather(num_runs=SLOTS, num_tokens=SLOTS, device_type="cpu")
    assert prefer_gather(num_runs=SLOTS, num_tokens=SLOTS, device_type="cpu", runs_kernel=False)


def test_moved_module_uses_its_new_storage():
    """.to() replaces the slot tensors; the cached per-slot views must follow them."""
    m = filled_slots(4, [4, 8, 2, 3, 1, 5], [False] * SLOTS).double()
    with torch.no_grad():
        m.A[2].mul_(3)  # written after the move: a stale view would miss it
    ab = AdapterBatch.build([2, 0, 2], [2, 3, 1], SLOTS, lora_slots={0, 2})
    x = torch.randn(6, IN, dtype=torch.float64)
    got = lora_delta(m, x, ab)
    assert got.dtype == torch.float64
    assert torch.allclose(got, lora_delta_reference(m, x, ab.token_slots), atol=1e-9, rtol=1e-9)


def test_swap_lora_is_setattr_without_the_checks():
    """AdaptedLinear.swap_lora (a training slice's attach / detach) leaves the module exactly as
    `lin.lora = slots` would: registered, found by named_modules and .to(), forward using it."""
    from runtime.nn.model import AdaptedLinear

    lin = AdaptedLinear(torch.nn.Linear(IN, OUT))
    a, b = LoraSlots(IN, OUT, SLOTS, MAX_R, torch.float32), LoraSlots(IN, OUT, SLOTS, MAX_R, torch.float32)
    assert lin.swap_lora(a) is None and lin.lora is a  # never had slots: a plain None before
    assert lin.swap_lora(b) is a and lin.lora is b
    assert dict(lin.named_modules())["lora"] is b and "lora" not in lin.__dict__
    assert lin.swap_lora(None) is b and lin.lora is None and "lora" not in dict(lin.named_modules())
    ref = AdaptedLinear(torch.nn.Linear(IN, OUT))
    ref.lora = a
    ref.lora = None  # the same sequence through nn.Module.__setattr__
    assert ref._modules.keys() == lin._modules.keys() and ref.__dict__.keys() == lin.__dict__.keys()
