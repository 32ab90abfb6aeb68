"""Which adapter slot each token of a packed batch uses, computed once per step.

Passed explicitly to every layer's forward (LoRAX `AdapterBatchMetadata`), never through globals
or hooks. It also picks the LoRA fast path for the whole step:
- runs: tokens of one slot that sit next to each other in the packed batch form a run (a whole
  prompt chunk, or consecutive decode rows: the engine orders rows by slot). On CPU every run of
  up to LORA_ROWS_MAX tokens (decode rows) goes through one parallel C++ pass over all of them
  (csrc/lora_rows.cpp `lora_runs_`: each slot's weights streamed once, nothing copied), and each
  longer run (a prompt chunk) pays one matmul pair on views of x and of the slot's weights;
- gather: per-token weight gather + bmm, a fixed handful of ops whatever the number of adapters:
  CUDA, where copying weights is cheap and every op is a kernel launch, and CPU decode over many
  adapters where the C++ pass is not built (a Python loop of matmul pairs costs ~20 us a run).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from runtime.nn.native import lora_runs_kernel

#: Use the gather path when the step has at least this many runs and on average fewer than
#: GATHER_MAX_TOKENS_PER_RUN tokens per run, on CUDA, or on CPU without the C++ runs pass.
#: With it, CPU never gathers: the pass measured faster at every mix (8..64 distinct adapters,
#: 1 row each, r=8 and 16: 0.61-0.92x the base step against 0.48-0.88x for two bmm over the
#: slot range; bench/decode_bench.py --adapters).
GATHER_MIN_RUNS = 4
GATHER_MAX_TOKENS_PER_RUN = 4
#: runs of up to this many tokens take the C++ pass (csrc/lora_rows.cpp: kRunRowsMax)
LORA_ROWS_MAX = 8


def prefer_gather(num_runs: int, num_tokens: int, device_type: str, runs_kernel: bool = True) -> bool:
    """The cost rule behind `AdapterBatch.use_gather` (see the constants above); runs_kernel:
    the C++ runs pass takes this step's short runs (a CPU fp32 step with the extension built)."""
    if device_type == "cpu" and runs_kernel:
        return False
    return num_runs >= GATHER_MIN_RUNS and num_tokens < GATHER_MAX_TOKENS_PER_RUN * num_runs


@dataclass
class AdapterBatch:
    token_slots: torch.Tensor  # [T] slot per token; `none_slot` (= S, the zero slot) for base rows
    runs: list[tuple[int, int, int]]  # (slot, start, end): token ranges of one LoRA slot
    adapter_rows: torch.Tensor  # [n] tokens that carry an adapter
    adapter_row_slots: torch.Tensor  # [n] their slots
    path: str  # "runs" or "gather": the LoRA fast path of this step
    #: [k, 3] int64 (slot, start, end) of the runs of up to LORA_ROWS_MAX tokens, on the CPU:
    #: what the C++ runs pass takes (each projection skips the slots it does not target)
    short_runs: torch.Tensor
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
              embedding_slots: set[int] = frozenset(), device=None, dtype: torch.dtype = torch.float32,
              force_path: str | None = None) -> "AdapterBatch":
        """row_slots[i]: slot of batch row i (-1 or none_slot = base); row_lens[i]: its tokens;
        dtype: the activations' (the C++ runs pass computes fp32).

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
        runs_kernel = dtype == torch.float32 and lora_runs_kernel() is not None
        path = "gather" if prefer_gather(len(runs), rows.numel(), dev_type, runs_kernel) else "runs"
        if force_path is not None:
            if force_path not in ("runs", "gather"):
                raise ValueError(f"force_path must be 'runs' or 'gather', not {force_path!r}")
            path = force_path if runs else "runs"
        short = [r for r in runs if r[2] - r[1] <= LORA_ROWS_MAX]
        used = {s for s, _, _ in runs}
        return cls(
            token_slots=token_slots.to(device),
            runs=runs,
            adapter_rows=rows.to(device),
            adapter_row_slots=token_slots[rows].to(device),
            path=path,
            short_runs=torch.tensor(short, dtype=torch.long).view(-1, 3),
            any_dora=bool(used & set(dora_slots)),
            any_embedding=bool(used & set(embedding_slots)),
        )

