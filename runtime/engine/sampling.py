"""Choosing the next token for every row of a continuous batch, each row with its own params.

Meaning. Each row is processed exactly as Hugging Face `generate` would process it alone, in
HF's order (`transformers.generation.logits_process`):

    RepetitionPenaltyLogitsProcessor      (prompt + generated ids, as HF does for decoders)
    presence / frequency penalty          (OpenAI's, over generated ids only; as vLLM orders it)
    suppressed ids -> -inf                (MinNewTokensLengthLogitsProcessor: EOS before min)
    --- greedy rows (temperature == 0) stop here and take the argmax ---
    TemperatureLogitsWarper -> TopKLogitsWarper -> TopPLogitsWarper -> TypicalLogitsWarper
    draw one token from softmax of the result

so tests can hold each step to transformers' own classes. As in HF, greedy rows ignore top-k,
top-p and typical-p (they cannot change the argmax).

Reported log-probabilities are those of the distribution the token was actually drawn from:
`log_softmax` of the processed logits (HF's `output_scores` view). For a sampled row that is
after temperature and truncation, so a token outside top-k/top-p has logprob -inf; for a greedy
row it is after repetition penalty and suppression only. Top-n alternatives come from the same
distribution; when n exceeds the number of surviving tokens the tail entries are -inf.

Reproducibility. A seeded request must draw the same tokens whatever else shares its batch, so
randomness is per row: we draw with the exponential-race (Gumbel-max) trick,
`argmax(probs / q)` with `q ~ Exp(1)`, which picks token i with probability probs[i], and a row
with a `torch.Generator` fills its own `q` row from that generator. Rows without one (unseeded
requests) share a single draw from torch's default generator, which costs one kernel for all of
them; pass a generator only when the request has a seed (`generator_for`).

Cost. Decode calls this with B up to 256 and V ~ 49k every step, so each processing stage runs
only on the rows that asked for it: all-default greedy rows cost one argmax (on CPU one C++
pass, csrc/elementwise.cpp: torch's took 0.42 ms at 32 x 49k), top-k costs one `topk` over the
rows that set it, only top-p / typical-p rows pay for a full sort, and the log-softmax runs only
when a row asked for log-probabilities (0.32 ms at 32 x 49k).
`sample_reference` is the plain per-row loop; tests hold `sample` to it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from runtime.engine.params import SamplingParams
from runtime.nn.native import argmax_kernel

NEG_INF = float("-inf")


@dataclass
class SampleResult:
    tokens: Tensor  # [B] int64, the chosen ids
    logprobs: Tensor  # [B] float32, log-prob of the chosen id under the processed distribution
    #                   (zeros when the call asked for none: `logprobs=False`, top_n 0)
    top_ids: Tensor  # [B, N] int64, the N most likely ids (N = the `top_n` asked for)
    top_logprobs: Tensor  # [B, N] float32, their log-probs, descending


def generator_for(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A generator for a seeded request, on the device the logits will be on; None for an
    unseeded one (it then shares the batch's single draw from torch's default generator)."""
    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


# ---------------------------------------------------------------------------------------------
# Batched fast path


def sample(
    logits: Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None] | None = None,
    prev_tokens: Sequence[Tensor | None] | None = None,
    suppress: Sequence[set[int] | None] | None = None,
    top_n: int = 0,
    output_tokens: Sequence[Tensor | None] | None = None,
    logprobs: bool = True,
) -> SampleResult:
    """Choose one token per row.

    logits: [B, V] (any float dtype; processed in float32). params: one per row. generators:
    one per row (None entries, or None for all, draw from torch's default generator).
    prev_tokens[i]: [L_i] ids seen so far by row i (prompt + generated), used only when that
    row has a repetition penalty (may be None otherwise). suppress[i]: ids row i may not pick
    this step (EOS under min_new_tokens), or None. top_n: how many alternatives to report.
    output_tokens[i]: [G_i] ids row i generated so far, used only when that row has a presence
    or frequency penalty. logprobs=False with top_n 0: no row reports log-probabilities, so
    none is computed (`SampleResult.logprobs` is zeros).

    Semantics (`sample_reference` is this loop, kept as the test oracle):

        for i in range(B):
            x = repetition_penalty(logits[i].float(), prev_tokens[i])
            c = bincount(output_tokens[i], V)
            x -= c * frequency_penalty[i] + (c > 0) * presence_penalty[i]; x[suppress[i]] = -inf
            if params[i].greedy:
                token[i] = argmax(x)
            else:
                x = typical(top_p(top_k(x / temperature)))
                token[i] = argmax(softmax(x) / Exp(1) noise drawn with generators[i])
            logprob[i] = log_softmax(x)[token[i]]; top[i] = topk(log_softmax(x), top_n)
    """
    x = process_logits(logits, params, prev_tokens, suppress, output_tokens)  # [B, V] float32
    tokens = _choose(x, params, generators or [None] * len(params))  # [B]
    if not logprobs and top_n == 0:
        empty = torch.empty(x.shape[0], 0, device=x.device)
        return SampleResult(tokens, torch.zeros(x.shape[0], device=x.device), empty.long(), empty)
    logp = torch.log_softmax(x, dim=-1)  # [B, V]
    chosen = logp.gather(1, tokens[:, None]).squeeze(1)  # [B]
    top_lp, top_ids = logp.topk(min(top_n, logp.shape[1]), dim=-1)  # [B, N]
    return SampleResult(tokens, chosen, top_ids, top_lp)


def process_logits(
    logits: Tensor,
    params: Sequence[SamplingParams],
    prev_tokens: Sequence[Tensor | None] | None = None,
    suppress: Sequence[set[int] | None] | None = None,
    output_tokens: Sequence[Tensor | None] | None = None,
) -> Tensor:
    """logits: [B, V] -> [B, V] float32 after each row's processors (module docstring).

    Returns `logits` itself when it is float32 and no row needs any processing."""
    assert logits.dim() == 2 and logits.shape[0] == len(params), "one SamplingParams per row"
    edits = any(not p.is_default for p in params) or any(suppress or ())
    x = logits.to(torch.float32, copy=edits)  # [B, V]; a private copy if we edit it in place
    _repetition_penalty_(x, params, prev_tokens)
    _output_penalties_(x, params, output_tokens)
    _suppress_(x, suppress)
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    _on_rows(x, sampled, lambda xs: _warp_(xs, [params[i] for i in sampled]))
    return x


def _on_rows(x: Tensor, rows: list[int], fn: Callable[[Tensor], Tensor]) -> None:
    """x[rows] = fn(x[rows]) in place; skips the gather/scatter when rows are all of x."""
    if not rows:
        return
    if len(rows) == x.shape[0]:
        out = fn(x)
        if out is not x:
            x.copy_(out)
        return
    idx = _to_device(rows, torch.long, x.device)
    x[idx] = fn(x[idx])


def _to_device(values: list | Tensor, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A small host-built tensor on `device`. On CUDA it goes through pinned memory without a
    sync, so building per-row metadata does not stall the GPU queue mid-step."""
    t = values.to(dtype) if isinstance(values, Tensor) else torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _row_values(values: list, x: Tensor, dtype: torch.dtype) -> Tensor:
    return _to_device(values, dtype, x.device)[:, None]  # [R, 1]


def _repetition_penalty_(
    x: Tensor, params: Sequence[SamplingParams], prev_tokens: Sequence[Tensor | None] | None
) -> None:
    """HF RepetitionPenaltyLogitsProcessor per row: a seen token's logit is divided by the
    penalty if positive, multiplied if negative; once per token however often it was seen."""
    rows = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
    if not rows:
        return
    if prev_tokens is None:
        raise ValueError("prev_tokens is required for rows with a repetition penalty")
    V = x.shape[1]
    seen_ids = _padded_ids([prev_tokens[i] for i in rows], V, x.device)  # [R, L]
    penalty = _row_values([params[i].repetition_penalty for i in rows], x, torch.float32)

    def penalise(xr: Tensor) -> Tensor:  # xr: [R, V]
        padded = torch.nn.functional.pad(xr, (0, 1))  # [R, V + 1]
        score = padded.gather(1, seen_ids)  # [R, L]
        score = torch.where(score < 0, score * penalty, score / penalty)
        return padded.scatter_(1, seen_ids, score)[:, :V]

    _on_rows(x, rows, penalise)


def _output_penalties_(
    x: Tensor, params: Sequence[SamplingParams], output_tokens: Sequence[Tensor | None] | None
) -> None:
    """OpenAI presence / frequency penalties on the rows that set one: per-token counts of the
    row's generated ids, one scatter_add for all rows (ids >= V land in a dropped column)."""
    rows = [i for i, p in enumerate(params) if p.has_output_penalty]
    if not rows:
        return
    if output_tokens is None:
        raise ValueError("output_tokens is required for rows with a presence or frequency penalty")
    V = x.shape[1]
    gen_ids = _padded_ids([output_tokens[i] for i in rows], V, x.device)  # [R, G]
    freq = _row_values([params[i].frequency_penalty for i in rows], x, torch.float32)  # [R, 1]
    pres = _row_values([params[i].presence_penalty for i in rows], x, torch.float32)  # [R, 1]

    def penalise(xr: Tensor) -> Tensor:  # xr: [R, V]
        counts = torch.zeros(xr.shape[0], V + 1, dtype=xr.dtype, device=xr.device)  # [R, V + 1]
        counts.scatter_add_(1, gen_ids, torch.ones_like(gen_ids, dtype=xr.dtype))
        counts = counts[:, :V]
        return xr - counts * freq - (counts > 0).to(xr.dtype) * pres

    _on_rows(x, rows, penalise)


def _padded_ids(rows: Sequence[Tensor | Sequence[int] | None], V: int, device: torch.device) -> Tensor:
    """Each row's token ids as one [R, L] int64 tensor on `device`, padded with V: an extra
    column the penalties use and drop afterwards (HF's trick); ids >= V land there too."""
    ids = pad_sequence([_ids(t) for t in rows], batch_first=True, padding_value=V).clamp_(max=V)
    return _to_device(ids, torch.long, device) if ids.device != device else ids


def _ids(tokens: Tensor | Sequence[int] | None) -> Tensor:
    """[L] int64 on the host or device it came from; None is no tokens."""
    return torch.as_tensor([] if tokens is None else tokens, dtype=torch.long).reshape(-1)


def _suppress_(x: Tensor, suppress: Sequence[set[int] | None] | None) -> None:
    """Set each row's banned ids to -inf (ids outside the vocabulary are ignored)."""
    if not suppress:
        return
    V = x.shape[1]
    rows: list[int] = []
    cols: list[int] = []
    for i, banned in enumerate(suppress):
        for t in banned or ():
            if 0 <= t < V:
                rows.append(i)
                cols.append(t)
    if rows:
        x[_to_device(rows, torch.long, x.device), _to_device(cols, torch.long, x.device)] = NEG_INF


def _warp_(xs: Tensor, ps: list[SamplingParams]) -> Tensor:
    """xs: [S, V] rows that sample; HF warpers in HF's order, each on the rows that set it."""
    if any(p.temperature != 1.0 for p in ps):
        xs.div_(_row_values([p.temperature for p in ps], xs, torch.float32))
    rows = [j for j, p in enumerate(ps) if p.top_k > 0]
    _on_rows(xs, rows, lambda r: _top_k(r, [ps[j].top_k for j in rows]))
    rows_p = [j for j, p in enumerate(ps) if p.top_p < 1.0]
    _on_rows(xs, rows_p, lambda r: _top_p(r, [ps[j].top_p for j in rows_p]))
    rows_t = [j for j, p in enumerate(ps) if p.typical_p < 1.0]
    _on_rows(xs, rows_t, lambda r: _typical(r, [ps[j].typical_p for j in rows_t]))
    return xs


def _top_k(x: Tensor, ks: list[int]) -> Tensor:
    """x: [R, V]; keep logits >= row i's ks[i]-th largest (ties at the cut all survive, as HF)."""
    V = x.shape[1]
    ks = [min(k, V) for k in ks]
    top = x.topk(max(ks), dim=-1).values  # [R, kmax], descending
    kth = top.gather(1, _row_values([k - 1 for k in ks], x, torch.long))  # [R, 1]
    return x.masked_fill(x < kth, NEG_INF)


def _top_p(x: Tensor, ps: list[float]) -> Tensor:
    """x: [R, V]; HF TopPLogitsWarper with a per-row top_p (min_tokens_to_keep=1)."""
    sorted_logits, sorted_idx = torch.sort(x, descending=False)  # [R, V]
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # [R, V]
    remove = cum <= _row_values([1 - p for p in ps], x, torch.float32)
    remove[:, -1] = False  # the most likely token always stays
    remove = remove.scatter(1, sorted_idx, remove)
    return x.masked_fill(remove, NEG_INF)


def _typical(x: Tensor, masses: list[float]) -> Tensor:
    """x: [R, V]; HF TypicalLogitsWarper with a per-row mass (min_tokens_to_keep=1)."""
    logp = torch.log_softmax(x, dim=-1)  # [R, V]
    ent = -(logp * logp.exp()).nansum(-1, keepdim=True)  # [R, 1] entropy
    shifted = (-logp - ent).abs()  # [R, V] distance from the typical surprisal
    sorted_shift, sorted_idx = torch.sort(shifted, descending=False)
    cum = x.gather(-1, sorted_idx).softmax(dim=-1).cumsum(dim=-1)  # [R, V]
    last = (cum < _row_values(masses, x, torch.float32)).sum(dim=1)  # [R]
    last.clamp_(max=x.shape[1] - 1)
    remove = sorted_shift > sorted_shift.gather(1, last[:, None])
    remove[:, 0] = False
    remove = remove.scatter(1, sorted_idx, remove)
    return x.masked_fill(remove, NEG_INF)


def argmax(x: Tensor) -> Tensor:
    """x.argmax(-1) of [B, V] logits, the same answer (first maximum, NaN first): on CPU fp32
    one C++ pass, a thread a row (csrc/elementwise.cpp), else torch's."""
    if x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 2 and x.shape[1] > 0 \
            and x.stride(1) == 1:
        kernel = argmax_kernel()
        if kernel is not None:
            return kernel(x)
    return x.argmax(dim=-1)


def _choose(
    x: Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None]
) -> Tensor:
    """x: [B, V] processed logits -> [B] ids: argmax for greedy rows, a draw for the rest."""
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    if not sampled:
        return argmax(x)
    gens = [generators[i] for i in sampled]

    def draw(xs: Tensor) -> Tensor:  # xs: [S, V] -> [S]
        probs = xs.softmax(dim=-1)
        return (probs / _exponential_noise(probs, gens)).argmax(dim=-1)

    if len(sampled) == len(params):
        return draw(x)
    greedy = [i for i, p in enumerate(params) if p.greedy]
    tokens = torch.empty(x.shape[0], dtype=torch.long, device=x.device)  # [B]
    g_idx = _to_device(greedy, torch.long, x.device)
    s_idx = _to_device(sampled, torch.long, x.device)
    tokens[g_idx] = argmax(x[g_idx])
    tokens[s_idx] = draw(x[s_idx])
    return tokens


def _exponential_noise(like: Tensor, gens: list[torch.Generator | None]) -> Tensor:
    """[S, V] Exp(1) noise; row j comes from gens[j] alone, rows with None share one draw."""
    q = torch.empty_like(like)  # [S, V]
    shared = [j for j, g in enumerate(gens) if g is None]
    if len(shared) == len(gens):
        q.exponential_()
    else:
        if shared:
            q[_to_device(shared, torch.long, q.device)] = torch.empty(
                len(shared), q.shape[1], dtype=q.dtype, device=q.device
            ).exponential_()
        for j, g in enumerate(gens):
            if g is not None:
                q[j].exponential_(generator=g)
    # An exact 0 would turn a filtered token's 0/0 into NaN, which argmax would pick.
    return q.clamp_min_(torch.finfo(q.dtype).tiny)


# ---------------------------------------------------------------------------------------------
# Plain per-row reference (the test oracle for `sample`)


def sample_reference(
    logits: Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None] | None = None,
    prev_tokens: Sequence[Tensor | None] | None = None,
    suppress: Sequence[set[int] | None] | None = None,
    top_n: int = 0,
    output_tokens: Sequence[Tensor | None] | None = None,
) -> SampleResult:
    """`sample`, one row at a time, in the plainest torch. Rows with a generator draw exactly
    what `sample` draws; rows without one draw from the default generator row by row."""
    generators = generators or [None] * len(params)
    tokens, chosen, top_ids, top_lps = [], [], [], []
    for i, p in enumerate(params):
        x = logits[i].to(torch.float32, copy=True)  # [V]
        if p.repetition_penalty != 1.0:
            x = ref_repetition_penalty(x, prev_tokens[i], p.repetition_penalty)
        if p.has_output_penalty:
            x = ref_output_penalties(x, output_tokens[i], p.presence_penalty, p.frequency_penalty)
        for t in (suppress[i] if suppress else None) or ():
            if 0 <= t < x.shape[0]:
                x[t] = NEG_INF
        if p.greedy:
            token = x.argmax()
        else:
            x = ref_warp(x, p)
            probs = x.softmax(dim=-1)
            q = torch.empty_like(probs).exponential_(generator=generators[i])
            token = (probs / q.clamp_min(torch.finfo(q.dtype).tiny)).argmax()
        logp = torch.log_softmax(x, dim=-1)
        lp, ids = logp.topk(min(top_n, x.shape[0]))
        tokens.append(token)
        chosen.append(logp[token])
        top_ids.append(ids)
        top_lps.append(lp)
    return SampleResult(
        torch.stack(tokens), torch.stack(chosen), torch.stack(top_ids), torch.stack(top_lps)
    )


def ref_warp(x: Tensor, p: SamplingParams) -> Tensor:
    """One row [V] through temperature, top-k, top-p, typical-p (those that are on)."""
    if p.temperature != 1.0:
        x = x / p.temperature
    if p.top_k > 0:
        x = ref_top_k(x, p.top_k)
    if p.top_p < 1.0:
        x = ref_top_p(x, p.top_p)
    if p.typical_p < 1.0:
        x = ref_typical(x, p.typical_p)
    return x


def ref_repetition_penalty(x: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """x: [V]; each distinct seen id in range: logit / penalty if > 0 else logit * penalty."""
    ids = torch.unique(_ids(seen))
    ids = ids[ids < x.shape[0]].to(x.device)
    x = x.clone()
    v = x[ids]
    x[ids] = torch.where(v < 0, v * penalty, v / penalty)
    return x


def ref_output_penalties(x: Tensor, generated: Tensor, presence: float, frequency: float) -> Tensor:
    """x: [V]; OpenAI's definition, token by token: for each generated id j (in range),
    logit[j] -= count[j] * frequency + presence (presence once per distinct id)."""
    x = x.clone()
    ids = [int(t) for t in _ids(generated) if 0 <= int(t) < x.shape[0]]
    for j in set(ids):
        x[j] = x[j] - ids.count(j) * frequency - presence
    return x


def ref_top_k(x: Tensor, k: int) -> Tensor:
    """x: [V]; -inf below the k-th largest logit."""
    kth = x.sort(descending=True).values[min(k, x.shape[0]) - 1]
    return x.masked_fill(x < kth, NEG_INF)


def ref_top_p(x: Tensor, top_p: float) -> Tensor:
    """x: [V]; walk up from the least likely token, dropping while the mass so far <= 1 - p."""
    vals, order = x.sort()
    cum = vals.softmax(dim=-1).cumsum(dim=-1)
    drop = cum <= 1 - top_p  # [V] in ascending order
    drop[-1] = False  # the most likely token always stays
    return x.index_fill(0, order[drop], NEG_INF)


def ref_typical(x: Tensor, mass: float) -> Tensor:
    """x: [V]; keep the tokens whose surprisal is closest to the entropy, up to `mass`."""
    logp = torch.log_softmax(x, dim=-1)
    ent = -(logp * logp.exp()).nansum()
    shifted = (-logp - ent).abs()
    sorted_shift, order = shifted.sort()
    cum = x[order].softmax(dim=-1).cumsum(dim=-1)
    last = min(int((cum < mass).sum()), x.shape[0] - 1)
    drop = sorted_shift > sorted_shift[last]  # [V] in typicality order
    drop[0] = False  # the most typical token always stays
    return x.index_fill(0, order[drop], NEG_INF)
