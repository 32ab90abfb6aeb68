"""The soak test, shortened for the suite (hardening issue, part 5): scripts/soak.py's own code,
20 streams for 40 s over 8 adapters (4 device slots) on the tiny model, with random cancellations,
deadlines, time limits, adapter unloads / loads and provoked failures. The full one is
`python scripts/soak.py` (200 streams, 10 minutes, 50 adapters, the embedded model).
"""
from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path

import pytest

SOAK = Path(__file__).resolve().parents[2] / "scripts" / "soak.py"


@functools.cache
def _soak_module():
    spec = importlib.util.spec_from_file_location("quiver_soak", SOAK)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_short_soak(tiny_model_dir):
    soak = _soak_module()
    report = soak.run(["--model", str(tiny_model_dir), "--quantize", "none", "--dtype", "float32",
                       "--device", "cpu", "--streams", "20", "--duration", "40", "--warmup", "6",
                       "--adapters", "8", "--device-slots", "4", "--max-new-tokens", "24",
                       "--churn-interval", "2", "--seed", "1"])
    print(report.summary())
    assert report.ok, report.summary()
    t = report.tally
    assert sum(t.completed.values()) > 100 and t.cancelled > 0 and t.provoked > 0
    assert t.churn["unload"] > 0 and t.churn["dynamic"] > 0


def _msg(n_tokens: int, total: int, reason: str = "UNSPECIFIED"):
    from runtime.server.stubs import generation_pb2 as gpb

    return gpb.GenerateResponse(tokens=[gpb.Token(id=5)] * n_tokens, generated_token_count=total,
                                stop_reason=gpb.StopReason.Value(f"STOP_REASON_{reason}"))


@pytest.mark.parametrize("params, messages, wrong", [
    (dict(max_new_tokens=3, ignore_eos=True), [_msg(2, 2), _msg(1, 3, "MAX_TOKENS")], None),
    (dict(max_new_tokens=3, ignore_eos=False), [_msg(1, 1, "EOS_TOKEN")], None),
    (dict(max_new_tokens=3, ignore_eos=True, stop_sequences=["w1"]), [_msg(2, 2, "STOP_SEQUENCE")], None),
    (dict(max_new_tokens=9, ignore_eos=True, time_limit_seconds=0.1), [_msg(2, 2, "TIME_LIMIT")], None),
    (dict(max_new_tokens=3, ignore_eos=True), [_msg(2, 2, "MAX_TOKENS")], "stop reason"),  # 2 != 3
    (dict(max_new_tokens=3, ignore_eos=True), [_msg(1, 1, "EOS_TOKEN")], "stop reason"),  # EOS ignored
    (dict(max_new_tokens=3, ignore_eos=True), [_msg(1, 1, "STOP_SEQUENCE")], "stop reason"),
    (dict(max_new_tokens=3, ignore_eos=True), [_msg(1, 1, "TIME_LIMIT")], "stop reason"),
    (dict(max_new_tokens=3, ignore_eos=True), [_msg(1, 1, "ERROR")], "stop reason"),
    (dict(max_new_tokens=3, ignore_eos=True), [_msg(2, 3, "MAX_TOKENS")], "tokens streamed"),
    (dict(max_new_tokens=3, ignore_eos=True), [_msg(1, 1, "MAX_TOKENS"), _msg(2, 3, "MAX_TOKENS")],
     "before the last"),
    (dict(max_new_tokens=3, ignore_eos=True), [], "no message"),
])
def test_soak_outcome_check(params, messages, wrong):
    soak = _soak_module()
    problem = soak.check_stream(soak.Plan("a", "w5", params), messages)
    assert (problem is None) if wrong is None else (wrong in problem), problem
