"""Stop criteria and stop-sequence hold-back, table-driven, plus a chunking property test."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.engine.detokenize import IncrementalDetokenizer
from runtime.engine.params import StoppingParams, StopReason
from runtime.engine.stopping import StopChecker, find_stop

EOS, TOK = 0, 5  # token ids: the end-of-sequence id, and any ordinary id
STOP, MAX, EOS_R = StopReason.STOP_SEQUENCE, StopReason.MAX_TOKENS, StopReason.EOS_TOKEN

# (name, StoppingParams kwargs, [(token id, text delta, expected emit, expected stop)])
CASES = [
    ("text streams through", {}, [(TOK, "Hello", "Hello", None), (TOK, " world", " world", None)]),
    ("empty delta (incomplete character)", {}, [(TOK, "", "", None), (TOK, "é", "é", None)]),
    ("max_new_tokens", {"max_new_tokens": 2}, [(TOK, "a", "a", None), (TOK, "b", "b", MAX)]),
    ("eos stops and its text is dropped", {}, [(TOK, "a", "a", None), (EOS, "</s>", "", EOS_R)]),
    ("ignore_eos keeps going", {"ignore_eos": True}, [(EOS, "x", "x", None)]),
    (
        "eos does not count until past min_new_tokens",
        {"min_new_tokens": 2},
        [(EOS, "", "", None), (EOS, "", "", None), (EOS, "", "", EOS_R)],
    ),
    ("eos beats max tokens", {"max_new_tokens": 1}, [(EOS, "", "", EOS_R)]),
    (
        "stop sequence inside one token; text after it dropped",
        {"stop_sequences": ["END"]},
        [(TOK, "abENDcd", "ab", STOP)],
    ),
    (
        "stop sequence across tokens is held back, never streamed",
        {"stop_sequences": ["END"]},
        [(TOK, "The E", "The ", None), (TOK, "N", "", None), (TOK, "D.", "", STOP)],
    ),
    (
        "held text is released once it cannot start a stop",
        {"stop_sequences": ["END"]},
        [(TOK, "xE", "x", None), (TOK, "Nd", "ENd", None)],
    ),
    (
        "overlapping prefixes hold only the live tail",
        {"stop_sequences": ["aab"]},
        [(TOK, "a", "", None), (TOK, "a", "", None), (TOK, "a", "a", None), (TOK, "b", "", STOP)],
    ),
    ("include_stop_sequence", {"stop_sequences": ["END"], "include_stop_sequence": True},
     [(TOK, "abENDcd", "abEND", STOP)]),
    ("the stop that ends first wins", {"stop_sequences": ["abc", "b"]}, [(TOK, "abc", "a", STOP)]),
    ("same end: the longest wins", {"stop_sequences": ["bc", "abc"]}, [(TOK, "xabc", "x", STOP)]),
    (
        "stop sequence beats max tokens",
        {"stop_sequences": ["END"], "max_new_tokens": 1},
        [(TOK, "xEND", "x", STOP)],
    ),
    (
        "max tokens releases held text",
        {"stop_sequences": ["END"], "max_new_tokens": 2},
        [(TOK, "aE", "a", None), (TOK, "N", "EN", MAX)],
    ),
    (
        "eos releases held text",
        {"stop_sequences": ["END"]},
        [(TOK, "aE", "a", None), (EOS, "", "E", EOS_R)],
    ),
    (
        "stops below min_new_tokens are text",
        {"stop_sequences": ["x"], "min_new_tokens": 2},
        [(TOK, "x", "x", None), (TOK, "y", "y", None), (TOK, "zx", "z", STOP)],
    ),
    (
        "a stop begun below min_new_tokens counts when it ends past it",
        {"stop_sequences": ["\n\n"], "min_new_tokens": 1},
        [(TOK, "a\n\n", "a\n", None), (TOK, "\n", "", STOP)],
    ),
]


@pytest.mark.parametrize("kwargs,steps", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_stop_checker(kwargs, steps):
    checker = StopChecker(StoppingParams(**kwargs), eos_token_ids={EOS}, clock=lambda: 0.0)
    got = [checker.step(tok, delta) for tok, delta, _, _ in steps]
    assert [(o.emit_text, o.stop) for o in got] == [(e, s) for _, _, e, s in steps]
    assert checker.text == "".join(e for _, _, e, _ in steps)
    assert checker.stop_reason == steps[-1][3]


def test_time_limit_uses_the_injected_clock():
    now = [10.0]
    checker = StopChecker(
        StoppingParams(time_limit_s=1.0, stop_sequences=["END"]), clock=lambda: now[0]
    )
    now[0] = 10.5
    out = checker.step(TOK, "aE")
    assert (out.emit_text, out.stop) == ("a", None)
    assert not checker.time_expired()
    now[0] = 11.0
    assert checker.time_expired()
    out = checker.step(TOK, "N")
    assert (out.emit_text, out.stop) == ("EN", StopReason.TIME_LIMIT)


def test_flush_ends_with_an_outside_reason_and_releases_the_tail():
    checker = StopChecker(StoppingParams(stop_sequences=["END"]))
    assert checker.step(TOK, "okE").emit_text == "ok"
    assert checker.flush(StopReason.CANCELLED) == "E"
    assert checker.stop_reason is StopReason.CANCELLED and checker.text == "okE"
    assert checker.flush(StopReason.ERROR) == ""  # first reason sticks
    with pytest.raises(RuntimeError):
        checker.step(TOK, "more")


def test_eos_is_suppressed_until_min_new_tokens():
    checker = StopChecker(StoppingParams(min_new_tokens=2), eos_token_ids={0, 2})
    assert checker.suppressed_ids() == {0, 2}
    checker.step(TOK, "a")
    assert checker.suppressed_ids() == {0, 2}
    checker.step(TOK, "b")
    assert checker.suppressed_ids() is None


@pytest.mark.parametrize(
    "text,stops,after,want",
    [
        ("hello", ["x"], 0, None),
        ("abcabc", ["bc"], 0, (1, 3)),
        ("abcabc", ["bc"], 3, (4, 6)),  # the first match ended at 3, not beyond it
        ("abcabc", ["c", "abc"], 0, (0, 3)),
        ("xyz", ["yz", "z"], 0, (1, 3)),
    ],
)
def test_find_stop(text, stops, after, want):
    assert find_stop(text, stops, after) == want


def oracle(text: str, stops: list[str], include: bool) -> tuple[str, bool]:
    """Grow the text a character at a time; stop at the first end where any stop matches."""
    for end in range(1, len(text) + 1):
        for s in sorted(stops, key=len, reverse=True):  # same end: the longest
            if text[:end].endswith(s):
                return text[: end if include else end - len(s)], True
    return text, False


@settings(max_examples=300, deadline=None)
@given(
    text=st.text(alphabet="ab\n", max_size=30),
    stops=st.lists(st.text(alphabet="ab\n", min_size=1, max_size=4), min_size=1, max_size=3),
    cuts=st.lists(st.integers(0, 30), max_size=12),
    include=st.booleans(),
)
def test_outcome_does_not_depend_on_how_text_is_split(text, stops, cuts, include):
    bounds = sorted({0, len(text), *(c for c in cuts if c < len(text))})
    chunks = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    checker = StopChecker(
        StoppingParams(stop_sequences=stops, max_new_tokens=100, include_stop_sequence=include)
    )
    streamed = ""
    for chunk in chunks:
        out = checker.step(TOK, chunk)
        streamed += out.emit_text
        final, _ = oracle(text, stops, include)
        assert final.startswith(streamed)  # nothing streamed is ever taken back
        if out.stop:
            break
    if not checker.finished:
        streamed += checker.flush(StopReason.MAX_TOKENS)
    want, stopped = oracle(text, stops, include)
    assert streamed == checker.text == want
    assert (checker.stop_reason is StopReason.STOP_SEQUENCE) == stopped


@pytest.mark.parametrize(
    "text,stops",
    [
        ("Question: what?\nAnswer: 42\n\nQuestion: next", ["\n\n", "Question:"]),
        ("def f():\n    return 1\n```\nmore", ["```"]),
        ("emoji 😀😀 then 你好世界 end", ["😀😀", "世界"]),
        ("no stop in here at all", ["zzz"]),
    ],
)
def test_stop_sequences_on_real_tokens(tokenizer, text, stops):
    """Detokenizer -> checker, as the engine wires them: stops spanning tokens are caught and
    never streamed; the first prefix (of the generated text) that ends in a stop wins."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer)
    checker = StopChecker(StoppingParams(stop_sequences=stops))
    want, stopped = oracle(tokenizer.decode(ids), stops, include=False)
    streamed = ""
    for i in ids:
        out = checker.step(i, detok.push(i))
        streamed += out.emit_text
        assert want.startswith(streamed)
        if out.stop:
            break
    if not checker.finished:
        streamed += checker.flush(StopReason.MAX_TOKENS)
    assert streamed == want and checker.finished
    assert (checker.stop_reason is StopReason.STOP_SEQUENCE) == stopped
