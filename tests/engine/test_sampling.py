"""The batched sampler against transformers' own logits processors and the per-row reference."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from runtime.engine import sampling
from runtime.engine.params import SamplingParams
from runtime.engine.sampling import (
    generator_for,
    process_logits,
    ref_repetition_penalty,
    ref_top_k,
    ref_top_p,
    ref_typical,
    sample,
    sample_reference,
)

V = 257  # small odd vocabulary: fast, and not a power of two


def random_logits(B: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, V, generator=g) * scale  # [B, V]


def random_prev(B: int, seed: int) -> list[torch.Tensor]:
    """Token histories of varied length, with repeats and one id beyond the vocabulary."""
    g = torch.Generator().manual_seed(seed)
    return [
        torch.cat([torch.randint(0, V, (int(n),), generator=g), torch.tensor([V + 3])])
        for n in torch.randint(0, 40, (B,), generator=g)
    ]


def hf_processors(p: SamplingParams, banned: set[int] | None) -> LogitsProcessorList:
    """What HF `generate` builds for these params, in its order (`_get_logits_processor`)."""
    procs = LogitsProcessorList()
    if p.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(float(p.repetition_penalty)))
    if banned:
        procs.append(SuppressTokensLogitsProcessor(sorted(banned)))
    if not p.greedy:  # do_sample=True: the warpers
        if p.temperature != 1.0:
            procs.append(TemperatureLogitsWarper(float(p.temperature)))
        if p.top_k:
            procs.append(TopKLogitsWarper(p.top_k))
        if p.top_p < 1.0:
            procs.append(TopPLogitsWarper(p.top_p))
        if p.typical_p < 1.0:
            procs.append(TypicalLogitsWarper(p.typical_p))
    return procs


def hf_process(logits, params, prev, suppress) -> torch.Tensor:
    rows = []
    for i, p in enumerate(params):
        rows.append(hf_processors(p, suppress[i])(prev[i][None], logits[i : i + 1].clone()))
    return torch.cat(rows)  # [B, V]


# One processor at a time, mixed with rows that leave it off: (HF class, params for row i).
SINGLE = {
    "repetition_penalty": lambda i: SamplingParams(repetition_penalty=[1.0, 1.3, 0.7, 2.0][i % 4]),
    "temperature": lambda i: SamplingParams(temperature=[1.0, 0.3, 1.7, 0.05][i % 4]),
    "top_k": lambda i: SamplingParams(temperature=1.0, top_k=[0, 1, 5, 40, V, V + 9][i % 6]),
    "top_p": lambda i: SamplingParams(temperature=1.0, top_p=[1.0, 0.05, 0.5, 0.9, 0.999][i % 5]),
    "typical_p": lambda i: SamplingParams(temperature=1.0, typical_p=[1.0, 0.05, 0.5, 0.9][i % 4]),
}


@pytest.mark.parametrize("name", SINGLE)
def test_each_processor_matches_transformers(name):
    B = 12
    logits, prev = random_logits(B, 1), random_prev(B, 2)
    params = [SINGLE[name](i) for i in range(B)]
    want = hf_process(logits, params, prev, [None] * B)
    assert torch.equal(process_logits(logits, params, prev), want)


@pytest.mark.parametrize(
    "ref,hf",
    [
        (lambda x, s: ref_repetition_penalty(x, s, 1.4), RepetitionPenaltyLogitsProcessor(1.4)),
        (lambda x, s: ref_top_k(x, 7), TopKLogitsWarper(7)),
        (lambda x, s: ref_top_p(x, 0.8), TopPLogitsWarper(0.8)),
        (lambda x, s: ref_typical(x, 0.6), TypicalLogitsWarper(0.6)),
    ],
    ids=["repetition_penalty", "top_k", "top_p", "typical_p"],
)
def test_reference_rows_match_transformers(ref, hf):
    logits, prev = random_logits(6, 3), random_prev(6, 4)
    for i in range(6):
        want = hf(prev[i][None], logits[i : i + 1].clone())[0]
        assert torch.equal(ref(logits[i], prev[i]), want)


params_st = st.builds(
    SamplingParams,
    temperature=st.sampled_from([0.0, 0.0, 1.0, 0.5, 1.3, 0.01]),
    top_k=st.sampled_from([0, 0, 1, 3, 50, V + 1]),
    top_p=st.sampled_from([1.0, 1.0, 0.1, 0.7, 0.95]),
    typical_p=st.sampled_from([1.0, 1.0, 0.2, 0.9]),
    repetition_penalty=st.sampled_from([1.0, 1.0, 1.2, 0.8]),
    seed=st.integers(0, 2**63),
)


@settings(max_examples=60, deadline=None)
@given(
    params=st.lists(params_st, min_size=1, max_size=9),
    data_seed=st.integers(0, 2**16),
    ban=st.lists(st.sets(st.integers(0, V - 1), max_size=3) | st.none(), min_size=9, max_size=9),
)
def test_processing_matches_transformers_pipeline(params, data_seed, ban):
    B = len(params)
    logits, prev = random_logits(B, data_seed), random_prev(B, data_seed + 1)
    suppress = ban[:B]
    want = hf_process(logits, params, prev, suppress)
    assert torch.equal(process_logits(logits, params, prev, suppress), want)


@settings(max_examples=60, deadline=None)
@given(
    params=st.lists(params_st, min_size=1, max_size=9),
    data_seed=st.integers(0, 2**16),
    top_n=st.sampled_from([0, 1, 5]),
)
def test_sample_matches_reference(params, data_seed, top_n):
    B = len(params)
    logits, prev = random_logits(B, data_seed), random_prev(B, data_seed + 1)
    suppress = [{0, 1} if i % 2 else None for i in range(B)]
    fast = sample(logits, params, [generator_for(p.seed) for p in params], prev, suppress, top_n)
    ref = sample_reference(
        logits, params, [generator_for(p.seed) for p in params], prev, suppress, top_n
    )
    assert torch.equal(fast.tokens, ref.tokens)
    torch.testing.assert_close(fast.logprobs, ref.logprobs)
    torch.testing.assert_close(fast.top_logprobs, ref.top_logprobs)
    finite = ref.top_logprobs.isfinite()  # ids of -inf alternatives are an arbitrary tie-break
    assert torch.equal(fast.top_ids[finite], ref.top_ids[finite])
    assert fast.tokens.shape == (B,) and fast.top_ids.shape == (B, top_n)
    assert fast.logprobs.isfinite().all()  # a chosen token is never a filtered one


def run_steps(row: int, params: list[SamplingParams], seeds: list[int | None], steps: int = 6):
    """Sample `steps` tokens for a whole batch; return the tokens of `row`."""
    gens = [generator_for(s) for s in seeds]
    out = []
    for step in range(steps):
        logits = random_logits(len(params), 100 + step, scale=1.0)
        logits[row] = random_logits(1, 200 + step, scale=1.0)[0]  # the watched request's logits
        out.append(int(sample(logits, params, gens).tokens[row]))
    return out


def test_seeded_request_is_reproducible_whatever_the_batch():
    watched = SamplingParams(temperature=1.0, top_p=0.9, seed=1234)
    alone = run_steps(0, [watched], [1234])
    others = [
        SamplingParams(),
        SamplingParams(temperature=0.8, top_k=5),
        SamplingParams(temperature=1.0, typical_p=0.5, seed=7),
        SamplingParams(temperature=1.5),
    ]
    for row in (0, 2, 4):
        batch = others[:row] + [watched] + others[row:]
        seeds = [p.seed for p in batch]
        assert run_steps(row, batch, seeds) == alone
    assert run_steps(0, [watched], [1235]) != alone  # and the seed matters


def test_greedy_is_argmax_after_penalty_and_suppression():
    logits = torch.tensor([[1.0, 3.0, 2.9, -1.0], [1.0, 3.0, 2.9, -1.0], [1.0, 3.0, 2.9, -1.0]])
    params = [SamplingParams(), SamplingParams(repetition_penalty=1.1), SamplingParams()]
    prev = [torch.tensor([1]), torch.tensor([1]), torch.tensor([1])]
    out = sample(logits, params, [None] * 3, prev, [None, None, {1, 2}], top_n=2)
    assert out.tokens.tolist() == [1, 2, 0]
    want = torch.log_softmax(torch.tensor([1.0, 3.0, 2.9, -1.0]), -1)
    torch.testing.assert_close(out.logprobs[0], want[1])
    assert out.top_ids[2].tolist() == [0, 3]  # suppressed ids are gone from the alternatives


def test_logprobs_are_of_the_truncated_distribution():
    logits = torch.tensor([[4.0, 3.0, 1.0, 0.0, -2.0]])
    out = sample(logits, [SamplingParams(temperature=0.5, top_k=2)], [generator_for(0)], top_n=4)
    assert set(out.top_ids[0, :2].tolist()) == {0, 1}
    torch.testing.assert_close(out.top_logprobs[0, :2].exp().sum(), torch.tensor(1.0))
    assert torch.isneginf(out.top_logprobs[0, 2:]).all()
    assert out.tokens[0] in (0, 1)


@pytest.mark.parametrize("seeded", [False, True], ids=["shared-draw", "per-row-generator"])
def test_draw_frequencies_follow_the_distribution(seeded):
    """Gumbel-max draws land on each token with its processed probability."""
    n = 4000
    base = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    p = SamplingParams(temperature=0.8, top_k=5)
    logits = base.expand(n, -1).clone()  # [n, 6]
    gens = [generator_for(i) for i in range(n)] if seeded else [None] * n
    torch.manual_seed(0)
    tokens = sample(logits, [p] * n, gens).tokens
    want = torch.softmax(ref_top_k(base / 0.8, 5), -1)
    freq = torch.bincount(tokens, minlength=6).float() / n
    assert freq[5] == 0  # outside top-k
    assert (freq - want).abs().max() < 0.03  # ~4 standard errors at n=4000


def test_half_precision_logits_are_processed_in_float32():
    logits = random_logits(4, 9).to(torch.bfloat16)
    params = [SamplingParams(), SamplingParams(temperature=0.7, top_p=0.8, seed=1)] * 2
    out = sample(logits, params, [generator_for(p.seed) for p in params])
    assert out.logprobs.dtype == torch.float32
    assert out.tokens[0] == logits[0].float().argmax()


def test_only_rows_that_need_a_sort_pay_for_one(monkeypatch):
    """Greedy, temperature-only and top-k rows never sort; top-p rows sort just themselves."""
    calls = []
    real_sort = torch.sort

    def counting_sort(x, *args, **kwargs):
        calls.append(tuple(x.shape))
        return real_sort(x, *args, **kwargs)

    monkeypatch.setattr(torch, "sort", counting_sort)
    cheap = [
        SamplingParams(),
        SamplingParams(temperature=0.7),
        SamplingParams(temperature=1.0, top_k=20),
    ]
    logits = random_logits(30, 5)
    sample(logits, cheap * 10, [None] * 30)
    assert calls == []
    sample(logits, cheap * 9 + [SamplingParams(temperature=1.0, top_p=0.9)] * 3, [None] * 30)
    assert calls == [(3, V)]



@pytest.mark.parametrize("shape", [(1, 49152), (32, 49152), (5, 37), (3, 1), (4, 16)])
def test_argmax_is_torch_argmax(shape):
    """The greedy argmax (one C++ pass on CPU) gives torch's answer: ties to the first maximum,
    a NaN anywhere wins (the first one), rows of -inf pick 0, over a row-strided view too."""
    g = torch.Generator().manual_seed(shape[0] * shape[1])
    wide = torch.randint(-3, 4, (shape[0], shape[1] + 5), generator=g).float()  # many ties
    x = wide[:, 2:2 + shape[1]]
    if shape[1] > 3:
        x[0, 1] = x[0, -1] = float("inf")
        x[-1] = float("-inf")
    if shape[0] > 2 and shape[1] > 5:
        x[1, 4] = x[1, 2] = float("nan")
    assert torch.equal(sampling.argmax(x), x.argmax(dim=-1))


def test_no_logprobs_asked_skips_them_and_keeps_the_tokens():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 300, generator=g)
    params = [SamplingParams()] * 3 + [SamplingParams(temperature=0.8, top_k=20, seed=s) for s in range(3)]
    gens = lambda: [generator_for(p.seed) for p in params]  # noqa: E731
    full = sample(logits, params, gens())
    lean = sample(logits, params, gens(), logprobs=False)
    assert torch.equal(full.tokens, lean.tokens)
    assert torch.equal(lean.logprobs, torch.zeros(6)) and lean.top_ids.shape == (6, 0)
    assert (full.logprobs < 0).all()
    with_top = sample(logits, params, gens(), top_n=2, logprobs=False)  # top_n needs them anyway
    assert torch.equal(with_top.logprobs, full.logprobs)
