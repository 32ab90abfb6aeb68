"""Paged key/value cache: fixed-size blocks of token rows, handed to sequences on demand.

Memory grows with the tokens actually held, not with any request's maximum length: a sequence
owns a list of block ids (its block table) and takes one more block each time it crosses a block
boundary. The pool itself grows by doubling up to `max_tokens`, so an idle server holds little.

Layout: pool [num_layers, 2 (k/v), num_blocks, block_size, H_kv, hd]. Keys are stored after
rotary (prefix-tuning keys as given: PEFT applies no rotary to them).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from runtime.config import ModelConfig


class CacheFull(RuntimeError):
    """No free block is left under `max_tokens`; the engine waits or preempts."""


@dataclass
class SeqCache:
    """One sequence's place in the cache."""

    blocks: list[int] = field(default_factory=list)
    length: int = 0  # token rows written (prefix + prompt + generated)


class KVCache:
    def __init__(self, cfg: ModelConfig, *, max_tokens: int, block_size: int = 16,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 initial_blocks: int = 64):
        self.cfg = cfg
        self.block_size = block_size
        self.max_blocks = max(1, -(-max_tokens // block_size))
        self.dtype, self.device = dtype, torch.device(device)
        self.pool = self._alloc(min(initial_blocks, self.max_blocks))
        self._free = list(range(self.pool.shape[2] - 1, -1, -1))  # stack: pop() gives lowest id

    def _alloc(self, n_blocks: int) -> torch.Tensor:
        c = self.cfg
        shape = (c.num_layers, 2, n_blocks, self.block_size, c.num_kv_heads, c.head_dim)
        return torch.zeros(shape, dtype=self.dtype, device=self.device)

    # ---- accounting -------------------------------------------------------------------------
    @property
    def capacity_blocks(self) -> int:
        return self.pool.shape[2]

    @property
    def used_blocks(self) -> int:
        return self.capacity_blocks - len(self._free)

    def usage(self) -> float:
        """Fraction of the `max_tokens` budget held by sequences."""
        return self.used_blocks / self.max_blocks

    def free_tokens(self) -> int:
        """Token rows that can still be reserved (counting growth up to max_tokens)."""
        return (self.max_blocks - self.used_blocks) * self.block_size

    def blocks_needed(self, seq: SeqCache, n_new: int) -> int:
        return max(0, -(-(seq.length + n_new) // self.block_size) - len(seq.blocks))

    def bytes_per_token(self) -> int:
        c = self.cfg
        return c.num_layers * 2 * c.num_kv_heads * c.head_dim * self.pool.element_size()

    # ---- sequences ---------------------------------------------------------------------------
    def reserve(self, seq: SeqCache, n_new: int) -> None:
        """Make room for `n_new` more rows in `seq` (does not advance its length)."""
        need = self.blocks_needed(seq, n_new)
        if need > self.max_blocks - self.used_blocks:
            raise CacheFull(f"KV cache full: need {need} blocks, {self.max_blocks - self.used_blocks} free")
        while need > len(self._free):
            self._grow()
        seq.blocks.extend(self._free.pop() for _ in range(need))

    def _grow(self) -> None:
        old = self.pool
        new_n = min(self.max_blocks, max(1, old.shape[2] * 2))
        self.pool = self._alloc(new_n)
        self.pool[:, :, : old.shape[2]].copy_(old)
        self._free = list(range(new_n - 1, old.shape[2] - 1, -1)) + self._free

    def free(self, seq: SeqCache) -> None:
        self._free.extend(reversed(seq.blocks))
        seq.blocks, seq.length = [], 0

    def write_index(self, seq: SeqCache, n_new: int) -> torch.Tensor:
        """Flat row indices ([n_new]) where the next `n_new` tokens of `seq` go."""
        pos = torch.arange(seq.length, seq.length + n_new)
        blocks = torch.tensor(seq.blocks, dtype=torch.long)[pos // self.block_size]
        return blocks * self.block_size + pos % self.block_size

    # ---- per-layer data ----------------------------------------------------------------------
    def write(self, layer: int, index: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        # index: [T], k/v: [T, H_kv, hd]
        c = self.cfg
        flat = self.pool[layer].view(2, -1, c.num_kv_heads, c.head_dim)
        flat[0].index_copy_(0, index, k.to(self.dtype))
        flat[1].index_copy_(0, index, v.to(self.dtype))

    def gather(self, layer: int, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # table: [B, nb] block ids -> k, v: [B, H_kv, nb*bs, hd]
        kv = self.pool[layer][:, table]  # [2, B, nb, bs, H, hd]
        B, nb = table.shape
        kv = kv.reshape(2, B, nb * self.block_size, self.cfg.num_kv_heads, self.cfg.head_dim)
        kv = kv.transpose(2, 3)  # [2, B, H, L, hd]
        return kv[0], kv[1]

    def span(self, layer: int, first_block: int, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values lo..hi-1 of a sequence whose blocks are consecutive from `first_block`,
        as views of the pool (no copy): k, v [1, H_kv, hi - lo, hd]."""
        c, bs = self.cfg, self.block_size
        nb = -(-hi // bs)
        kv = self.pool[layer, :, first_block:first_block + nb]  # [2, nb, bs, H, hd]
        kv = kv.reshape(2, nb * bs, c.num_kv_heads, c.head_dim)[:, lo:hi].transpose(1, 2)
        return kv[0][None], kv[1][None]

    def write_prefix(self, seq: SeqCache, kv: torch.Tensor) -> None:
        """Store a precomputed per-layer prefix (kv: [L, 2, H_kv, N, hd]) as the first N rows."""
        n = kv.shape[3]
        self.reserve(seq, n)
        index = self.write_index(seq, n)
        for layer in range(self.cfg.num_layers):
            self.write(layer, index, kv[layer, 0].transpose(0, 1), kv[layer, 1].transpose(0, 1))
        seq.length += n
