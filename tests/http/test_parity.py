"""The official openai client against the real HTTP port: the same answers as gRPC for the same
request and seed, for the base and an adapter of every type, and PEFT's greedy tokens (fp32)."""
from __future__ import annotations

import asyncio

import openai
import pytest

from tests.http.conftest import BASE_ID, TYPES, base_url

pytestmark = pytest.mark.slow
MODELS = ["", *TYPES.values()]  # "" = the base model
PROMPT_IDS = [5, 17, 9, 33, 2, 71]


def model_name(adapter: str) -> str:
    return adapter or BASE_ID


def ids_of(tokens: list[str]) -> list[int]:
    """The tiny word-level vocabulary: token text ' w41' is id 41."""
    return [int(t.strip()[1:]) for t in tokens]


@pytest.mark.parametrize("adapter", MODELS)
def test_completion_equals_grpc_with_the_same_seed(openai_client, grpc_client, adapter):
    text = "w5 w17 w9 w33"
    got = openai_client.completions.create(model=model_name(adapter), prompt=text, max_tokens=10,
                                           temperature=0.9, top_p=0.95, seed=1234,
                                           extra_body={"top_k": 40, "ignore_eos": True})
    want = grpc_client.generate(text, adapter, max_new_tokens=10, temperature=0.9, top_p=0.95,
                                seed=1234, top_k=40, ignore_eos=True)
    assert got.choices[0].text == want.text
    assert got.choices[0].finish_reason == "length"
    assert got.usage.prompt_tokens == want.input_token_count
    assert got.usage.completion_tokens == want.generated_token_count == 10


@pytest.mark.parametrize("adapter", MODELS)
def test_chat_equals_grpc_chat_and_streams_the_same_text(openai_client, grpc_client, adapter):
    messages = [{"role": "system", "content": "w8 w9"}, {"role": "user", "content": "w20 w21 w22"}]
    kw = dict(model=model_name(adapter), messages=messages, max_tokens=8, temperature=0.7, seed=99)
    got = openai_client.chat.completions.create(**kw)
    want = grpc_client.generate(adapter_id=adapter, messages=[("system", "w8 w9"), ("user", "w20 w21 w22")],
                                max_new_tokens=8, temperature=0.7, seed=99)
    assert got.choices[0].message.content == want.text
    assert got.choices[0].message.role == "assistant"
    chunks = list(openai_client.chat.completions.create(**kw, stream=True,
                                                        stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == want.text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == want.generated_token_count
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == got.choices[0].finish_reason


@pytest.mark.parametrize("adapter", MODELS)
def test_greedy_tokens_equal_peft(openai_client, peft_ref, adapter):
    """Token-id prompt, greedy, no EOS stop: the tokens reported equal PEFT's own forward."""
    got = openai_client.completions.create(model=model_name(adapter), prompt=PROMPT_IDS, max_tokens=8,
                                           temperature=0, logprobs=0, extra_body={"ignore_eos": True})
    assert ids_of(got.choices[0].logprobs.tokens) == peft_ref(adapter, tuple(PROMPT_IDS), 8)


def test_async_client_streaming_and_not(http_server, grpc_client):
    adapter = TYPES["prefix_tuning"]
    want = grpc_client.generate("w3 w4 w5", adapter, max_new_tokens=6, temperature=1.0, seed=5)

    async def run():
        async with openai.AsyncOpenAI(base_url=base_url(http_server), api_key="x", max_retries=0) as c:
            kw = dict(model=adapter, prompt="w3 w4 w5", max_tokens=6, temperature=1.0, seed=5)
            plain = await c.completions.create(**kw)
            stream = await c.completions.create(**kw, stream=True)
            text = "".join([ch.choices[0].text async for ch in stream])
            both = await asyncio.gather(*(c.completions.create(**kw) for _ in range(4)))
            return plain.choices[0].text, text, [b.choices[0].text for b in both]

    plain, streamed, concurrent = asyncio.run(run())
    assert plain == streamed == want.text
    assert concurrent == [want.text] * 4  # a seeded request answers the same whatever the batch


def test_n_choices_derive_their_seeds(openai_client):
    kw = dict(model=TYPES["lora"], max_tokens=6, temperature=1.0)
    many = openai_client.completions.create(**kw, prompt="w9 w10", n=3, seed=40)
    assert [c.index for c in many.choices] == [0, 1, 2]
    for j, choice in enumerate(many.choices):  # choice j samples as a lone request with seed + j
        alone = openai_client.completions.create(**kw, prompt="w9 w10", seed=40 + j)
        assert choice.text == alone.choices[0].text
    assert many.usage.prompt_tokens == 2  # a prompt counts once however many choices
    two = openai_client.completions.create(**kw, prompt=["w9 w10", "w11"], n=2, seed=40)
    assert len(two.choices) == 4 and two.choices[0].text == many.choices[0].text
    assert two.usage.prompt_tokens == 3


def test_chat_logprobs_are_the_engines(openai_client, grpc_client):
    adapter = TYPES["dora"]
    got = openai_client.chat.completions.create(
        model=adapter, messages=[{"role": "user", "content": [{"type": "text", "text": "w40"},
                                                              {"type": "text", "text": " w41"}]}],
        max_tokens=5, temperature=0, logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    want = grpc_client.generate(adapter_id=adapter, messages=[("user", "w40 w41")], max_new_tokens=5,
                                return_logprobs=True, top_n=3, ignore_eos=True)
    content = got.choices[0].logprobs.content
    assert "".join(c.token for c in content) == got.choices[0].message.content == want.text
    for c, t in zip(content, want.tokens):
        assert c.logprob == pytest.approx(t.logprob, abs=1e-6)
        assert [a.logprob for a in c.top_logprobs] == pytest.approx([a.logprob for a in t.top], abs=1e-6)
        assert bytes(c.bytes).decode() == c.token
        assert c.top_logprobs[0].logprob >= c.top_logprobs[-1].logprob


def test_completion_logprobs_legacy_shape_and_echo(openai_client):
    got = openai_client.completions.create(model=BASE_ID, prompt="w7 w8", max_tokens=4, temperature=0,
                                           logprobs=2, extra_body={"ignore_eos": True})
    lp = got.choices[0].logprobs
    text = got.choices[0].text
    assert "".join(lp.tokens) == text and len(lp.token_logprobs) == 4
    assert [text[o:o + len(t)] for o, t in zip(lp.text_offset, lp.tokens)] == lp.tokens
    assert all(len(alts) == 2 and max(alts.values()) >= lp.token_logprobs[i] - 1e-6
               for i, alts in enumerate(lp.top_logprobs))
    echoed = openai_client.completions.create(model=BASE_ID, prompt="w7 w8", max_tokens=4, temperature=0,
                                              echo=True, extra_body={"ignore_eos": True})
    assert echoed.choices[0].text == "w7 w8" + text


def test_stop_sequences_and_min_tokens(openai_client):
    kw = dict(model=BASE_ID, prompt="w12 w13", temperature=0, extra_body={"ignore_eos": True})
    free = openai_client.completions.create(**kw, max_tokens=6).choices[0].text
    words = free.split()
    stop = " " + words[2]  # the third word's first occurrence
    cut = openai_client.completions.create(**kw, max_tokens=6, stop=[stop, "w999"]).choices[0]
    assert cut.finish_reason == "stop" and cut.text == free[:free.index(stop)]
    assert stop not in cut.text


def test_penalties_reach_the_sampler(openai_client):
    kw = dict(model=BASE_ID, prompt="w5 w6 w7", max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    plain = openai_client.completions.create(**kw).choices[0].text.split()
    penalised = openai_client.completions.create(**kw, frequency_penalty=2.0, presence_penalty=2.0)
    words = penalised.choices[0].text.split()
    assert len(set(words)) > len(set(plain))  # repeats are what the penalties push down
