"""The token loss over the vocabulary a slice at a time: no [n, vocab] logits, a pause between slices.

    loss = sum_i  logsumexp_v z[i, v] - z[i, t_i],      z = hidden @ W^T     hidden [n, H], W [V, H]

Semantics, as a plain loop (`reference_loss_sum`, the test's reference):

    for i in range(n):
        loss += torch.logsumexp(hidden[i] @ W.T, 0) - hidden[i] @ W[t_i]

Why in slices: the lm_head over a 49k vocabulary is the largest matmul of a training step, and
done whole it is one stretch of tens of milliseconds (measured on the embedded model, one core:
the lm_head, the cross-entropy and their backward ~45 ms with 17 loss rows) during which a
fine-tuning job inside the server cannot hand the engine thread back
(runtime/training/pieces.py); its fp32 logits, and the log-softmax autograd saves beside them,
are also 2 x n x V x 4 bytes (400 MB each for 1k loss rows). Here the loss rows go in blocks of
at most ROW_BLOCK, and each block through the vocabulary a slice at a time (within CHUNK_LOGITS
logits and CHUNK_WEIGHT_BYTES of weight: ~1.3 ms a slice on one core), in three passes with
`pause()` after every slice: the logits, their exp (with the row maxima), the gradient.

The gradient with respect to `hidden`, (softmax(z) - onehot(t)) @ W, is computed in the same pass,
a slice at a time: the lm_head weight is frozen (no gradient of its own), so backward only scales
it by the incoming gradient, and no logits outlive the forward. Per row, with m the row's max
logit and s = sum_v exp(z_v - m):

    loss_i = m + log(s) - z[i, t_i]          softmax = exp(z - m) / s

the same formula as `F.cross_entropy`'s log-softmax, summed in another order: equal to it up to
fp32 rounding (tests/trainer/test_loss.py). The split depends only on the batch's shape, so
`quiver train` and a job in the server compute the same bits.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

#: a vocabulary slice's size: at most this many logits (compute: 2^18 x H=576 x 2 FLOP = 0.3 GFLOP) ...
CHUNK_LOGITS = 1 << 18
#: ... and at most this many bytes of the lm_head weight (memory: with few loss rows the matmul
#: streams the weight; measured, one core: 17 rows x a 28 MB slice ~5 ms, forward and gradient)
CHUNK_WEIGHT_BYTES = 1 << 23
#: loss rows per block: bounds the fp32 logits held at once to ROW_BLOCK x V (48 MiB at V = 49152)
ROW_BLOCK = 256


def _no_pause() -> None:
    pass


def vocab_slices(rows: int, weight: torch.Tensor) -> list[slice]:
    """Equal slices of the vocabulary of `weight` [V, H] for `rows` loss rows, each within
    CHUNK_LOGITS logits and CHUNK_WEIGHT_BYTES of weight."""
    vocab, hidden = weight.shape
    count = max(1, math.ceil(rows * vocab / CHUNK_LOGITS),
                math.ceil(vocab * hidden * weight.element_size() / CHUNK_WEIGHT_BYTES))
    width = math.ceil(vocab / count)
    return [slice(v, min(v + width, vocab)) for v in range(0, vocab, width)]


def cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                      pause: Callable[[], None] = _no_pause) -> torch.Tensor:
    """Summed token cross-entropy of `hidden @ weight.T` [n, V] at `targets` [n] (fp32 scalar),
    differentiable with respect to `hidden` [n, H]; `weight` [V, H] must be frozen."""
    if weight.requires_grad:
        raise ValueError("cross_entropy_sum: the lm_head weight must be frozen (its gradient is not computed)")
    return _VocabCrossEntropy.apply(hidden, weight, targets, pause)


@torch.no_grad()
def loss_and_argmax(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                    pause: Callable[[], None] = _no_pause) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed cross-entropy, argmax over the vocabulary [n]) without gradient: the eval's.
    The argmax is the first maximal logit's index, as torch.argmax's."""
    losses, argmax = [], []
    for rows in _row_blocks(hidden.shape[0]):
        chunks = _logit_chunks(hidden[rows], weight, pause)
        argmax.append(_argmax(chunks))
        losses.append(_block_loss(chunks, targets[rows], weight.shape[0]).sum())
    return _total(losses, hidden.device), torch.cat(argmax)


class _VocabCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, pause):
        losses, grads = [], []
        for rows in _row_blocks(hidden.shape[0]):
            chunks = _logit_chunks(hidden[rows], weight, pause)
            loss, s = _block_loss_and_exp(chunks, targets[rows], weight.shape[0], pause)
            losses.append(loss.sum())
            if ctx.needs_input_grad[0]:
                grads.append(_block_grad(chunks, s, targets[rows], weight, pause).to(hidden.dtype))
        ctx.save_for_backward(torch.cat(grads) if grads else hidden.new_zeros(0))
        return _total(losses, hidden.device)

    @staticmethod
    def backward(ctx, grad_loss):
        (grad_hidden,) = ctx.saved_tensors  # d loss / d hidden [n, H]
        return grad_loss.to(grad_hidden.dtype) * grad_hidden, None, None, None


def _row_blocks(n: int) -> list[slice]:
    return [slice(r, min(r + ROW_BLOCK, n)) for r in range(0, n, ROW_BLOCK)] or [slice(0, 0)]


def _logit_chunks(hidden: torch.Tensor, weight: torch.Tensor, pause) -> list[tuple[slice, torch.Tensor]]:
    """[(vocab slice, fp32 logits [r, width])] of one row block, a pause after each slice."""
    chunks = []
    for cols in vocab_slices(hidden.shape[0], weight):
        chunks.append((cols, F.linear(hidden, weight[cols]).float()))
        pause()
    return chunks


def _block_loss(chunks, targets: torch.Tensor, vocab: int) -> torch.Tensor:
    """Per-row cross-entropy [r] of a block's logit chunks (left as they are)."""
    m = _row_max(chunks)
    s = sum(torch.exp(z - m[:, None]).sum(1) for _, z in chunks)
    return m + torch.log(s) - _target_logits(chunks, targets, vocab)


def _block_loss_and_exp(chunks, targets: torch.Tensor, vocab: int, pause):
    """(per-row cross-entropy [r], s [r]); the chunks' logits become exp(z - m), the softmax
    numerators, in place, a pause after each."""
    m = _row_max(chunks)
    z_t = _target_logits(chunks, targets, vocab)
    s = torch.zeros_like(m)
    for _, z in chunks:
        z.sub_(m[:, None]).exp_()
        s += z.sum(1)
        pause()
    return m + torch.log(s) - z_t, s


def _block_grad(numerators, s: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, pause) -> torch.Tensor:
    """d loss / d hidden of one block [r, H] = sum over slices (softmax - onehot) @ W[slice]."""
    grad = torch.zeros(targets.shape[0], weight.shape[1], dtype=torch.float32, device=weight.device)
    for cols, p in numerators:
        p.div_(s[:, None])  # softmax
        here = (targets >= cols.start) & (targets < cols.stop)
        rows = here.nonzero().squeeze(1)
        p[rows, targets[rows] - cols.start] -= 1.0
        grad += (p.to(weight.dtype) @ weight[cols]).float()
        pause()
    return grad


def _row_max(chunks) -> torch.Tensor:
    return torch.stack([z.amax(1) for _, z in chunks]).amax(0)  # [r]


def _target_logits(chunks, targets: torch.Tensor, vocab: int) -> torch.Tensor:
    """z[i, t_i] [r], gathered from the chunk each target falls in."""
    out = torch.zeros(targets.shape[0], dtype=torch.float32, device=targets.device)
    for cols, z in chunks:
        here = (targets >= cols.start) & (targets < cols.stop)
        rows = here.nonzero().squeeze(1)
        out[rows] = z[rows, targets[rows] - cols.start]
    return out


def _argmax(chunks) -> torch.Tensor:
    """The first maximal column of the block's logits [r] (ties: the earliest slice wins)."""
    best_val, best_idx = None, None
    for cols, z in chunks:
        idx = z.argmax(1)  # torch.argmax: the first maximal index within the slice
        val = z.gather(1, idx[:, None]).squeeze(1)
        if best_val is None:
            best_val, best_idx = val, idx + cols.start
            continue
        better = val > best_val
        best_val = torch.where(better, val, best_val)
        best_idx = torch.where(better, idx + cols.start, best_idx)
    return best_idx


def _total(losses: list[torch.Tensor], device) -> torch.Tensor:
    return torch.stack(losses).sum() if losses else torch.zeros((), device=device)


def reference_loss_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The module docstring's loop, one row at a time (tests)."""
    loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for i in range(hidden.shape[0]):
        z = (hidden[i] @ weight.T).float()  # [V]
        loss = loss + torch.logsumexp(z, 0) - z[targets[i]]
    return loss
