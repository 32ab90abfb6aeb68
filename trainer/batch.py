"""Packed training batches and the step schedule.

A micro-batch is several examples packed end to end into one token row, the same packed layout
the engine serves (runtime/nn/attention.py): no padding, per-row lengths tell attention where
each example starts. Only the positions whose next token is a target go through the LM head:

    row 0: [p p p c c c]  row 1: [p p c c]         p = prompt (no loss), c = completion
    tokens    [T]      = p p p c c c p p c c
    loss_rows [n]      =     2 3 4       7 8        (index t predicts token t + 1)
    targets   [n]      =     c c c       c c

The schedule is a pure function of (seed, step): step s of epoch e takes the next
batch_size * grad_accum examples of a permutation seeded by (seed, e). A resumed run therefore
recomputes exactly the batches an uninterrupted run would have seen, with no data-loader state.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from trainer.data import Example


@dataclass
class PackedBatch:
    tokens: torch.Tensor  # [T] token ids of all rows, packed
    row_lens: list[int]  # tokens per row (one row per example)
    loss_rows: torch.Tensor  # [n] packed index t whose logits predict targets (= tokens[t + 1])
    loss_row_of: torch.Tensor  # [n] which batch row each loss row belongs to
    targets: torch.Tensor  # [n]

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.numel())

    @property
    def num_targets(self) -> int:
        return int(self.targets.numel())

    def positions(self, offset: int = 0) -> torch.Tensor:
        """[T] positions, each row counting from `offset` (prefix tuning: N)."""
        return torch.cat([torch.arange(offset, offset + n) for n in self.row_lens]).to(self.tokens.device)

    def to(self, device) -> "PackedBatch":
        return PackedBatch(self.tokens.to(device), self.row_lens, self.loss_rows.to(device),
                           self.loss_row_of.to(device), self.targets.to(device))


def pack(examples: list[Example]) -> PackedBatch:
    """Pack examples as rows of one batch (see the module docstring)."""
    tokens, rows, row_of, targets, start = [], [], [], [], 0
    for i, ex in enumerate(examples):
        tokens.extend(ex.ids)
        for t in range(len(ex.ids) - 1):
            if ex.labels[t + 1]:
                rows.append(start + t)
                row_of.append(i)
                targets.append(ex.ids[t + 1])
        start += len(ex.ids)
    return PackedBatch(
        tokens=torch.tensor(tokens, dtype=torch.long),
        row_lens=[len(ex.ids) for ex in examples],
        loss_rows=torch.tensor(rows, dtype=torch.long),
        loss_row_of=torch.tensor(row_of, dtype=torch.long),
        targets=torch.tensor(targets, dtype=torch.long),
    )


@dataclass(frozen=True)
class Schedule:
    """Which examples each optimizer step trains on."""

    num_examples: int
    batch_size: int
    grad_accum: int
    seed: int

    @property
    def examples_per_step(self) -> int:
        return self.batch_size * self.grad_accum

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.num_examples / self.examples_per_step)

    def total_steps(self, epochs: int, max_steps: int | None) -> int:
        return max_steps if max_steps is not None else epochs * self.steps_per_epoch

    def step_batches(self, step: int) -> list[list[int]]:
        """Example indices of each micro-batch of optimizer step `step` (0-based)."""
        epoch, k = divmod(step, self.steps_per_epoch)
        order = self.epoch_order(epoch)
        chunk = order[k * self.examples_per_step: (k + 1) * self.examples_per_step]
        return [chunk[i: i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]

    def epoch_order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_examples, generator=g).tolist()


def eval_batches(examples: list[Example], batch_size: int) -> list[PackedBatch]:
    """The eval set in file order, packed batch_size examples at a time."""
    return [pack(examples[i: i + batch_size]) for i in range(0, len(examples), batch_size)]
