"""OpenAI's presence / frequency penalties: the batched sampler against a plain-torch reference
written from OpenAI's definition, and the engine applying them over generated tokens only."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.engine.params import InvalidParams, SamplingParams
from runtime.engine.sampling import generator_for, process_logits, sample, sample_reference

V = 131


def openai_penalised(logits: torch.Tensor, generated: list[int], presence: float,
                     frequency: float) -> torch.Tensor:
    """OpenAI's formula, vectorised the obvious way (independent of sampling.py):
    mu[j] -= c[j] * alpha_frequency + float(c[j] > 0) * alpha_presence."""
    vocab = logits.shape[-1]
    c = torch.bincount(torch.tensor(generated, dtype=torch.long), minlength=vocab).float()[:vocab]
    return logits - c * frequency - (c > 0).float() * presence


def history(seed: int, n: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 12, (n,), generator=g).tolist()  # few distinct ids: many repeats


@pytest.mark.parametrize("presence,frequency", [(0.0, 0.5), (1.5, 0.0), (0.7, -0.3), (-2.0, 2.0)])
def test_greedy_processing_equals_openai_formula(presence, frequency):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, V, generator=g) * 3
    gens = [history(i, n) for i, n in enumerate((0, 5, 17))]
    params = [SamplingParams(presence_penalty=presence, frequency_penalty=frequency)] * 3
    got = process_logits(logits, params, output_tokens=[torch.tensor(h) for h in gens])
    for i in range(3):
        torch.testing.assert_close(got[i], openai_penalised(logits[i], gens[i], presence, frequency))


def test_penalties_count_generated_tokens_only_and_leave_other_rows_alone():
    logits = torch.zeros(2, V)
    params = [SamplingParams(frequency_penalty=1.0), SamplingParams()]
    got = process_logits(logits, params, prev_tokens=[torch.tensor([5, 5, 5]), None],
                         output_tokens=[torch.tensor([7, 7]), None])
    assert got[0, 7] == -2.0 and got[0, 5] == 0.0  # the prompt (prev) does not count
    assert torch.equal(got[1], logits[1])


penalty_st = st.sampled_from([0.0, 0.0, -1.0, 0.4, 2.0])
params_st = st.builds(
    SamplingParams,
    temperature=st.sampled_from([0.0, 0.0, 1.0, 0.7]),
    top_k=st.sampled_from([0, 5]),
    repetition_penalty=st.sampled_from([1.0, 1.3]),
    presence_penalty=penalty_st,
    frequency_penalty=penalty_st,
    seed=st.integers(0, 2**32),
)


@settings(max_examples=50, deadline=None)
@given(params=st.lists(params_st, min_size=1, max_size=7), data_seed=st.integers(0, 2**16))
def test_batched_sample_matches_reference(params, data_seed):
    B = len(params)
    g = torch.Generator().manual_seed(data_seed)
    logits = torch.randn(B, V, generator=g) * 3
    prev = [torch.tensor(history(data_seed + i, 9)) for i in range(B)]
    out = [torch.tensor(history(data_seed + 50 + i, i * 3)) for i in range(B)]
    fast = sample(logits, params, [generator_for(p.seed) for p in params], prev, top_n=3,
                  output_tokens=out)
    ref = sample_reference(logits, params, [generator_for(p.seed) for p in params], prev, top_n=3,
                           output_tokens=out)
    assert torch.equal(fast.tokens, ref.tokens)
    torch.testing.assert_close(fast.logprobs, ref.logprobs)


@pytest.mark.parametrize("field", ["presence_penalty", "frequency_penalty"])
@pytest.mark.parametrize("value", [2.5, -2.01, float("nan"), "1", True])
def test_out_of_range_penalties_name_the_field(field, value):
    with pytest.raises(InvalidParams) as e:
        SamplingParams(**{field: value}).validate()
    assert e.value.field == field


def test_a_penalty_makes_the_row_non_default():
    assert SamplingParams().is_default
    assert not SamplingParams(presence_penalty=0.1).is_default


def test_engine_applies_penalties_over_generated_tokens(tmp_path):
    """The engine's greedy tokens equal a manual loop over the same model's logits with the
    OpenAI formula applied to what was generated so far."""
    from transformers import AutoTokenizer

    from tests.peft_factory import make_tiny_model, make_tiny_tokenizer
    from tests.quiver_factory import QuiverStack

    from runtime.engine.params import StoppingParams
    from runtime.engine.request import GenerationRequest

    hf = make_tiny_model("llama", seed=3)
    q = QuiverStack.from_hf(hf, quant="none")
    engine = q.engine(AutoTokenizer.from_pretrained(make_tiny_tokenizer(tmp_path)))
    prompt = [3, 9, 4, 9]
    sp = SamplingParams(presence_penalty=0.8, frequency_penalty=0.6)
    got = engine.generate([GenerationRequest(list(prompt), sampling=sp,
                                             stopping=StoppingParams(max_new_tokens=12, ignore_eos=True))])
    seq: list[int] = []
    for _ in range(12):
        logits = q.logits(torch.tensor(prompt + seq))[-1]
        seq.append(int(openai_penalised(logits, seq, 0.8, 0.6).argmax()))
    assert got[0].token_ids == seq
    plain = engine.generate([GenerationRequest(list(prompt), stopping=StoppingParams(
        max_new_tokens=12, ignore_eos=True))])
    assert plain[0].token_ids != seq  # the penalty changed something on this prompt
