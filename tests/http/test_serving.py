"""Server behaviour over HTTP with a known load: tokens, a full queue (429), cancel on
disconnect freeing capacity, the vllm:* series moving, /metrics latency, the drain (503)."""
from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.http.conftest import BASE_ID, CHAT_TEMPLATE, start_server
from tests.peft_factory import make_tiny_model, make_tiny_tokenizer
from tests.server.conftest import wait_until

pytestmark = pytest.mark.slow
API = "api-token-1"
ADMIN = "admin-token-1"
LONG = 3000  # tokens: seconds of decoding on the tiny model, time enough to watch it
#: 40 scrapes 50 ms apart over one keep-alive connection; prints p50, p95, max in ms
SCRAPE = """
import statistics, sys, time, httpx
took = []
with httpx.Client() as c:
    for _ in range(40):
        t0 = time.perf_counter()
        c.get(f"http://127.0.0.1:{sys.argv[1]}/metrics").raise_for_status()
        took.append((time.perf_counter() - t0) * 1e3)
        time.sleep(0.05)
took.sort()
print(statistics.median(took), took[37], took[-1])
"""


@pytest.fixture(scope="module")
def long_model_dir(tmp_path_factory) -> Path:
    """The tiny base with a long context, so one request can run for seconds."""
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("tiny-long")
    make_tiny_model("llama", seed=0, max_position_embeddings=4096).save_pretrained(str(d))
    make_tiny_tokenizer(d)
    tok = AutoTokenizer.from_pretrained(d)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(str(d))
    return d


@pytest.fixture(scope="module")
def busy_server(long_model_dir, http_adapter_dir):
    """One running request at a time, a queue of two; tokens required."""
    srv = start_server(long_model_dir, max_running=1, max_queue=2, api_token=API, admin_token=ADMIN,
                       adapter_dir=str(http_adapter_dir), preload=["lora-qv", "dora-qv"])
    yield srv
    srv.shutdown(grace_s=2)


def url(server, path: str = "") -> str:
    return f"http://127.0.0.1:{server.http_port}{path}"


def client(server, key: str = API, cls=openai.OpenAI):
    return cls(base_url=url(server, "/v1"), api_key=key, max_retries=0, timeout=120)


def scrape(server) -> dict[str, float]:
    """name{labels} -> value for the vllm:* and quiver_requests_total series."""
    out = {}
    for line in httpx.get(url(server, "/metrics")).text.splitlines():
        if line.startswith(("vllm:", "quiver_requests_total")):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def lora_info(m: dict) -> list[str]:
    return [k for k in m if k.startswith("vllm:lora_requests_info")]


def idle(server) -> bool:
    m = scrape(server)
    return m["vllm:num_requests_running"] == 0 and m["vllm:num_requests_waiting"] == 0


def cancelled(server) -> float:
    return sum(v for k, v in scrape(server).items() if 'outcome="cancelled"' in k)


def test_api_token_guards_generation(busy_server):
    with pytest.raises(openai.AuthenticationError):
        client(busy_server, "wrong").completions.create(model=BASE_ID, prompt="w1", max_tokens=1)
    r = httpx.post(url(busy_server, "/v1/completions"), json={"model": BASE_ID, "prompt": "w1"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    for key in (API, ADMIN):  # the admin token opens generation too, as on gRPC
        got = client(busy_server, key).completions.create(model=BASE_ID, prompt="w1", max_tokens=1)
        assert got.usage.completion_tokens == 1
    with pytest.raises(openai.AuthenticationError):
        client(busy_server, "wrong").models.list()
    bad = httpx.post(url(busy_server, "/v1/unload_lora_adapter"), json={"lora_name": "lora-qv"},
                     headers={"Authorization": f"Bearer {API}"})
    assert bad.status_code == 401  # the API token is not the admin token
    assert httpx.get(url(busy_server, "/health")).status_code == 200  # open without a token


def long_stream(server, model: str):
    """A streaming request that runs for seconds; returns the open stream (first chunk read)."""
    stream = client(server).completions.create(model=model, prompt="w5 w6", max_tokens=LONG, stream=True,
                                               temperature=0, extra_body={"ignore_eos": True})
    next(iter(stream))
    return stream


def test_vllm_series_follow_a_known_load_and_metrics_stay_fast(busy_server):
    assert wait_until(lambda: idle(busy_server), 30)
    running = long_stream(busy_server, "lora-qv")
    queued = [threading.Thread(target=lambda m=m: _quietly(client(busy_server).completions.create,
                                                           model=m, prompt="w7", max_tokens=2))
              for m in ("dora-qv", BASE_ID)]
    for t in queued:
        t.start()
    assert wait_until(lambda: scrape(busy_server)["vllm:num_requests_waiting"] == 2, 30)
    m = scrape(busy_server)
    assert m["vllm:num_requests_running"] == 1
    assert 0 < m["vllm:kv_cache_usage_perc"] <= 1
    assert wait_until(lambda: lora_info(scrape(busy_server)) == [
        'vllm:lora_requests_info{max_lora="8",running_lora_adapters="lora-qv",waiting_lora_adapters="dora-qv"}'], 10)
    # /metrics under load (one stream decoding, two queued), scraped from another process as
    # Prometheus and the gateway's endpoint picker do (a client in this process would fight the
    # engine thread for the GIL itself)
    probe = subprocess.run([sys.executable, "-c", SCRAPE, str(busy_server.http_port)],
                           capture_output=True, text=True, timeout=60)
    p50, p95, worst = map(float, probe.stdout.split())
    print(f"/metrics under load: p50 {p50:.1f} ms, p95 {p95:.1f} ms, max {worst:.1f} ms")
    # half the picker's 50 ms scrape interval (README): measured p50 2.3 ms on an AVX512-BF16
    # machine, 8-10 ms on an AVX2 one, where the engine's Python modules hold the GIL far more
    assert p50 < 25.0, probe.stdout
    running.close()  # the client goes away: its request is cancelled, the queue moves up
    for t in queued:
        t.join(60)
    assert wait_until(lambda: idle(busy_server), 30)
    info = lora_info(scrape(busy_server))
    assert info == ['vllm:lora_requests_info{max_lora="8",running_lora_adapters="",waiting_lora_adapters=""}']


def _quietly(fn, **kw):
    try:
        fn(**kw)
    except openai.APIError:
        pass


def test_streaming_disconnect_cancels_and_frees_the_slot(busy_server):
    assert wait_until(lambda: idle(busy_server), 30)
    before = cancelled(busy_server)
    stream = long_stream(busy_server, BASE_ID)
    t0 = time.monotonic()
    stream.close()
    assert wait_until(lambda: cancelled(busy_server) == before + 1, 10)
    assert wait_until(lambda: idle(busy_server), 5)
    assert time.monotonic() - t0 < 5  # far less than the seconds the request had left
    got = client(busy_server).completions.create(model=BASE_ID, prompt="w1", max_tokens=2)
    assert got.usage.completion_tokens >= 1  # the slot is free again


def test_non_streaming_disconnect_cancels(busy_server):
    assert wait_until(lambda: idle(busy_server), 30)
    before = cancelled(busy_server)
    body = {"model": BASE_ID, "prompt": "w5", "max_tokens": LONG, "ignore_eos": True, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url(busy_server, "/v1/completions"), json=body, timeout=httpx.Timeout(5, read=1.0),
                   headers={"Authorization": f"Bearer {API}"})
    assert wait_until(lambda: cancelled(busy_server) == before + 1, 10)
    assert wait_until(lambda: idle(busy_server), 5)


def test_full_queue_is_rate_limited(busy_server):
    assert wait_until(lambda: idle(busy_server), 30)

    async def burst():
        async with client(busy_server, cls=openai.AsyncOpenAI) as c:
            kw = dict(model=BASE_ID, prompt="w5", max_tokens=200, extra_body={"ignore_eos": True})
            return await asyncio.gather(*(c.completions.create(**kw) for _ in range(5)),
                                        return_exceptions=True)

    results = asyncio.run(burst())
    limited = [r for r in results if isinstance(r, openai.RateLimitError)]
    served = [r for r in results if not isinstance(r, Exception)]
    assert len(limited) >= 2 and len(served) >= 1  # 1 running + 2 queued at most
    assert all(r.status_code == 429 for r in limited)


def test_drain_answers_503_and_finishes_open_streams(long_model_dir):
    srv = start_server(long_model_dir, max_running=4, grace_period_s=30)
    c = client(srv)
    stream = c.completions.create(model=BASE_ID, prompt="w5", max_tokens=300, stream=True, temperature=0,
                                  extra_body={"ignore_eos": True})
    chunks = [next(iter(stream))]
    stopper = threading.Thread(target=srv.shutdown)
    stopper.start()
    assert wait_until(lambda: httpx.get(url(srv, "/health")).status_code == 503, 10)
    with pytest.raises(openai.InternalServerError) as e:
        c.completions.create(model=BASE_ID, prompt="w1", max_tokens=1)
    assert e.value.status_code == 503
    chunks += list(stream)
    assert chunks[-1].choices[0].finish_reason == "length"  # the open stream ran to its end
    stopper.join(60)
    assert not stopper.is_alive()
