"""Fuzzing a live server (hardening issue, part 6): hypothesis-made GenerateRequests (any field
value: NaN, infinities, huge and negative integers, Unicode, empty, random adapter ids), and raw
bytes sent where a serialized request belongs (random, and valid requests with bytes flipped).

Every answer must come within its deadline and be OK or a client-error status (never UNKNOWN or
INTERNAL, never a hang); the server is healthy and idle afterwards. Derandomized so that the
suite sees the same examples on every run (`--hypothesis-seed` explores others).
"""
from __future__ import annotations

import math
import shutil

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime.server.stubs import generation_pb2 as gpb
from tests.server.conftest import wait_until
from tests.server.hardening import CLIENT_ERROR_CODES, assert_still_serving, raw_stream, raw_unary, running_server

ALLOWED = CLIENT_ERROR_CODES | {grpc.StatusCode.OK}
DEADLINE_S = 20.0
FUZZ = settings(max_examples=35, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
GENERATE, STREAM = "/quiver.v1.Generation/Generate", "/quiver.v1.Generation/GenerateStream"


@pytest.fixture(scope="module")
def server(tiny_model_dir, adapter_dir, tmp_path_factory):
    own = tmp_path_factory.mktemp("fuzz-adapters")
    for name in ("lora-qv", "prompt-4", "prefix-3"):
        shutil.copytree(adapter_dir / name, own / name)
    with running_server(tiny_model_dir, adapter_dir=str(own), max_new_tokens=8, max_input_chars=4096,
                        max_message_bytes=64 * 1024, max_queue=64, metrics_port=None) as srv:
        yield srv


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.address) as ch:
        yield ch


int32 = st.integers(-(2**31), 2**31 - 1)
float32 = st.floats(width=32, allow_nan=True, allow_infinity=True)

#: Values a client may well send: these requests mostly run, and reach the engine.
sane = st.fixed_dictionaries({}, optional=dict(
    max_new_tokens=st.integers(1, 8), min_new_tokens=st.integers(0, 2),
    stop_sequences=st.lists(st.sampled_from(["w7", "w1 w", "\n", "é"]), max_size=3),
    time_limit_seconds=st.floats(0.01, 5), ignore_eos=st.booleans(), include_stop_sequence=st.booleans(),
    temperature=st.floats(0, 2, width=32), top_k=st.integers(0, 50), top_p=st.floats(0.25, 1, width=32),
    typical_p=st.floats(0.25, 1, width=32), repetition_penalty=st.floats(0.5, 2, width=32),
    seed=st.integers(0, 2**64 - 1), return_token_ids=st.booleans(), return_logprobs=st.booleans(),
    top_n=st.integers(0, 5), return_input_tokens=st.booleans(), truncate_input_tokens=st.integers(0, 20),
    truncate_prompt=st.booleans(),
))
#: Anything the wire types can carry.
wild = st.fixed_dictionaries({}, optional=dict(
    max_new_tokens=int32, min_new_tokens=int32, stop_sequences=st.lists(st.text(max_size=300), max_size=20),
    time_limit_seconds=st.floats(allow_nan=True, allow_infinity=True), ignore_eos=st.booleans(),
    temperature=float32, top_k=int32, top_p=float32, typical_p=float32, repetition_penalty=float32,
    seed=st.integers(0, 2**64 - 1), top_n=int32, truncate_input_tokens=st.integers(0, 2**32 - 1),
    truncate_prompt=st.booleans(),
))
adapter_ids = st.one_of(st.sampled_from(["", "lora-qv", "prompt-4", "prefix-3", "nope", "../x", "lora-qv/.."]),
                        st.text(max_size=40))
prompt_words = st.lists(st.integers(0, 130).map(lambda i: f"w{i}"), max_size=40).map(" ".join)
texts = st.one_of(prompt_words, st.text(max_size=300))
ids = st.one_of(st.lists(st.integers(0, 127), max_size=20), st.lists(st.integers(0, 2**32 - 1), max_size=300))
messages = st.lists(st.tuples(st.text(max_size=10), st.text(max_size=50)), max_size=3)
#: (text, input_ids, messages): usually exactly one of them, sometimes any mix
prompts = st.one_of(texts.map(lambda t: (t, [], [])), ids.map(lambda i: ("", i, [])),
                    messages.map(lambda m: ("", [], m)), st.tuples(texts, ids, messages))
requests = st.builds(
    lambda adapter_id, prompt, p: gpb.GenerateRequest(
        adapter_id=adapter_id, text=prompt[0], input_ids=prompt[1], params=gpb.GenerationParameters(**p),
        messages=[gpb.ChatMessage(role=r, content=c) for r, c in prompt[2]]),
    adapter_ids, prompts, st.one_of(sane, wild),
)


def _check(code: grpc.StatusCode, details: str) -> None:
    assert code in ALLOWED, (code, details)


@FUZZ
@given(request=requests, streaming=st.booleans())
def test_fuzzed_requests_get_a_valid_status(channel, request, streaming):
    payload = request.SerializeToString()
    if streaming:
        _check(*raw_stream(channel, STREAM, payload, timeout=DEADLINE_S))
    else:
        _check(*raw_unary(channel, GENERATE, payload, timeout=DEADLINE_S))


valid_payload = gpb.GenerateRequest(
    adapter_id="lora-qv", text="w5 w6 w7", params=gpb.GenerationParameters(
        max_new_tokens=3, stop_sequences=["w9"], temperature=0.5, seed=3, top_p=0.9)).SerializeToString()


@st.composite
def flipped(draw) -> bytes:
    """A valid request with a few bytes replaced (lengths, tags, UTF-8 and floats go wrong)."""
    data = bytearray(valid_payload)
    for _ in range(draw(st.integers(1, 4))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data)


@FUZZ
@given(payload=st.one_of(st.binary(max_size=512), flipped()),
       method=st.sampled_from([GENERATE, STREAM, "/quiver.v1.Generation/Tokenize",
                               "/quiver.v1.Adapters/LoadAdapter"]))
def test_random_bytes_get_a_valid_status(channel, payload, method):
    call = raw_stream if method == STREAM else raw_unary
    _check(*call(channel, method, payload, timeout=DEADLINE_S))


def test_server_healthy_after_fuzzing(server, channel):
    """Runs after the two fuzz tests (file order): still SERVING, idle, and answering."""
    from runtime.server.client import QuiverClient

    status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert status.status == health_pb2.HealthCheckResponse.SERVING
    engine = server.core.engine
    assert wait_until(lambda: not engine.running and engine.num_queued() == 0 and engine.cache.used_blocks == 0,
                      timeout=10)
    with QuiverClient(server.address, timeout=30) as q:
        assert_still_serving(q)
        assert_still_serving(q, "lora-qv")
    assert not math.isnan(engine.cache.usage())
