"""Generation through a real server and a real gRPC client: parity under concurrency, streaming,
stop sequences, seeded sampling, response options, and the errors a caller can provoke."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from runtime.server.stubs import generation_pb2 as gpb
from tests.server.conftest import ADAPTERS, words

N_NEW = 8
ALL_ADAPTERS = [""] + list(ADAPTERS)  # "" = base model


def _prompt(i: int) -> list[int]:
    """Distinct prompts of 3..12 tokens (ids 3..127; the tiny model's EOS is 2)."""
    return [3 + (7 * i + 13 * k) % 124 for k in range(3 + i % 10)]


def _greedy(client, adapter_id, ids, n=N_NEW, **kw):
    return client.generate(words(ids), adapter_id, max_new_tokens=n, ignore_eos=True,
                           return_token_ids=True, **kw)


def test_32_concurrent_mixed_adapters_equal_solo_and_peft(client, peft_ref):
    """32 greedy requests over 16 adapters of every type plus the base, all in flight at once
    (8 device slots: adapters wait for and evict each other; half are lazily loaded by these
    very requests). Each equals the same request alone, and PEFT's greedy continuation."""
    jobs = [(ALL_ADAPTERS[i % len(ALL_ADAPTERS)], _prompt(i)) for i in range(32)]
    assert {a for a, _ in jobs} == set(ALL_ADAPTERS)
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda j: _greedy(client, *j), jobs))
    for (adapter_id, ids), resp in zip(jobs, together):
        got = [t.id for t in resp.tokens]
        assert resp.stop_reason == gpb.STOP_REASON_MAX_TOKENS
        assert resp.input_token_count == len(ids) and resp.generated_token_count == N_NEW
        assert got == peft_ref(adapter_id, tuple(ids), N_NEW), adapter_id
        alone = _greedy(client, adapter_id, ids)
        assert [t.id for t in alone.tokens] == got and alone.text == resp.text, adapter_id


def test_stream_concatenates_to_unary_text(client):
    ids = _prompt(3)
    for adapter_id in ("", "team-a/dora-all", "prefix-3", "prompt-4"):
        unary = _greedy(client, adapter_id, ids, n=12)
        chunks = list(client.generate_stream(words(ids), adapter_id, max_new_tokens=12,
                                             ignore_eos=True, return_token_ids=True))
        assert len(chunks) >= 2
        assert "".join(c.text for c in chunks) == unary.text
        assert [t.id for c in chunks for t in c.tokens] == [t.id for t in unary.tokens]
        assert chunks[-1].stop_reason == gpb.STOP_REASON_MAX_TOKENS
        assert all(c.stop_reason == gpb.STOP_REASON_UNSPECIFIED for c in chunks[:-1])
        assert chunks[-1].generated_token_count == 12


def test_stop_sequence_across_token_boundaries(client):
    ids = _prompt(5)
    full = _greedy(client, "lora-qv", ids, n=10).text  # " wA wB wC ..."
    pieces = full.split(" ")
    # a stop string that starts inside the 3rd token and ends inside the 4th
    stop = pieces[3][1:] + " " + pieces[4][:2]
    expected = full[: full.index(stop)]
    unary = client.generate(words(ids), "lora-qv", max_new_tokens=10, ignore_eos=True,
                            stop_sequences=[stop])
    assert unary.stop_reason == gpb.STOP_REASON_STOP_SEQUENCE
    assert unary.text == expected
    chunks = list(client.generate_stream(words(ids), "lora-qv", max_new_tokens=10, ignore_eos=True,
                                         stop_sequences=[stop]))
    assert "".join(c.text for c in chunks) == expected
    assert chunks[-1].stop_reason == gpb.STOP_REASON_STOP_SEQUENCE
    kept = client.generate(words(ids), "lora-qv", max_new_tokens=10, ignore_eos=True,
                           stop_sequences=[stop], include_stop_sequence=True)
    assert kept.text == expected + stop


def test_seeded_sampling_reproducible_across_batch_compositions(client):
    ids = _prompt(7)
    params = dict(max_new_tokens=12, ignore_eos=True, temperature=0.9, top_k=40, top_p=0.95,
                  seed=1234, return_token_ids=True)
    alone = client.generate(words(ids), "team-a/dora-all", **params)

    def busy(i):
        return client.generate(words(_prompt(i)), ALL_ADAPTERS[i % 17], max_new_tokens=10,
                               temperature=1.0, seed=i, ignore_eos=True)

    for others in (3, 9):
        with ThreadPoolExecutor(others + 1) as pool:
            noise = [pool.submit(busy, i) for i in range(others)]
            mine = pool.submit(client.generate, words(ids), "team-a/dora-all", **params)
            [f.result() for f in noise]
        assert [t.id for t in mine.result().tokens] == [t.id for t in alone.tokens]
    other_seed = client.generate(words(ids), "team-a/dora-all", **{**params, "seed": 99})
    assert [t.id for t in other_seed.tokens] != [t.id for t in alone.tokens]


def test_response_options(client):
    ids = _prompt(2)
    r = client.generate(words(ids), "adalora-a", max_new_tokens=5, ignore_eos=True,
                        return_logprobs=True, top_n=3, return_input_tokens=True)
    assert [t.id for t in r.input_tokens] == ids
    assert [t.text for t in r.input_tokens] == [f"w{i}" for i in ids]
    assert len(r.tokens) == 5
    for t in r.tokens:
        assert t.HasField("logprob") and t.logprob <= 0
        assert len(t.top) == 3 and t.top[0].id == t.id  # greedy: the chosen one is the top one
        assert t.top[0].logprob >= t.top[1].logprob >= t.top[2].logprob
    plain = client.generate(words(ids), "adalora-a", max_new_tokens=5, ignore_eos=True)
    assert plain.text == r.text and len(plain.tokens) == 0 and len(plain.input_tokens) == 0
    by_ids = client.generate(input_ids=ids, adapter_id="adalora-a", max_new_tokens=5, ignore_eos=True)
    assert by_ids.text == r.text
    assert r.HasField("time_to_first_token_seconds") and r.time_to_first_token_seconds > 0


def test_tokenize_and_model_info(client, server):
    assert list(client.tokenize("w5 w17 w99").ids) == [5, 17, 99]
    assert list(client.tokenize("w5 w17").tokens) == ["w5", "w17"]
    info = client.model_info()
    assert info.architecture == "llama" and info.quantize == "none" and info.dtype == "float32"
    assert info.max_context_tokens == 256 and info.vocab_size == 128
    assert info.max_device_adapters == 8 and info.max_lora_rank == 8
    assert info.lazy_adapter_loading and info.version


@pytest.mark.parametrize("kwargs, needle", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=-3), "max_new_tokens"),
    (dict(temperature=-1.0), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(top_n=99), "top_n"),
    (dict(stop_sequences=[""]), "stop_sequences[0]"),
    (dict(min_new_tokens=9, max_new_tokens=4), "min_new_tokens"),
    (dict(time_limit_seconds=0.0), "time_limit_s"),
])
def test_bad_parameters_are_invalid_argument(client, kwargs, needle):
    with pytest.raises(grpc.RpcError) as e:
        client.generate("w5 w6", **kwargs)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in e.value.details()


@pytest.mark.parametrize("kwargs, needle", [
    (dict(text=""), "exactly one of"),
    (dict(text="w5", input_ids=[5]), "exactly one of"),
    (dict(text="", input_ids=[5, 500]), "outside the vocabulary"),
    (dict(text=words(range(3, 250)), max_new_tokens=20), "exceeds the model's context of 256"),
    (dict(text=words(range(3, 200)), adapter_id="team-b/prompt-6", max_new_tokens=55),
     "6 adapter virtual tokens"),
    (dict(text="", messages=[("user", "hi")]), "no chat template"),
])
def test_bad_prompts_are_invalid_argument(client, kwargs, needle):
    with pytest.raises(grpc.RpcError) as e:
        client.generate(**kwargs)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in e.value.details()


def test_time_limit(client):
    r = client.generate("w5 w6", max_new_tokens=200, ignore_eos=True, time_limit_seconds=0.05)
    assert r.stop_reason in (gpb.STOP_REASON_TIME_LIMIT, gpb.STOP_REASON_MAX_TOKENS)
    assert r.stop_reason == gpb.STOP_REASON_TIME_LIMIT or r.generated_token_count == 200
