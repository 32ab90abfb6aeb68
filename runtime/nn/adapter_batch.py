"""Which adapter slot each token of a packed batch uses, computed once per step.

Passed explicitly to every layer's forward (LoRAX `AdapterBatchMetadata`), never through globals
or hooks. It also picks the LoRA fast path for the whole step: grouping tokens by slot pays one
matmul pair per distinct adapter (good for prefill and for few adapters), gathering per-token
weights pays a copy per token (good for decode over many distinct adapters).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

#: Use the gather path when the step has at least this many distinct adapters and on average
#: fewer than GATHER_MAX_ROWS_PER_SLOT tokens per adapter (measured on CPU, bench/).
GATHER_MIN_SLOTS = 4
GATHER_MAX_ROWS_PER_SLOT = 4


@dataclass
class AdapterBatch:
    token_slots: torch.Tensor  # [T] slot per token; `none_slot` (= S, the zero slot) for base rows
    groups: list[tuple[int, torch.Tensor]]  # (slot, token indices [n]) for each distinct adapter
    adapter_rows: torch.Tensor  # [n] tokens that carry an adapter
    adapter_row_slots: torch.Tensor  # [n] their slots
    use_gather: bool
    any_dora: bool
    any_embedding: bool

    @property
    def has_lora(self) -> bool:
        return bool(self.groups)

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
        for slot, n in zip(row_slots, row_lens):
            s = slot if slot in lora_slots else none_slot
            per_token.extend([s] * n)
        token_slots = torch.tensor(per_token, dtype=torch.long)
        rows = (token_slots != none_slot).nonzero()[:, 0]
        groups = [(int(s), (token_slots == s).nonzero()[:, 0].to(device))
                  for s in torch.unique(token_slots[rows]).tolist()]
        n_rows = rows.numel()
        gather = len(groups) >= GATHER_MIN_SLOTS and n_rows < GATHER_MAX_ROWS_PER_SLOT * len(groups)
        if force_path is not None:
            gather = force_path == "gather"
        used = {s for s, _ in groups}
        return cls(
            token_slots=token_slots.to(device),
            groups=groups,
            adapter_rows=rows.to(device),
            adapter_row_slots=token_slots[rows].to(device),
            use_gather=gather,
            any_dora=bool(used & set(dora_slots)),
            any_embedding=bool(used & set(embedding_slots)),
        )
