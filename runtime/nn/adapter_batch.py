"""Which adapter slot each token of a packed batch uses, computed once per step.

Passed explicitly to every layer's forward (LoRAX `AdapterBatchMetadata`), never through globals
or hooks. It also picks the LoRA fast path for the whole step:
- runs: tokens of one slot that sit next to each other in the packed batch form a run (a whole
  prompt chunk, or consecutive decode rows: the engine orders rows by slot), and each run pays one
  matmul pair on views of x and of the slot's weights, nothing copied;
- slab: decode over many adapters on CPU. The adapter tokens are laid out as a [G, N] grid over
  the contiguous slot range [lo, hi) (G = hi - lo slots, N = most tokens of one slot), so each
  projection is two bmm over *views* of the slot tensors A[lo:hi], Bt[lo:hi]: a fixed handful of
  ops whatever the number of adapters, and no weight copies. Slots in the range that the step
  does not use cost their (zero-work) reads, so the registry hands out the lowest free slot;
- gather: per-token weight gather + bmm, also a fixed handful of ops, for CUDA, where copying
  weights is cheap and every op is a kernel launch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

#: On CUDA, use the gather path when the step has at least this many runs and on average fewer
#: than GATHER_MAX_TOKENS_PER_RUN tokens per run: there every op is a kernel launch, and copying
#: weights is cheap. On CPU the runs path measured faster at every mix (8..64 distinct adapters,
#: 1..4 rows each: bench/decode_bench.py --adapters), so CPU never gathers.
GATHER_MIN_RUNS = 4
GATHER_MAX_TOKENS_PER_RUN = 4


#: On CPU, use the slab path when the step has at least SLAB_MIN_RUNS runs, the slot range is at
#: most SLAB_MAX_SPAN x the distinct slots used, and at most SLAB_MAX_WIDTH tokens of one slot
#: (decode rows; long prompt chunks keep the runs path, whose matmuls are already large).
SLAB_MIN_RUNS = 3
SLAB_MAX_SPAN = 2
SLAB_MAX_WIDTH = 8


@dataclass(frozen=True)
class SlotSlab:
    """Adapter tokens as a [G, N] grid over slots lo..hi-1 (see the module docstring)."""
    lo: int
    hi: int
    width: int  # N: most tokens of one slot in this step
    source: torch.Tensor  # [G * N] token feeding each cell; T (a zero row) for an empty cell
    cells: torch.Tensor  # [n] the cell of each adapter token, in `adapter_rows` order
    #: every token of the step is an adapter token sitting in its own cell, in order (a decode
    #: step over consecutive slots, one row each, rows sorted by slot as the engine sorts them):
    #: the grid is then a view of x and the delta a view of the bmm output, nothing gathered
    identity: bool = False

    @classmethod
    def build(cls, row_tokens: list[int], row_slots: list[int], num_tokens: int, device=None):
        lo, hi = min(row_slots), max(row_slots) + 1
        seen: dict[int, int] = {}
        for slot in row_slots:
            seen[slot] = seen.get(slot, 0) + 1
        width = max(seen.values())
        source = [num_tokens] * ((hi - lo) * width)
        cells, filled = [], dict.fromkeys(seen, 0)
        for token, slot in zip(row_tokens, row_slots):
            cell = (slot - lo) * width + filled[slot]
            filled[slot] += 1
            source[cell] = token
            cells.append(cell)
        identity = source == list(range(num_tokens)) and cells == source
        return cls(lo, hi, width, torch.tensor(source, device=device), torch.tensor(cells, device=device),
                   identity)


def prefer_slab(runs: list[tuple[int, int, int]], device_type: str) -> bool:
    """The cost rule for the slab path (see the constants above)."""
    if device_type != "cpu" or len(runs) < SLAB_MIN_RUNS:
        return False
    per_slot: dict[int, int] = {}
    for slot, a, b in runs:
        per_slot[slot] = per_slot.get(slot, 0) + b - a
    span = max(per_slot) - min(per_slot) + 1
    return span <= SLAB_MAX_SPAN * len(per_slot) and max(per_slot.values()) <= SLAB_MAX_WIDTH


def prefer_gather(num_runs: int, num_tokens: int, device_type: str) -> bool:
    """The cost rule behind `AdapterBatch.use_gather` (see the constants above)."""
    return (device_type == "cuda" and num_runs >= GATHER_MIN_RUNS
            and num_tokens < GATHER_MAX_TOKENS_PER_RUN * num_runs)


@dataclass
class AdapterBatch:
    token_slots: torch.Tensor  # [T] slot per token; `none_slot` (= S, the zero slot) for base rows
    runs: list[tuple[int, int, int]]  # (slot, start, end): token ranges of one LoRA slot
    adapter_rows: torch.Tensor  # [n] tokens that carry an adapter
    adapter_row_slots: torch.Tensor  # [n] their slots
    path: str  # "runs", "slab" or "gather": the LoRA fast path of this step
    slab: SlotSlab | None  # the grid, when path == "slab"
    any_dora: bool
    any_embedding: bool

    @property
    def has_lora(self) -> bool:
        return bool(self.runs)

    @property
    def use_gather(self) -> bool:
        return self.path == "gather"

    @classmethod
    def build(cls, row_slots: list[int], row_lens: list[int], none_slot: int, *,
              lora_slots: set[int], dora_slots: set[int] = frozenset(),
              embedding_slots: set[int] = frozenset(), device=None,
              force_path: str | None = None) -> "AdapterBatch":
        """row_slots[i]: slot of batch row i (-1 or none_slot = base); row_lens[i]: its tokens.

        Only slots in `lora_slots` take part in LoRA math (prompt / prefix adapters hold a slot
        index too, but add nothing to the projections).
        """
        per_token: list[int] = []
        runs: list[tuple[int, int, int]] = []
        for slot, n in zip(row_slots, row_lens):
            s = slot if slot in lora_slots else none_slot
            start = len(per_token)
            per_token.extend([s] * n)
            if s == none_slot or n == 0:
                continue
            if runs and runs[-1][0] == s and runs[-1][2] == start:
                runs[-1] = (s, runs[-1][1], start + n)  # the next row of the same slot
            else:
                runs.append((s, start, start + n))
        token_slots = torch.tensor(per_token, dtype=torch.long)
        rows = (token_slots != none_slot).nonzero()[:, 0]
        dev_type = torch.device(device or "cpu").type
        path = "runs"
        if prefer_gather(len(runs), rows.numel(), dev_type):
            path = "gather"
        elif prefer_slab(runs, dev_type):
            path = "slab"
        if force_path is not None:
            if force_path not in ("runs", "slab", "gather"):
                raise ValueError(f"force_path must be 'runs', 'slab' or 'gather', not {force_path!r}")
            path = force_path if runs else "runs"
        slab = None
        if path == "slab":
            slab = SlotSlab.build(rows.tolist(), token_slots[rows].tolist(), len(per_token), device)
        used = {s for s, _, _ in runs}
        return cls(
            token_slots=token_slots.to(device),
            runs=runs,
            adapter_rows=rows.to(device),
            adapter_row_slots=token_slots[rows].to(device),
            path=path,
            slab=slab,
            any_dora=bool(used & set(dora_slots)),
            any_embedding=bool(used & set(embedding_slots)),
        )
