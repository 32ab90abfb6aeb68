"""The pure edge helpers, table-driven: pb -> domain parameters, Outputs -> responses, and the
exception -> status table."""
from __future__ import annotations

import grpc
import pytest

from runtime.adapters.registry import AdapterBusy, AdapterNotFound
from runtime.adapters.store import AdapterPathError
from runtime.adapters.types import AdapterFormatError
from runtime.engine.engine import QueueFull
from runtime.engine.loop import ShuttingDown
from runtime.engine.params import InvalidParams, StopReason
from runtime.engine.request import Output, TokenInfo
from runtime.server import convert
from runtime.server.core import RequestFailed, UnknownAdapter
from runtime.server.errors import status_for
from runtime.server.stubs import generation_pb2 as gpb


@pytest.mark.parametrize("params, field, expected", [
    ({}, "top_p", 1.0),  # unset = off
    (dict(top_p=0.0), "top_p", 0.0),  # explicit 0 reaches validation (and is refused there)
    ({}, "typical_p", 1.0),
    ({}, "repetition_penalty", 1.0),
    (dict(repetition_penalty=1.3), "repetition_penalty", pytest.approx(1.3)),
    ({}, "seed", None),
    (dict(seed=0), "seed", 0),
    (dict(seed=2**64 - 1), "seed", 2**64 - 1),
    ({}, "temperature", 0.0),
])
def test_sampling_from_pb(params, field, expected):
    assert getattr(convert.sampling_from_pb(gpb.GenerationParameters(**params)), field) == expected


@pytest.mark.parametrize("params, field, expected", [
    ({}, "max_new_tokens", 64),  # the server default passed in
    (dict(max_new_tokens=0), "max_new_tokens", 0),
    ({}, "time_limit_s", None),
    (dict(time_limit_seconds=2.5), "time_limit_s", 2.5),
    (dict(stop_sequences=["a", "bc"]), "stop_sequences", ("a", "bc")),
])
def test_stopping_from_pb(params, field, expected):
    assert getattr(convert.stopping_from_pb(gpb.GenerationParameters(**params), 64), field) == expected


def _out(text, ids, finished=False, reason=None, n=None):
    return Output("r", text, [TokenInfo(i, f"<{i}>", -0.5, [(i, -0.5), (9, -2.0)]) for i in ids], 3,
                  n or len(ids), finished, reason, None, 0.01, 0.02)


def test_response_folds_outputs_and_honours_options():
    outs = [_out("a", [1]), _out("b", [2], n=2), _out("c", [3], True, StopReason.EOS_TOKEN, n=3)]
    opts = convert.options_from_pb(gpb.GenerationParameters(return_logprobs=True, top_n=1))
    r = convert.response_from_outputs(outs, opts, "req-1")
    assert (r.text, r.input_token_count, r.generated_token_count) == ("abc", 3, 3)
    assert r.stop_reason == gpb.STOP_REASON_EOS_TOKEN and r.request_id == "req-1"
    assert [t.id for t in r.tokens] == [1, 2, 3] and all(len(t.top) == 1 for t in r.tokens)
    assert r.tokens[0].logprob == -0.5
    plain = convert.response_from_outputs(outs[:1], convert.options_from_pb(gpb.GenerationParameters()))
    assert plain.stop_reason == gpb.STOP_REASON_UNSPECIFIED and len(plain.tokens) == 0
    ids_only = convert.response_from_outputs(outs, convert.options_from_pb(gpb.GenerationParameters(return_token_ids=True)))
    assert not ids_only.tokens[0].HasField("logprob") and len(ids_only.tokens[0].top) == 0


@pytest.mark.parametrize("text, tokens, finished, echo, want_tokens, send", [
    ("x", [1], False, False, False, True),
    ("", [1], False, False, False, False),  # held-back text, nothing to show
    ("", [1], False, False, True, True),  # ... unless tokens were asked for
    ("", [], True, False, False, True),  # the last one always goes (stop reason)
    ("", [1], False, True, False, True),  # input tokens still to echo
])
def test_worth_sending(text, tokens, finished, echo, want_tokens, send):
    opts = convert.options_from_pb(gpb.GenerationParameters(return_token_ids=want_tokens))
    out = _out(text, tokens, finished, StopReason.MAX_TOKENS if finished else None)
    assert convert.worth_sending(out, opts, echo_pending=echo) is send


@pytest.mark.parametrize("error, code", [
    (AdapterNotFound("a"), grpc.StatusCode.NOT_FOUND),
    (UnknownAdapter("a", "there is no directory"), grpc.StatusCode.NOT_FOUND),
    (InvalidParams("top_p", "must be in (0, 1]"), grpc.StatusCode.INVALID_ARGUMENT),
    (AdapterFormatError("bad"), grpc.StatusCode.INVALID_ARGUMENT),
    (AdapterPathError("outside"), grpc.StatusCode.INVALID_ARGUMENT),
    (QueueFull("full"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (AdapterBusy("busy"), grpc.StatusCode.FAILED_PRECONDITION),
    (ShuttingDown("bye"), grpc.StatusCode.UNAVAILABLE),
    (TimeoutError("slow"), grpc.StatusCode.DEADLINE_EXCEEDED),
    (RequestFailed("engine"), grpc.StatusCode.INTERNAL),
    (ZeroDivisionError("x"), grpc.StatusCode.INTERNAL),
])
def test_status_for(error, code):
    got, message = status_for(error)
    assert got == code
    if code is grpc.StatusCode.INTERNAL and not isinstance(error, RequestFailed):
        assert message == "internal error (see the server log)"  # no internals leak
    else:
        assert message == str(error)


def test_unknown_adapter_message():
    assert str(UnknownAdapter("x/y", "there is no directory 'x/y' in the adapter dir")) == \
        "adapter 'x/y' is not loaded and there is no directory 'x/y' in the adapter dir"
