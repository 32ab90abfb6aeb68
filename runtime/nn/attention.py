"""Grouped-query attention over a packed batch of sequences.

A step's tokens are packed into one [T, hidden] tensor: each row of the batch (a request) owns a
contiguous run of q_len tokens. A row may be a prefill chunk (q_len > 1, possibly continuing an
earlier chunk) or a decode step (q_len == 1). Projections run once over all T tokens; only the
attention itself is per row:

    for row in rows:
        K, V = cache rows [0, kv_len) of that sequence (prefix + earlier + these tokens)
        out[row] = softmax(Q[row] K^T / sqrt(hd) + causal_mask(offset=kv_len - q_len)) V

Decode rows are batched into one call: on CPU (fp32 cache) the paged kernel of
csrc/paged_attention.cpp, which reads each row's keys in place through its block table; else
SDPA over keys gathered and padded to the longest, padding masked (one row too, so its block
table and mask are made once per step). Prefill rows loop over SDPA with a causal mask
(`attend_reference` is the plain per-row loop for everything, used by tests).

Without a cache (training, references) each row attends to its own tokens, plus an optional
per-row prefix (prefix tuning) placed before them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from runtime.nn.kv_cache import KVCache, SeqCache
from runtime.nn.native import paged_attention


@dataclass
class AttnRow:
    q_start: int  # first of this row's tokens in the packed batch
    q_len: int
    kv_len: int  # keys visible after this step: prefix + past + q_len
    seq: SeqCache | None = None  # its cache entry (None without a cache)
    prefix: torch.Tensor | None = None  # no-cache path only: [L, 2, H_kv, N, hd]


@dataclass
class AttentionBatch:
    """Per-step attention metadata, built once and shared by every layer."""

    rows: list[AttnRow]
    cache: KVCache | None = None
    write_index: torch.Tensor | None = None  # [T] flat cache rows for the new tokens
    sliding_window: int | None = None
    # decode group (q_len == 1 rows with a cache), batched into one attention call
    decode_rows: list[int] = field(default_factory=list)  # indices into rows
    decode_tokens: torch.Tensor | None = None  # [Bd] packed token index of each decode row
    decode_table: torch.Tensor | None = None  # [Bd, nb] block ids, padded with 0
    decode_mask: torch.Tensor | None = None  # [Bd, 1, 1, nb*bs] True = attend (SDPA path)
    #: paged kernel (native.py): row j reads keys decode_los[j]..decode_lens[j]-1 in place,
    #: through its block table: no gather copy, no mask
    decode_lens: torch.Tensor | None = None  # [Bd] kv_len
    decode_los: torch.Tensor | None = None  # [Bd] first visible key (sliding window)
    #: one decode row whose blocks are consecutive in the pool (a lone stream usually has them:
    #: the cache hands out the lowest free block): (first block, first key, kv_len); its keys
    #: are then read as a view of the pool, no gather copy (which grows with the context)
    decode_span: tuple[int, int, int] | None = None
    #: when a list, each layer appends its (k, v) [T, H_kv, hd] (prompt-tuning KV precompute)
    capture: list | None = None

    #: csrc/paged_attention.cpp's kernel where it applies to this cache (CPU fp32, extension
    #: built), looked up once per step by `prepare`; None: SDPA over gathered keys
    paged: object | None = None
    batch_decode: bool = True  # group q_len == 1 rows into one call (False: loop every row)
    _prepared: bool = False
    looped_rows: list[AttnRow] = field(default_factory=list)  # rows attended one by one
    #: the grouped decode rows are every row, tokens 0..T-1 in order (a pure decode step): q is
    #: then the decode group as it is, and its output the layer's, with no index in or out
    all_decode: bool = False

    @classmethod
    def without_cache(cls, q_lens: list[int], prefixes: list[torch.Tensor | None] | None = None
                      ) -> "AttentionBatch":
        rows, start = [], 0
        prefixes = prefixes or [None] * len(q_lens)
        for q_len, prefix in zip(q_lens, prefixes):
            n_prefix = 0 if prefix is None else prefix.shape[3]
            rows.append(AttnRow(start, q_len, n_prefix + q_len, prefix=prefix))
            start += q_len
        return cls(rows)

    @classmethod
    def with_cache(cls, cache: KVCache, seqs: list[SeqCache], q_lens: list[int],
                   batch_decode: bool = True) -> "AttentionBatch":
        """Rows for sequences whose cache already has room (`cache.reserve`) for q_len more rows.

        Call before the forward; advance each `seq.length` by its q_len after it (`commit`).
        """
        rows, index, start = [], [], 0
        for seq, q_len in zip(seqs, q_lens):
            rows.append(AttnRow(start, q_len, seq.length + q_len, seq=seq))
            index += cache.write_rows(seq, q_len)
            start += q_len
        return cls(rows, cache, torch.tensor(index, dtype=torch.long, device=cache.device),
                   batch_decode=batch_decode)

    def prepare(self, sliding_window: int | None) -> None:
        """Called by the model before its first layer: the window is the model's to know."""
        if self._prepared:
            return
        self.sliding_window = sliding_window
        self.paged = paged_attention(self.cache)
        if self.cache is not None and self.batch_decode:
            self._group_decode_rows()
        grouped = set(self.decode_rows)
        self.looped_rows = [r for i, r in enumerate(self.rows) if i not in grouped]
        self._prepared = True

    def _group_decode_rows(self) -> None:
        # Even one decode row takes this path: its block table and mask are built once per
        # step here rather than once per layer in `_attend_row`.
        dec = [i for i, r in enumerate(self.rows) if r.q_len == 1]
        if not dec:
            return
        self.decode_rows = dec
        self.decode_tokens = torch.tensor([self.rows[i].q_start for i in dec])
        self.all_decode = len(dec) == len(self.rows)  # then row i is token i (q_len 1 each)
        if self.paged is not None:
            self._page_decode_rows(dec)
            return
        blocks = self.rows[dec[0]].seq.blocks
        if len(dec) == 1 and blocks == list(range(blocks[0], blocks[0] + len(blocks))):
            row = self.rows[dec[0]]
            lo = 0 if self.sliding_window is None else max(0, row.kv_len - self.sliding_window)
            self.decode_span = (blocks[0], lo, row.kv_len)  # no table, no mask: keys as a view
            return
        bs = self.cache.block_size
        nb = max(len(self.rows[i].seq.blocks) for i in dec)
        table = torch.zeros(len(dec), nb, dtype=torch.long)
        mask = torch.zeros(len(dec), 1, 1, nb * bs, dtype=torch.bool)
        for j, i in enumerate(dec):
            row = self.rows[i]
            table[j, : len(row.seq.blocks)] = torch.tensor(row.seq.blocks)
            lo = 0 if self.sliding_window is None else max(0, row.kv_len - self.sliding_window)
            mask[j, 0, 0, lo: row.kv_len] = True
        self.decode_table = table.to(self.cache.device)
        self.decode_mask = mask.to(self.cache.device)

    def _page_decode_rows(self, dec: list[int]) -> None:
        rows = [self.rows[i] for i in dec]
        nb = max(len(r.seq.blocks) for r in rows)
        self.decode_table = torch.tensor([r.seq.blocks + [0] * (nb - len(r.seq.blocks)) for r in rows])
        self.decode_lens = torch.tensor([r.kv_len for r in rows])
        w = self.sliding_window
        self.decode_los = torch.tensor([0 if w is None else max(0, r.kv_len - w) for r in rows])

    def commit(self) -> None:
        """Advance each sequence past the tokens this step wrote."""
        for row in self.rows:
            if row.seq is not None:
                row.seq.length += row.q_len


def causal_mask(q_len: int, kv_len: int, window: int | None, device) -> torch.Tensor:
    """[q_len, kv_len] bool, True = attend: query i sits at key index kv_len - q_len + i."""
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    k_pos = torch.arange(kv_len, device=device)[None, :]
    mask = k_pos <= q_pos
    if window is not None:
        mask &= k_pos > q_pos - window
    return mask


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    # q: [B, H, q, hd], k/v: [B, H_kv, L, hd], mask: broadcastable to [B, H, q, L]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1])


def _row_keys(batch: AttentionBatch, layer: int, row: AttnRow, k: torch.Tensor, v: torch.Tensor):
    """This row's visible keys/values as [1, H_kv, kv_len, hd]."""
    if batch.cache is not None:
        table = torch.tensor([row.seq.blocks], device=batch.cache.device)
        kc, vc = batch.cache.gather(layer, table)
        return kc[:, :, : row.kv_len], vc[:, :, : row.kv_len]
    ks = k[row.q_start: row.q_start + row.q_len].transpose(0, 1)  # [H_kv, q, hd]
    vs = v[row.q_start: row.q_start + row.q_len].transpose(0, 1)
    if row.prefix is not None:
        ks = torch.cat([row.prefix[layer, 0].to(ks.dtype), ks], dim=1)
        vs = torch.cat([row.prefix[layer, 1].to(vs.dtype), vs], dim=1)
    return ks[None], vs[None]


def attend(batch: AttentionBatch, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q: [T, H, hd], k/v: [T, H_kv, hd] (rotated) -> [T, H, hd]. Writes k/v to the cache."""
    if batch.capture is not None:
        batch.capture.append((k, v))
    if batch.cache is not None:
        batch.cache.write(layer, batch.write_index, k, v)
    if batch.all_decode:
        return _attend_decode_group(batch, layer, q)
    out = torch.empty_like(q)
    if batch.decode_rows:
        out[batch.decode_tokens] = _attend_decode_group(batch, layer, q[batch.decode_tokens])
    for row in batch.looped_rows:
        out[row.q_start: row.q_start + row.q_len] = _attend_row(batch, layer, row, q, k, v)
    return out


def _attend_decode_group(batch: AttentionBatch, layer: int, qd: torch.Tensor) -> torch.Tensor:
    """The decode rows' queries qd [Bd, H, hd] against their cached keys -> [Bd, H, hd]."""
    if batch.decode_lens is not None:  # the paged kernel reads the pool in place (native.py)
        return batch.paged(qd, batch.cache.pool, layer, batch.decode_table, batch.decode_lens,
                           batch.decode_los)
    if batch.decode_span is not None:  # one row, consecutive blocks: its keys as a view
        b0, lo, hi = batch.decode_span
        kd, vd = batch.cache.span(layer, b0, lo, hi)  # [1, H_kv, hi - lo, hd]
        mask = None
    else:
        kd, vd = batch.cache.gather(layer, batch.decode_table)  # [Bd, H_kv, L, hd]
        mask = batch.decode_mask
    od = _sdpa(qd[:, :, None, :], kd.to(qd.dtype), vd.to(qd.dtype), mask)  # [Bd, H, 1, hd]
    return od[:, :, 0, :]


def _attend_row(batch: AttentionBatch, layer: int, row: AttnRow, q, k, v) -> torch.Tensor:
    ks, vs = _row_keys(batch, layer, row, k, v)
    qs = q[row.q_start: row.q_start + row.q_len].transpose(0, 1)[None]  # [1, H, q, hd]
    mask = causal_mask(row.q_len, row.kv_len, batch.sliding_window, q.device)
    o = _sdpa(qs, ks.to(q.dtype), vs.to(q.dtype), mask)  # [1, H, q, hd]
    return o[0].transpose(0, 1)


def attend_reference(batch: AttentionBatch, layer: int, q, k, v) -> torch.Tensor:
    """Plain per-row loop with explicit softmax (no batching, no SDPA): the meaning of `attend`."""
    if batch.cache is not None:
        batch.cache.write(layer, batch.write_index, k, v)
    out = torch.empty_like(q)
    for row in batch.rows:
        ks, vs = _row_keys(batch, layer, row, k, v)  # [1, H_kv, L, hd]
        rep = q.shape[1] // ks.shape[1]
        ks, vs = ks[0].repeat_interleave(rep, 0), vs[0].repeat_interleave(rep, 0)  # [H, L, hd]
        qs = q[row.q_start: row.q_start + row.q_len].transpose(0, 1)  # [H, q, hd]
        scores = qs @ ks.transpose(1, 2) / q.shape[-1] ** 0.5
        mask = causal_mask(row.q_len, row.kv_len, batch.sliding_window, q.device)
        scores = scores.masked_fill(~mask, float("-inf"))
        out[row.q_start: row.q_start + row.q_len] = (scores.softmax(-1) @ vs).transpose(0, 1)
    return out
