"""Paged key/value cache: fixed-size blocks of token rows, handed to sequences on demand, and
full blocks shared between sequences whose prefixes are the same (automatic prefix caching).

Memory grows with the tokens actually held, not with any request's maximum length: a sequence
owns a list of block ids (its block table) and takes one more block each time it crosses a block
boundary. The pool itself grows by doubling up to `max_tokens` (or is allocated whole at start-up,
`preallocate`), so an idle server holds little.

Layout: pool [num_layers, 2 (k/v), num_blocks, block_size, H_kv, hd]. Keys are stored after
rotary (prefix-tuning keys as given: PEFT applies no rotary to them).

Prefix caching. The KV of a block depends on everything before it and on the adapter that
computed it, so a *full* block is identified by

    key(block j) = (key id of block j-1, the block's token ids)      key id of block -1 = namespace
    namespace    = (adapter id, its load generation)                 ("", 0) = the base model

a chain: equal keys mean equal namespaces and equal token ids for the whole prefix up to and
including the block. The table is a dict over those keys, so a hit compares the block's token
tuple and its parent's id on top of the hash (a hash collision can never serve a wrong block),
and each cached block gets a fresh integer id that its children chain from; a block evicted and
reused for other tokens gets a new id, so stale children can never be reached again. Virtual
tokens (prompt / p-tuning / prefix tuning) are rows whose token id is `VIRTUAL_TOKEN`: the
namespace already says which adapter's virtual tokens they are.

    refs[b] > 0                 held by that many sequences (read-only once full and cached)
    refs[b] == 0, cached        evictable, least recently released first (`_evictable`)
    refs[b] == 0, not cached    free

Only full blocks are ever shared, and a sequence matched onto k cached blocks continues at row
k * block_size, the first row of a block of its own: a sequence's writes always go to blocks it
alone holds, so no copy-on-write is ever needed. A new block is taken from the free list, else
from the least recently used evictable block (its key is forgotten), else by growing the pool:
cached blocks use the room the pool already has and never make it grow.
"""
from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import torch

from runtime.config import ModelConfig

#: the token id of a virtual-token row in a block's key (real ids are >= 0)
VIRTUAL_TOKEN = -1


class CacheFull(RuntimeError):
    """No free block is left under `max_tokens`; the engine waits or preempts."""


@dataclass
class SeqCache:
    """One sequence's place in the cache."""

    blocks: list[int] = field(default_factory=list)
    length: int = 0  # token rows written (prefix + prompt + generated)
    hashed: int = 0  # leading full blocks already looked up or entered in the prefix table
    chain: Hashable = None  # key id of block `hashed - 1` (the namespace while hashed == 0)


@dataclass
class _Cached:
    key: tuple  # (parent key id, token ids of the block)
    uid: int  # this block's key id: its children's keys start with it


class KVCache:
    def __init__(self, cfg: ModelConfig, *, max_tokens: int, block_size: int = 16,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 initial_blocks: int = 64, preallocate: bool = False):
        self.cfg = cfg
        self.block_size = block_size
        self.max_blocks = max(1, -(-max_tokens // block_size))
        self.dtype, self.device = dtype, torch.device(device)
        n = self.max_blocks if preallocate else min(initial_blocks, self.max_blocks)
        self.pool = self._alloc(n)
        self._free = list(range(n - 1, -1, -1))  # stack: pop() gives lowest id
        self._refs = [0] * n  # sequences holding each block
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, refs 0; oldest first
        self._table: dict[tuple, int] = {}  # key -> block id
        self._cached: dict[int, _Cached] = {}  # block id -> its key
        self._uids = itertools.count(1)
        self.evicted_blocks = 0  # cached blocks whose key was dropped to make room

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
        """Blocks held by at least one sequence (cached blocks nobody holds are not in use)."""
        return self.capacity_blocks - len(self._free) - len(self._evictable)

    @property
    def cached_blocks(self) -> int:
        """Blocks in the prefix table, held or not."""
        return len(self._cached)

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

    def pool_bytes(self) -> int:
        """Bytes the pool holds now (it grows by doubling unless preallocated)."""
        return self.pool.numel() * self.pool.element_size()

    def refcount(self, block: int) -> int:
        return self._refs[block]

    # ---- sequences ---------------------------------------------------------------------------
    def reserve(self, seq: SeqCache, n_new: int) -> None:
        """Make room for `n_new` more rows in `seq` (does not advance its length)."""
        need = self.blocks_needed(seq, n_new)
        room = self.max_blocks - self.used_blocks
        if need > room:
            raise CacheFull(f"KV cache full: need {need} blocks, {room} free")
        seq.blocks.extend(self._take_block() for _ in range(need))

    def _take_block(self) -> int:
        """A block for one sequence alone: free, else the LRU evictable one, else grow."""
        if not self._free:
            if self._evictable:
                block, _ = self._evictable.popitem(last=False)
                self._forget(block)
                self.evicted_blocks += 1
                self._free.append(block)
            else:
                self._grow()
        block = self._free.pop()
        self._refs[block] = 1
        return block

    def _forget(self, block: int) -> None:
        entry = self._cached.pop(block)
        del self._table[entry.key]

    def _grow(self) -> None:
        old = self.pool
        new_n = min(self.max_blocks, max(1, old.shape[2] * 2))
        self.pool = self._alloc(new_n)
        self.pool[:, :, : old.shape[2]].copy_(old)
        self._free = list(range(new_n - 1, old.shape[2] - 1, -1)) + self._free
        self._refs.extend([0] * (new_n - old.shape[2]))

    def free(self, seq: SeqCache) -> None:
        """Drop `seq`'s hold on its blocks. Cached ones become evictable (the last block of the
        sequence first in line, its first block last: a shared head outlives its tails)."""
        for block in reversed(seq.blocks):
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if block in self._cached:
                    self._evictable[block] = None
                else:
                    self._free.append(block)
        seq.blocks, seq.length, seq.hashed, seq.chain = [], 0, 0, None

    def write_index(self, seq: SeqCache, n_new: int) -> torch.Tensor:
        """Flat row indices ([n_new]) where the next `n_new` tokens of `seq` go."""
        return torch.tensor(self.write_rows(seq, n_new), dtype=torch.long)

    def write_rows(self, seq: SeqCache, n_new: int) -> list[int]:
        """`write_index` as a list: a step's rows are gathered as ints and made one tensor
        (four tensor ops a sequence cost ~0.5 ms of a 32-row decode step)."""
        bs, blocks = self.block_size, seq.blocks
        return [blocks[p // bs] * bs + p % bs for p in range(seq.length, seq.length + n_new)]

    # ---- prefix table ------------------------------------------------------------------------
    def _block_key(self, seq: SeqCache, tokens: Sequence[int], j: int) -> tuple:
        bs = self.block_size
        return seq.chain, tuple(tokens[j * bs:(j + 1) * bs])

    def match(self, seq: SeqCache, namespace: Hashable, tokens: Sequence[int], max_blocks: int) -> int:
        """Start an empty `seq` on the longest cached run of full blocks of `tokens` (at most
        `max_blocks`), held read-only; returns the rows matched (seq.length is set to them).

        tokens: the row ids from row 0 (VIRTUAL_TOKEN for an adapter's virtual rows)."""
        assert not seq.blocks and seq.length == 0, "match starts a sequence"
        seq.chain = ("namespace", namespace)
        max_blocks = min(max_blocks, len(tokens) // self.block_size)
        while seq.hashed < max_blocks:
            block = self._table.get(self._block_key(seq, tokens, seq.hashed))
            if block is None:
                break
            if self._refs[block] == 0:
                del self._evictable[block]
            self._refs[block] += 1
            seq.blocks.append(block)
            seq.chain = self._cached[block].uid
            seq.hashed += 1
        seq.length = seq.hashed * self.block_size
        return seq.length

    def register(self, seq: SeqCache, tokens: Sequence[int], max_blocks: int) -> None:
        """Enter `seq`'s full blocks (up to `max_blocks` of them) in the prefix table, so that
        later sequences with the same namespace and rows reuse them.

        A block whose key is already taken (the same prefix computed twice, e.g. by two
        requests admitted in the same step) stays private: the chain goes on from the one
        already cached, whose rows are the same."""
        full = min(seq.length // self.block_size, max_blocks)
        while seq.hashed < full:
            key = self._block_key(seq, tokens, seq.hashed)
            block = seq.blocks[seq.hashed]
            known = self._table.get(key)
            if known is None:
                entry = self._cached[block] = _Cached(key, next(self._uids))
                self._table[key] = block
            else:
                entry = self._cached[known]
            seq.chain = entry.uid
            seq.hashed += 1

    def check(self, seqs: list[SeqCache]) -> None:
        """Invariants against the sequences that exist (tests): every block is exactly one of
        held (refs = the sequences holding it), evictable (cached, refs 0) or free."""
        held: dict[int, int] = {}
        for s in seqs:
            for b in s.blocks:
                held[b] = held.get(b, 0) + 1
        for b in range(self.capacity_blocks):
            assert self._refs[b] == held.get(b, 0), f"block {b}: refs {self._refs[b]} != {held.get(b, 0)}"
        free, evictable = set(self._free), set(self._evictable)
        assert len(free) == len(self._free) and not free & evictable and not free & set(held)
        assert not evictable & set(held) and evictable <= set(self._cached)
        assert len(free) + len(evictable) + len(held) == self.capacity_blocks
        assert {b: k for k, b in self._table.items()} == {b: e.key for b, e in self._cached.items()}

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
        """Store a precomputed per-layer prefix (kv: [L, 2, H_kv, N, hd]) as rows 0..N-1; rows
        already there (matched from the prefix table, `seq.length` of them) are kept."""
        lo, n = seq.length, kv.shape[3]
        if lo >= n:
            return
        self.reserve(seq, n - lo)
        index = self.write_index(seq, n - lo)
        for layer in range(self.cfg.num_layers):
            part = kv[layer, :, :, lo:n].transpose(1, 2)  # [2, n - lo, H_kv, hd]
            self.write(layer, index, part[0], part[1])
        seq.length = n
