"""Request-parameter validation: every bad value is refused with a message naming the field."""
from __future__ import annotations

import math

import pytest

from runtime.engine.params import (
    InvalidParams,
    RequestLimits,
    ResponseOptions,
    SamplingParams,
    StoppingParams,
    StopReason,
)

LIMITS = RequestLimits(
    max_new_tokens=100, max_stop_sequences=3, max_stop_sequence_chars=8, max_top_n=5
)

VALID = [
    SamplingParams(),
    SamplingParams(
        temperature=0.7, top_k=50, top_p=0.9, typical_p=0.95, repetition_penalty=1.2, seed=0
    ),
    SamplingParams(temperature=1, top_p=1, seed=2**64 - 1),  # ints are fine where floats are
    StoppingParams(),
    StoppingParams(max_new_tokens=100, min_new_tokens=100, stop_sequences=("a" * 8, "b", "\n")),
    StoppingParams(time_limit_s=0.5, ignore_eos=True),
    ResponseOptions(token_ids=True, logprobs=True, top_n=5, input_tokens=True),
]

# (params, field named in the error)
INVALID = [
    (SamplingParams(temperature=-0.1), "temperature"),
    (SamplingParams(temperature=math.nan), "temperature"),
    (SamplingParams(temperature=math.inf), "temperature"),
    (SamplingParams(top_k=-1), "top_k"),
    (SamplingParams(top_k=2.5), "top_k"),
    (SamplingParams(top_p=0.0), "top_p"),
    (SamplingParams(top_p=1.01), "top_p"),
    (SamplingParams(top_p=math.nan), "top_p"),
    (SamplingParams(typical_p=0.0), "typical_p"),
    (SamplingParams(typical_p=1.5), "typical_p"),
    (SamplingParams(repetition_penalty=0.0), "repetition_penalty"),
    (SamplingParams(repetition_penalty=-1.0), "repetition_penalty"),
    (SamplingParams(repetition_penalty=math.nan), "repetition_penalty"),
    (SamplingParams(seed=-1), "seed"),
    (SamplingParams(seed=2**64), "seed"),
    (StoppingParams(max_new_tokens=0), "max_new_tokens"),
    (StoppingParams(max_new_tokens=101), "max_new_tokens"),
    (StoppingParams(min_new_tokens=-1), "min_new_tokens"),
    (StoppingParams(max_new_tokens=10, min_new_tokens=11), "min_new_tokens"),
    (StoppingParams(stop_sequences=("a", "b", "c", "d")), "stop_sequences"),
    (StoppingParams(stop_sequences=("ok", "")), "stop_sequences[1]"),
    (StoppingParams(stop_sequences=("a" * 9,)), "stop_sequences[0]"),
    (StoppingParams(stop_sequences=(3,)), "stop_sequences[0]"),
    (StoppingParams(time_limit_s=0.0), "time_limit_s"),
    (StoppingParams(time_limit_s=math.nan), "time_limit_s"),
    (ResponseOptions(top_n=6), "top_n"),
    (ResponseOptions(top_n=-1), "top_n"),
]


@pytest.mark.parametrize("params", VALID, ids=repr)
def test_valid_params_pass(params):
    params.validate(LIMITS)


@pytest.mark.parametrize("params,field", INVALID, ids=[repr(p) for p, _ in INVALID])
def test_invalid_params_name_the_field(params, field):
    with pytest.raises(InvalidParams) as err:
        params.validate(LIMITS)
    assert err.value.field == field
    assert str(err.value).startswith(f"{field}: ")
    assert isinstance(err.value, ValueError)


def test_stop_sequences_are_stored_as_a_tuple():
    assert StoppingParams(stop_sequences=["a", "b"]).stop_sequences == ("a", "b")
    assert StoppingParams(stop_sequences="END").stop_sequences == ("END",)
    hash(StoppingParams(stop_sequences=["a"]))  # frozen and hashable


def test_defaults_are_greedy_and_plain():
    assert SamplingParams().greedy and SamplingParams().is_default
    assert not SamplingParams(repetition_penalty=1.1).is_default
    assert StopReason.EOS_TOKEN == "eos_token"
    assert StopReason("time_limit") is StopReason.TIME_LIMIT
