"""The prefix cache through a real server: `--prefix-cache` / `--no-prefix-cache`, and the
counters a scrape of /metrics shows after a known pair of requests (quiver_* and vllm:*)."""
from __future__ import annotations

import pytest

from runtime.server.client import QuiverClient
from tests.server.conftest import wait_until
from tests.server.test_metrics import scrape, start_server

PROMPT = " ".join(f"w{5 + i % 90}" for i in range(40))  # 40 tokens: 2 full blocks of 16 + 8
BLOCK = 16


def parse(*argv):
    from runtime.cli import build_parser
    from runtime.server.serve_cli import config_from_args

    return config_from_args(build_parser().parse_args(["serve", *argv]))


def test_flag_on_by_default_and_off():
    assert parse().prefix_cache is True
    assert parse("--prefix-cache").prefix_cache is True
    assert parse("--no-prefix-cache").prefix_cache is False


@pytest.mark.parametrize("on", [True, False], ids=["prefix-cache", "no-prefix-cache"])
def test_counters_after_a_repeated_prompt(tiny_model_dir, adapter_dir, on):
    srv = start_server(tiny_model_dir, adapter_dir, prefix_cache=on)
    try:
        with QuiverClient(srv.address, timeout=120) as q:
            first = q.generate(PROMPT, "", max_new_tokens=3, ignore_eos=True)
            second = q.generate(PROMPT, "", max_new_tokens=3, ignore_eos=True)
            other = q.generate(PROMPT, "lora-qv", max_new_tokens=3, ignore_eos=True)
        assert first.text == second.text  # the cached run gives the same tokens
        n = first.input_token_count
        assert n == second.input_token_count == other.input_token_count >= 2 * BLOCK + 1
        queries, hits = 3 * n, (n - 1) // BLOCK * BLOCK if on else 0  # only the second hits
        # counters are added on the engine thread after the step that answered the client
        wait_until(lambda: scrape(srv).get(("quiver_prefix_cache_queries_total", ())) == queries)
        m = scrape(srv)
        assert m[("quiver_prefix_cache_queries_total", ())] == queries
        assert m[("quiver_prefix_cache_hits_total", ())] == hits
        assert m[("vllm:prefix_cache_queries_total", ())] == queries
        assert m[("vllm:prefix_cache_hits_total", ())] == hits
        blocks = m[("quiver_prefix_cache_blocks", ())]
        assert (blocks > 0) is on  # the base's and lora-qv's blocks, held by no request now
    finally:
        srv.shutdown(grace_s=0)
