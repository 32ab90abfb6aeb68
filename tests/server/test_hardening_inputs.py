"""The bad-input matrix (hardening issue, part 1) against a real server with deliberate limits:
each row is answered with the right status and a message naming what to fix, and the very next
good request is served. One table per family: prompt size and length, sampling and stopping
values (NaN anywhere), adapter ids, bytes that are not a valid message, and oversize messages.

Rows already covered on the shared server (test_generation.py: max_new_tokens 0 / -3,
temperature -1 / NaN, top_p 0 / 1.5, top_k -1, repetition_penalty 0, top_n 99, an empty stop
sequence, min > max, time limit 0, out-of-vocabulary ids; test_adapters.py: `../x`, `/etc`, a
symlink at the top of the adapter dir) are not repeated here.
"""
from __future__ import annotations

import math
import shutil

import grpc
import pytest

from runtime.config import ServerConfig
from runtime.server.core import truncate_prompt_ids
from runtime.server.stubs import generation_pb2 as gpb
from tests.server.conftest import words
from tests.server.hardening import assert_still_serving, expect_status, raw_stream, raw_unary, running_server

MAX_NEW = 32
MAX_CHARS = 2000
MAX_BYTES = 64 * 1024
INVALID, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND


@pytest.fixture(scope="module")
def roots(adapter_dir, tmp_path_factory):
    """An adapter dir of this module's own (lora-qv, an inside alias, a symlink leading out, an
    adapter whose weights file links out) and a directory outside every root."""
    own = tmp_path_factory.mktemp("inputs-adapters")
    outside = tmp_path_factory.mktemp("inputs-outside")
    shutil.copytree(adapter_dir / "lora-qv", own / "lora-qv")
    shutil.copytree(adapter_dir / "prompt-4", outside / "prompt-4")
    (own / "alias").symlink_to(own / "lora-qv", target_is_directory=True)
    (own / "link-out").symlink_to(outside, target_is_directory=True)
    (own / "file-link").mkdir()
    shutil.copy(adapter_dir / "lora-qv" / "adapter_config.json", own / "file-link")
    shutil.copy(adapter_dir / "lora-qv" / "adapter_model.safetensors", outside / "weights.safetensors")
    (own / "file-link" / "adapter_model.safetensors").symlink_to(outside / "weights.safetensors")
    return own, outside


@pytest.fixture(scope="module")
def server(tiny_model_dir, roots):
    with running_server(tiny_model_dir, adapter_dir=str(roots[0]), max_new_tokens=MAX_NEW,
                        max_input_chars=MAX_CHARS, max_message_bytes=MAX_BYTES, metrics_port=None) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    from runtime.server.client import QuiverClient

    with QuiverClient(server.address, timeout=60) as q:
        yield q


def _row(client, kwargs: dict, code: grpc.StatusCode, needle: str) -> None:
    kwargs = {"text": "w5 w6", **kwargs}
    expect_status(lambda: client.generate(**kwargs), code, needle)
    assert_still_serving(client)


# ---- prompt size and length -------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, needle", [
    (dict(text=""), "the prompt is empty"),
    (dict(text="   "), "prompt: is empty"),  # tokenizes to nothing
    (dict(text="w5 " * 700), f"at most {MAX_CHARS} (--max-input-chars)"),
    (dict(text="", messages=[("user", "x" * MAX_CHARS)]), "messages: is 2004 characters"),
    (dict(text=words(range(3, 250)), max_new_tokens=20), "set truncate_prompt"),
    (dict(text="", input_ids=[5] * 300, max_new_tokens=1), "exceeds the model's context of 256"),
    (dict(text="", input_ids=[5] * 300, max_new_tokens=1, truncate_input_tokens=260),
     "exceeds the model's context"),  # a cap above the context does not make it fit
])
def test_prompt_size_and_length(client, kwargs, needle):
    _row(client, kwargs, INVALID, needle)


def test_truncation_when_asked(client):
    ids = [3 + i % 120 for i in range(247)]  # with 20 new ones, 11 too many for the 256 context
    fit = client.generate(input_ids=ids, max_new_tokens=20, ignore_eos=True, truncate_prompt=True,
                          return_token_ids=True)
    assert (fit.input_token_count, fit.truncated_input_tokens) == (236, 11)
    tail = client.generate(input_ids=ids[11:], max_new_tokens=20, ignore_eos=True, return_token_ids=True)
    assert [t.id for t in fit.tokens] == [t.id for t in tail.tokens]  # the oldest tokens went
    capped = client.generate(words(ids[:40]), max_new_tokens=3, ignore_eos=True, truncate_input_tokens=5)
    assert (capped.input_token_count, capped.truncated_input_tokens) == (5, 35)
    chunks = list(client.generate_stream(input_ids=ids, max_new_tokens=20, ignore_eos=True,
                                         truncate_prompt=True))
    assert {c.truncated_input_tokens for c in chunks} == {11}  # on every message of a stream
    short = client.generate("w5 w6", max_new_tokens=2, truncate_prompt=True, truncate_input_tokens=10)
    assert (short.input_token_count, short.truncated_input_tokens) == (2, 0)  # nothing to cut


@pytest.mark.parametrize("ids, keep, bos, expected", [
    ([1, 5, 6, 7], 3, 1, [1, 6, 7]),  # BOS stays first and counts
    ([1, 5, 6, 7], 1, 1, [1]),
    ([5, 6, 7], 2, 1, [6, 7]),  # no BOS at the front: just the tail
    ([5, 6, 7], 2, None, [6, 7]),
    ([5, 6, 7], 3, None, [5, 6, 7]),
    ([5, 6, 7], 9, None, [5, 6, 7]),
    ([5, 6, 7], 0, None, []),
])
def test_truncate_prompt_ids(ids, keep, bos, expected):
    assert truncate_prompt_ids(ids, keep, bos) == expected


# ---- sampling and stopping values -------------------------------------------------------------
NAN, INF = math.nan, math.inf


@pytest.mark.parametrize("kwargs, needle", [
    (dict(temperature=INF), "temperature: must be a finite number >= 0"),
    (dict(temperature=-1e-9), "temperature"),
    (dict(top_p=NAN), "top_p: must be in (0, 1]"),
    (dict(top_p=-0.1), "top_p"),
    (dict(top_p=INF), "top_p"),
    (dict(typical_p=0.0), "typical_p: must be in (0, 1]"),
    (dict(typical_p=NAN), "typical_p"),
    (dict(top_k=-(2**31)), "top_k: must be an integer >= 0"),
    (dict(repetition_penalty=-1.0), "repetition_penalty: must be a finite number > 0"),
    (dict(repetition_penalty=NAN), "repetition_penalty"),
    (dict(repetition_penalty=INF), "repetition_penalty"),
    (dict(time_limit_seconds=NAN), "time_limit_s: must be a finite number of seconds > 0"),
    (dict(time_limit_seconds=-1.0), "time_limit_s"),
    (dict(time_limit_seconds=INF), "time_limit_s"),
    (dict(top_n=-1), "top_n: must be an integer in [0, 20]"),
])
def test_sampling_values(client, kwargs, needle):
    _row(client, kwargs, INVALID, needle)


@pytest.mark.parametrize("kwargs, needle", [
    (dict(max_new_tokens=MAX_NEW + 1), f"max_new_tokens: must be an integer in [1, {MAX_NEW}]"),
    (dict(max_new_tokens=2**31 - 1), "max_new_tokens"),
    (dict(max_new_tokens=-(2**31)), "max_new_tokens"),
    (dict(min_new_tokens=-1), "min_new_tokens: must be an integer >= 0"),
    (dict(stop_sequences=["w9"] * 17), "stop_sequences: at most 16 are allowed, got 17"),
    (dict(stop_sequences=["w9", "x" * 257]), "stop_sequences[1]: is 257 characters; at most 256"),
])
def test_stopping_values(client, kwargs, needle):
    _row(client, kwargs, INVALID, needle)


# ---- adapter ids ------------------------------------------------------------------------------
@pytest.mark.parametrize("adapter_id, code, needle", [
    ("no-such-adapter", NOT_FOUND, "is not loaded and there is no directory"),
    ("-rf", NOT_FOUND, "is not loaded"),  # legal characters, just absent
    ("lora-qv/adapter_config.json", NOT_FOUND, "no directory"),  # a file, not an adapter
    ("lora-qv/../../etc", INVALID, "without '.', '..' or empty parts"),
    ("lora-qv/", INVALID, "empty parts"),
    ("a/./b", INVALID, "empty parts"),
    ("%2e%2e/etc", INVALID, "characters outside [A-Za-z0-9._/-]"),
    ("~root", INVALID, "characters outside"),
    ("a\x00b", INVALID, "characters outside"),
    ("a\nb", INVALID, "characters outside"),
    ("lora\u2010qv", INVALID, "characters outside"),  # a Unicode hyphen that looks like '-'
    ("\uff41", INVALID, "characters outside"),  # fullwidth 'a'
    ("x" * 257, INVALID, "must be 1..256 characters"),
    ("link-out/prompt-4", INVALID, "resolves outside the adapter directory"),  # a parent is a link
    ("file-link", INVALID, "links outside the allowed adapter roots"),  # a weights file is a link
])
def test_adapter_ids(client, adapter_id, code, needle):
    _row(client, dict(adapter_id=adapter_id), code, needle)
    assert all(a.adapter_id != adapter_id for a in client.list_adapters())


def test_symlink_that_stays_inside_is_served(client):
    """A link within the adapter dir is fine (confinement is about where the path leads)."""
    a = client.generate("w5 w6", "alias", max_new_tokens=4, ignore_eos=True, return_token_ids=True)
    b = client.generate("w5 w6", "lora-qv", max_new_tokens=4, ignore_eos=True, return_token_ids=True)
    assert [t.id for t in a.tokens] == [t.id for t in b.tokens]


# ---- bytes that are not a valid request ------------------------------------------------------
GENERATE = "/quiver.v1.Generation/Generate"
BAD_UTF8 = b"\xff\xfe"


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (wire type 2); payload under 128 bytes."""
    return bytes([number << 3 | 2, len(payload)]) + payload


@pytest.mark.parametrize("method, payload", [
    (GENERATE, _field(2, BAD_UTF8)),  # text
    (GENERATE, _field(1, b"lora" + BAD_UTF8)),  # adapter_id
    (GENERATE, _field(2, b"w5") + _field(3, _field(3, BAD_UTF8))),  # params.stop_sequences[0]
    (GENERATE, _field(5, _field(1, b"user") + _field(2, BAD_UTF8))),  # messages[0].content
    (GENERATE, b"\x12\x05w5"),  # text's length runs past the end
    (GENERATE, b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff"),  # a varint that never ends
    (GENERATE, b"\x17"),  # wire type 7 does not exist
    ("/quiver.v1.Generation/Tokenize", _field(1, BAD_UTF8)),
    ("/quiver.v1.Adapters/LoadAdapter", _field(2, b"/tmp/" + BAD_UTF8)),  # source
])
def test_malformed_messages_are_invalid_argument(server, client, method, payload):
    with grpc.insecure_channel(server.address) as ch:
        code, details = raw_unary(ch, method, payload)
    assert code == INVALID, (code, details)
    assert f"malformed request for {method}" in details
    assert_still_serving(client)


def test_malformed_stream_request_is_invalid_argument(server, client):
    with grpc.insecure_channel(server.address) as ch:
        code, details = raw_stream(ch, "/quiver.v1.Generation/GenerateStream", _field(2, BAD_UTF8))
    assert code == INVALID and "UTF-8" in details
    assert_still_serving(client)


# ---- oversize messages ------------------------------------------------------------------------
def test_oversize_message_is_resource_exhausted(server, client):
    assert ServerConfig().max_message_bytes == 4 * 1024 * 1024  # the default, on purpose
    big = gpb.GenerateRequest(text="w5 " * (MAX_BYTES // 3 + 10)).SerializeToString()
    assert len(big) > MAX_BYTES
    with grpc.insecure_channel(server.address) as ch:
        for method in (GENERATE, "/quiver.v1.Generation/Tokenize"):
            code, details = raw_unary(ch, method, big)
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (code, details)
            assert "larger than max" in details
        code, _ = raw_stream(ch, "/quiver.v1.Generation/GenerateStream", big)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    # just under the byte limit, but over the character limit: refused before tokenizing
    _row(client, dict(text="w5 " * (MAX_BYTES // 3 - 100)), INVALID, "--max-input-chars")
