"""The engine loop hands freed heap pages back to the OS once per `trim_interval_s` (glibc's
malloc_trim; a no-op elsewhere), on its own thread, between steps, and requests still finish."""
from __future__ import annotations

import time

import pytest

from runtime.engine.loop import EngineLoop, _malloc_trim
from runtime.engine.params import StoppingParams
from runtime.engine.request import GenerationRequest
from tests.peft_factory import make_tiny_model, make_tiny_tokenizer
from tests.quiver_factory import QuiverStack


@pytest.mark.skipif(_malloc_trim() is None, reason="not glibc")
def test_trims_between_steps(tmp_path):
    from transformers import AutoTokenizer

    stack = QuiverStack.from_hf(make_tiny_model("llama"), slots=1)
    tokenizer = AutoTokenizer.from_pretrained(str(make_tiny_tokenizer(tmp_path / "tok")))
    calls = []
    loop = EngineLoop(stack.engine(tokenizer), trim_interval_s=0.02)
    real = loop._trim
    loop._trim = lambda pad: calls.append(pad) or real(pad)
    loop.start()
    try:
        streams = [loop.submit(GenerationRequest([5, 6, 7], stopping=StoppingParams(
            max_new_tokens=30, ignore_eos=True))) for _ in range(3)]
        outs = [list(s) for s in streams]
        time.sleep(0.1)
    finally:
        loop.stop()
    assert all(o[-1].finished and o[-1].generated_token_count == 30 for o in outs)
    assert calls and all(pad == 0 for pad in calls)
