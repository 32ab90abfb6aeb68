"""The token loss a vocabulary slice at a time (trainer/loss.py): the cross-entropy and its gradient
are F.cross_entropy's up to fp32 rounding, the eval's argmax is torch.argmax's, the slices cover
the vocabulary within their limits, and a pause comes after every slice."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from trainer import loss as L
from trainer.batch import pack
from trainer.data import Example


@pytest.mark.parametrize("rows, vocab, hidden, itemsize, count", [
    (17, 49152, 576, 4, 14),   # the embedded model, few loss rows: the weight bytes decide (113 MB / 8 MiB)
    (256, 49152, 576, 4, 48),  # a full row block: the logits decide (256 x 49152 / 2^18)
    (1, 100, 8, 4, 1),         # tiny: one slice
    (0, 100, 8, 4, 1),         # no loss rows
    (17, 49152, 576, 2, 7),    # a bf16 weight: half the bytes per column
])
def test_vocab_slices_cover_the_vocabulary_within_the_limits(rows, vocab, hidden, itemsize, count):
    weight = torch.empty(vocab, hidden, dtype={4: torch.float32, 2: torch.bfloat16}[itemsize])
    slices = L.vocab_slices(rows, weight)
    assert len(slices) == count
    assert slices[0].start == 0 and slices[-1].stop == vocab
    assert all(a.stop == b.start for a, b in zip(slices, slices[1:]))
    widths = [s.stop - s.start for s in slices]
    assert len(set(widths[:-1])) <= 1 and 0 < widths[-1] <= widths[0]
    if count > 1:  # both limits hold (up to the rounding of equal widths)
        assert max(rows * widths[0] / L.CHUNK_LOGITS, widths[0] * hidden * itemsize / L.CHUNK_WEIGHT_BYTES) <= 1.01


def _case(rows: int, vocab: int = 5000, hidden: int = 64, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, hidden, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g) * 0.2).to(dtype)
    t = torch.randint(0, vocab, (rows,), generator=g)
    if rows >= 4:  # targets on slice edges: the first and last column of the vocabulary and a slice
        cols = L.vocab_slices(min(rows, L.ROW_BLOCK), w)
        t[:4] = torch.tensor([0, vocab - 1, cols[-1].start, cols[0].stop - 1])
    return h, w, t


@pytest.mark.parametrize("rows", [1, 17, 300, 600])  # 300, 600: two and three row blocks
def test_the_loss_and_its_gradient_are_cross_entropys_to_fp32_rounding(rows):
    h, w, t = _case(rows)
    ref = F.cross_entropy(F.linear(h, w).float(), t, reduction="sum")
    (g_ref,) = torch.autograd.grad(ref, h)
    mine = L.cross_entropy_sum(h, w, t)
    (g_mine,) = torch.autograd.grad(mine * 0.25, h)  # the incoming gradient scales it
    torch.testing.assert_close(mine, ref)
    torch.testing.assert_close(g_mine, 0.25 * g_ref)
    if rows <= 17:
        torch.testing.assert_close(L.reference_loss_sum(h.detach(), w, t), ref.detach())


def test_a_bf16_lm_head_is_cross_entropy_of_its_bf16_logits():
    h, w, t = _case(17, dtype=torch.bfloat16)
    ref = F.cross_entropy(F.linear(h, w).float(), t, reduction="sum")
    (g_ref,) = torch.autograd.grad(ref, h)
    mine = L.cross_entropy_sum(h, w, t)
    (g_mine,) = torch.autograd.grad(mine, h)
    assert mine.dtype == torch.float32 and g_mine.dtype == torch.bfloat16
    torch.testing.assert_close(mine, ref, rtol=1e-3, atol=1e-2)
    torch.testing.assert_close(g_mine.float(), g_ref.float(), rtol=2e-2, atol=2e-3)


def test_no_loss_rows_is_a_zero_loss_with_no_gradient():
    h, w, t = _case(0)
    out = L.cross_entropy_sum(h, w, t)
    (g,) = torch.autograd.grad(out, h)
    assert out.item() == 0.0
    assert g.shape == (0, 64)


def test_the_lm_head_weight_must_be_frozen():
    h, w, t = _case(4)
    with pytest.raises(ValueError, match="frozen"):
        L.cross_entropy_sum(h, w.requires_grad_(), t)


def test_the_eval_loss_and_argmax_are_torchs_first_maximum_included():
    h, w, t = _case(300)
    h = h.detach()
    cols = L.vocab_slices(L.ROW_BLOCK, w)
    w[cols[1].start + 3] = w[7]  # a tie across slices: the earlier column is the argmax
    w[cols[-1].start] = w[cols[-1].start + 1]  # a tie within a slice
    logits = F.linear(h, w)
    loss, argmax = L.loss_and_argmax(h, w, t)
    torch.testing.assert_close(loss, F.cross_entropy(logits, t, reduction="sum"))
    assert torch.equal(argmax, logits.argmax(-1))
    h[:2] = w[7] * 50  # rows whose maximum is the tied pair: both the first one
    assert torch.equal(L.loss_and_argmax(h, w, t)[1][:2], torch.tensor([7, 7]))


def test_a_pause_comes_after_every_slice_of_each_pass():
    h, w, t = _case(17, vocab=49152, hidden=64)
    pauses = []
    L.cross_entropy_sum(h, w, t, lambda: pauses.append(1)).backward()
    assert len(pauses) == 3 * len(L.vocab_slices(17, w))  # logits, exp, gradient
    pauses.clear()
    L.loss_and_argmax(h.detach(), w, t, lambda: pauses.append(1))
    assert len(pauses) == len(L.vocab_slices(17, w))


def test_the_trainers_loss_is_the_cross_entropy_of_the_methods_logits(tiny_config):
    from trainer.loop import Trainer

    trainer = Trainer(tiny_config("lora", rank=4))
    trainer.setup()
    try:
        batch = pack([Example([5, 6, 7, 8, 9, 10], (False, False, True, True, True, True), 1),
                      Example([11, 12, 13, 14], (False, True, True, True), 1)])
        with torch.no_grad():
            ref = F.cross_entropy(trainer.method(trainer.model, batch).float(), batch.targets, reduction="sum")
            mine = trainer._loss_sum(batch)
        torch.testing.assert_close(mine, ref)
    finally:
        trainer.cleanup()
