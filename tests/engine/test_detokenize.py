"""Streaming detokenisation on the embedded model's real tokenizer (byte-level BPE).

The oracle is the tokenizer itself: the pieces pushed out one token at a time must join up to
`tokenizer.decode(all_ids)`, and no piece may show a broken character.
"""
from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime.engine.detokenize import IncrementalDetokenizer

FFFD = "\ufffd"

TEXTS = [
    "Hello, world!",
    "  leading spaces and trailing   ",
    "emoji 😀👍🏽 family 👨‍👩‍👧‍👦 flags 🇯🇵🇫🇷",
    "中文测试：你好，世界。日本語のテキスト、한국어",
    "combining: e\u0301 a\u0308 n\u0303 Z\u0351\u0356\u0317",
    "def f(x):\n\treturn x  # tabs\n\n    spaces\r\n",
    "mixed ʕ•ᴥ•ʔ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ∑∫√ ‰ ¿¡ Ω",
    "Zalgo and RTL: שלום مرحبا",
    "",
]


def stream(tok, ids, **kwargs) -> list[str]:
    detok = IncrementalDetokenizer(tok, **kwargs)
    pieces = [detok.push(i) for i in ids]
    return pieces + [detok.finish()]


def decode(tok, ids, skip=True) -> str:
    return tok.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)


@pytest.mark.parametrize("text", TEXTS)
def test_stream_equals_full_decode(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces = stream(tokenizer, ids)
    assert "".join(pieces) == decode(tokenizer, ids)
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)
    assert not any(FFFD in p for p in pieces)


def test_partial_characters_are_held_back(tokenizer):
    ids = tokenizer.encode("Hi 😀", add_special_tokens=False)
    assert len(ids) > 2  # the emoji spans two byte-level tokens
    pieces = stream(tokenizer, ids)
    assert "" in pieces[1:-1] and pieces[-2] == " 😀" and "".join(pieces) == "Hi 😀"


def test_special_tokens_are_skipped_or_shown(tokenizer):
    start, end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    ids = [start] + tokenizer.encode("assistant\nHé 😀", add_special_tokens=False) + [end]
    pieces = stream(tokenizer, ids)
    assert "".join(pieces) == "assistant\nHé 😀"
    assert not any("<|im" in p for p in pieces)
    shown = "".join(stream(tokenizer, ids, skip_special_tokens=False))
    assert shown == decode(tokenizer, ids, skip=False)
    assert shown == "<|im_start|>assistant\nHé 😀<|im_end|>"


def test_prompt_gives_context_but_is_not_emitted(tokenizer):
    prompt = tokenizer.encode("Once upon a time, 你", add_special_tokens=False)
    gen = tokenizer.encode(" 好 there 😀 were", add_special_tokens=False)
    pieces = stream(tokenizer, gen, prompt_ids=prompt)
    whole = decode(tokenizer, prompt + gen)
    assert "".join(pieces) == whole[len(decode(tokenizer, prompt)) :]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.text(max_size=40))
def test_random_unicode_text_streams_exactly(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces = stream(tokenizer, ids)
    full = decode(tokenizer, ids)
    assert "".join(pieces) == full
    if FFFD not in full:
        assert not any(FFFD in p for p in pieces)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(0, 40), skip=st.booleans())
def test_random_token_ids_stream_exactly(tokenizer, seed, n, skip):
    """Arbitrary ids (invalid UTF-8 byte runs, specials anywhere): pieces still join up."""
    rng = random.Random(seed)
    vocab = len(tokenizer)
    # Bias towards ids of single bytes and specials, where byte sequences break most.
    ids = [rng.choice([rng.randrange(vocab), rng.randrange(300), rng.randrange(20)])
           for _ in range(n)]
    pieces = stream(tokenizer, ids, skip_special_tokens=skip)
    assert "".join(pieces) == decode(tokenizer, ids, skip)


class DecodeOnly:
    """A tokenizer with nothing but `decode` (no Rust backend): the plain path."""

    def __init__(self, tok):
        self.decode = tok.decode


def test_tokenizers_without_a_rust_backend_stream_the_same(tokenizer):
    ids = [1] + tokenizer.encode(TEXTS[2] + TEXTS[3], add_special_tokens=False) + [2]
    for skip in (True, False):
        assert stream(DecodeOnly(tokenizer), ids, skip_special_tokens=skip) == stream(
            tokenizer, ids, skip_special_tokens=skip
        )
