"""Which adapter slot each token of a packed batch uses, computed once per step.

Passed explicitly to every layer's forward (LoRAX `AdapterBatchMetadata`), never through globals
or hooks. It also picks the LoRA fast path for the whole step:
- runs: tokens of one slot that sit next to each other in the packed batch form a run (a whole
  prompt chunk, or consecutive decode rows: the engine orders rows by slot), and each run pays one
  matmul pair on views of x and of the slot's weights, nothing copied;
- gather: per-token weight gather + bmm, a fixed handful of ops whatever the mix, which wins on
  CUDA when nearly every token is its own run (per-run kernel launches outweigh the copies).
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
    use_gather: bool
    any_dora: bool
    any_embedding: bool

    @property
    def has_lora(self) -> bool:
        return bool(self.runs)

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
        gather = prefer_gather(len(runs), rows.numel(), torch.device(device or "cpu").type)
        if force_path is not None:
            if force_path not in ("runs", "gather"):
                raise ValueError(f"force_path must be 'runs' or 'gather', not {force_path!r}")
            gather = force_path == "gather"
        used = {s for s, _, _ in runs}
        return cls(
            token_slots=token_slots.to(device),
            runs=runs,
            adapter_rows=rows.to(device),
            adapter_row_slots=token_slots[rows].to(device),
            use_gather=gather,
            any_dora=bool(used & set(dora_slots)),
            any_embedding=bool(used & set(embedding_slots)),
        )
