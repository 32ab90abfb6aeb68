"""Metrics end to end: a known mix of real gRPC calls on loopback, then a real HTTP scrape of
/metrics, parsed with prometheus-client's own parser, must say exactly what was sent.

Each test starts its own server (a fresh `Metrics` with its own CollectorRegistry, built by
`build_server`), so every counter starts at zero and the expected values are exact, not deltas.

What each outcome is (runtime/server/core.py, metrics.Metrics.request_done):
    ok         finished for any reason but CANCELLED / ERROR (max tokens, EOS, stop, time limit)
    cancelled  the client went away mid-stream; counted when the engine reaps it (asynchronously)
    rejected   refused before admission: INVALID_ARGUMENT (bad parameters, malformed adapter id),
               NOT_FOUND (unknown adapter), RESOURCE_EXHAUSTED (queue full). A registered
               adapter keeps its label; an id that is not registered is counted under `other`.
    error      the engine failed an accepted request (an exception in an engine step, or the
               server stopping with the request still held). A well-formed or malformed request
               from a client cannot cause one on a healthy server (everything a client controls is
               validated before admission), so the mix has none and the test checks that no
               request was counted as `error`, a cancelled stream least of all.
"""
from __future__ import annotations

import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from runtime.server.client import QuiverClient
from runtime.server.stubs import adapters_pb2 as apb
from tests.server.conftest import ADAPTERS, server_config, wait_until

Samples = dict[tuple[str, tuple], float]

#: longest stream that fits the tiny model's 256-position context with a 3-token prompt; the
#: client cancels it after its first message, hundreds of engine steps before it could finish
CANCELLED_MAX_NEW = 240


# ---- helpers -------------------------------------------------------------------------------------
def scrape(server) -> Samples:
    """GET /metrics over HTTP: (sample name, sorted labels) -> value."""
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def by_label(samples: Samples, name: str, *keys: str) -> dict:
    """The non-zero samples of `name`, keyed by the values of the labels `keys` (one key: bare)."""
    out = {}
    for (n, labels), v in samples.items():
        if n == name and v:
            d = dict(labels)
            k = tuple(d[key] for key in keys)
            out[k[0] if len(k) == 1 else k] = v
    return out


def settled(server, expected: dict, name: str, *keys: str, timeout: float = 10.0) -> Samples:
    """Scrape until `by_label(name, keys)` equals `expected` (counters recorded on the engine
    thread, such as a cancelled stream reaped at the next step, arrive a little after the client
    is done); returns that scrape, or the last one, for the asserts to report."""
    last: list[Samples] = [{}]

    def matches() -> bool:
        last[0] = scrape(server)
        return by_label(last[0], name, *keys) == expected

    wait_until(matches, timeout=timeout, interval=0.05)
    return last[0]


def start_server(tiny_model_dir, adapter_dir, **overrides):
    from runtime.server.app import build_server

    cfg = server_config(tiny_model_dir, adapter_dir=str(adapter_dir), **overrides)
    return build_server(cfg).start()


def unary(q: QuiverClient, adapter: str, n: int) -> tuple[int, int]:
    """(generated, prompt) token counts of one Generate."""
    r = q.generate("w5 w6", adapter, max_new_tokens=n, ignore_eos=True)
    return r.generated_token_count, r.input_token_count


def streamed(q: QuiverClient, adapter: str, n: int) -> tuple[int, int]:
    """(generated, prompt) token counts of one GenerateStream read to its end (the counts in
    each message are running totals, so the last message has the request's)."""
    *_, last = q.generate_stream("w7 w8 w9", adapter, max_new_tokens=n, ignore_eos=True)
    return last.generated_token_count, last.input_token_count


def refused(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value.code()


def gauge_view(server, q: QuiverClient) -> tuple[Counter, Counter]:
    """(quiver_adapters by (state, type), the same counted from ListAdapters), non-zero only.
    pb -> label: ADAPTER_TYPE_LORA -> "lora", UNSPECIFIED (still loading) -> "unknown"; an
    UNLOADING adapter still serves its in-flight requests and is counted as "device"."""
    resident = by_label(scrape(server), "quiver_adapters", "state", "type")
    gauge = Counter({k: int(v) for k, v in resident.items()})
    listed = Counter()
    for a in q.list_adapters():
        state = apb.AdapterState.Name(a.state).removeprefix("ADAPTER_STATE_").lower()
        kind = apb.AdapterType.Name(a.type).removeprefix("ADAPTER_TYPE_").lower()
        state = "device" if state == "unloading" else state
        listed[(state, "unknown" if kind == "unspecified" else kind)] += 1
    return gauge, listed


# ---- a known mix ----------------------------------------------------------------------------------
LORAS = ["lora-qv", "team-a/lora-all", "lora-rslora"]
PROMPT = "prompt-4"
#: adapter ("" = base) -> (unary max_new_tokens each, streamed max_new_tokens each); all end "ok"
MIX = {
    "lora-qv": ([3, 4, 5], [2, 6]),
    "team-a/lora-all": ([2, 3], [4, 1]),
    "lora-rslora": ([5], [3, 2, 4]),
    PROMPT: ([2, 6], [3]),
    "": ([1, 4], [5, 2]),
}


@pytest.fixture(scope="module")
def mix_server(tiny_model_dir, adapter_dir):
    # two adapters preloaded, two loaded lazily by their first request
    srv = start_server(tiny_model_dir, adapter_dir, preload=["lora-qv", PROMPT])
    yield srv
    srv.shutdown(grace_s=0)


def test_scrape_matches_a_known_request_mix(mix_server):
    assert set(LORAS) <= set(ADAPTERS) and ADAPTERS[PROMPT][0] == "prompt_tuning"
    label = {a: a or "__base__" for a in MIX}
    with QuiverClient(mix_server.address, timeout=120) as q:
        # warm the lazy loads first, one each, so the mix below does not race them
        first = {a: unary(q, a, 1) for a in ("team-a/lora-all", "lora-rslora")}
        jobs = [(a, unary, n) for a, (u, _) in MIX.items() for n in u]
        jobs += [(a, streamed, n) for a, (_, s) in MIX.items() for n in s]
        with ThreadPoolExecutor(4) as pool:
            done = list(pool.map(lambda j: (j[0], j[1](q, j[0], j[2])), jobs))
        done += list(first.items())

        # one stream cancelled by the client after its first message
        stream = q.generate_stream("w5 w6", "lora-qv", max_new_tokens=CANCELLED_MAX_NEW, ignore_eos=True)
        head = next(stream)
        stream.cancel()
        assert head.generated_token_count >= 1
        with pytest.raises(grpc.RpcError) as e:
            list(stream)
        assert e.value.code() == grpc.StatusCode.CANCELLED

        # refused before admission: a registered adapter keeps its label, the base is
        # __base__, an id that is not registered (unknown, or malformed) is `other`
        bad = dict(max_new_tokens=0)
        assert refused(lambda: q.generate("w5", "lora-qv", **bad)) == grpc.StatusCode.INVALID_ARGUMENT
        assert refused(lambda: q.generate("w5", "", temperature=-1.0)) == grpc.StatusCode.INVALID_ARGUMENT
        assert refused(lambda: q.generate("w5", "no-such-adapter")) == grpc.StatusCode.NOT_FOUND
        assert refused(lambda: q.generate("w5", "../escape")) == grpc.StatusCode.INVALID_ARGUMENT

        want = Counter()
        for a, _ in done:
            want[(label[a], "ok")] += 1
        want.update({("lora-qv", "cancelled"): 1, ("lora-qv", "rejected"): 1,
                     ("__base__", "rejected"): 1, ("other", "rejected"): 2})
        m = settled(mix_server, dict(want), "quiver_requests_total", "adapter", "outcome")
        assert by_label(m, "quiver_requests_total", "adapter", "outcome") == dict(want)
        assert sum(want.values()) == len(jobs) + 2 + 1 + 4  # every call made, counted once
        # nothing in the mix is an engine failure; a cancel above all must not read as one
        assert not [k for k in by_label(m, "quiver_requests_total", "adapter", "outcome") if k[1] == "error"]

        # Tokens. An ok request adds exactly what its response reports. The cancelled stream
        # adds what the engine had generated when it reaped the cancel: at least what the
        # client received, and fewer than max_new_tokens (else it would have ended "ok").
        # Rejected requests add nothing. The cancelled stream's prompt is counted (it ran).
        gen_ok, prompt_ok = Counter(), Counter()
        for a, (g, p) in done:
            gen_ok[label[a]] += g
            prompt_ok[label[a]] += p
        generated = by_label(m, "quiver_generated_tokens_total", "adapter")
        cancelled_tokens = generated["lora-qv"] - gen_ok["lora-qv"]
        assert head.generated_token_count <= cancelled_tokens < CANCELLED_MAX_NEW
        assert generated == {**gen_ok, "lora-qv": gen_ok["lora-qv"] + cancelled_tokens}
        prompt_ok["lora-qv"] += head.input_token_count
        assert by_label(m, "quiver_prompt_tokens_total", "adapter") == dict(prompt_ok)

        # Latency histograms observe ok requests only (request_done; README: "ok requests"):
        # the cancelled stream had a first token, yet is in no TTFT / duration count, since its
        # duration would be the time to the cancel, not to a last token. The unlabelled queue
        # histogram observes every request that was admitted, the cancelled one included.
        ok = {a: v for (a, o), v in want.items() if o == "ok"}
        assert by_label(m, "quiver_time_to_first_token_seconds_count", "adapter") == ok
        assert by_label(m, "quiver_request_duration_seconds_count", "adapter") == ok
        tpot = Counter(label[a] for a, (g, _) in done if g > 1)  # a gap needs two tokens
        assert by_label(m, "quiver_time_per_output_token_seconds_count", "adapter") == dict(tpot)
        assert m[("quiver_queue_duration_seconds_count", ())] == sum(ok.values()) + 1

        # quiver_adapters agrees with ListAdapters per (state, type); it is refreshed on adapter
        # events and every second, so poll
        view = [gauge_view(mix_server, q)]

        def agrees() -> bool:
            view[0] = gauge_view(mix_server, q)
            return view[0][0] == view[0][1]

        assert wait_until(agrees, timeout=5, interval=0.2), view[0]
        gauge, listed = view[0]
        assert gauge == Counter({("device", "lora"): 3, ("device", "prompt_tuning"): 1})
        assert sum(listed.values()) == len(q.list_adapters()) == 4


# ---- cardinality ----------------------------------------------------------------------------------
MAX_LABELS = 3
TEN = list(ADAPTERS)[:10]


@pytest.fixture(scope="module")
def bounded_server(tiny_model_dir, adapter_dir):
    # The last three are preloaded: loading claims no label, serving a request does.
    srv = start_server(tiny_model_dir, adapter_dir, metrics_max_adapter_labels=MAX_LABELS,
                       preload=TEN[-3:])
    yield srv
    srv.shutdown(grace_s=0)


def test_adapter_labels_are_bounded(bounded_server):
    """README "Metrics": the first N adapters to serve a request keep their own label for the
    life of the process, all others are `other`, base requests `__base__`: at most N + 2 values.
    A refused request for an id that is not registered is `other` and claims no label."""
    assert len(set(TEN)) == 10
    with QuiverClient(bounded_server.address, timeout=120) as q:
        generated = 0
        assert refused(lambda: q.generate("w5", "not-an-adapter")) == grpc.StatusCode.NOT_FOUND
        for a in TEN:  # one at a time: the order of service decides who gets a label
            generated += unary(q, a, 2)[0]
        for _ in range(2):
            generated += unary(q, "", 3)[0]
        with ThreadPoolExecutor(2) as pool:  # a labelled and an unlabelled adapter, once more
            generated += sum(g for g, _ in pool.map(lambda a: streamed(q, a, 3), [TEN[0], TEN[-1]]))
        # a registered adapter past the N is `other` when refused too
        assert refused(lambda: q.generate("w5", TEN[5], max_new_tokens=0)) == grpc.StatusCode.INVALID_ARGUMENT

    sent = 1 + len(TEN) + 2 + 2 + 1
    want = {(TEN[0], "ok"): 2, (TEN[1], "ok"): 1, (TEN[2], "ok"): 1, ("other", "ok"): 7 + 1,
            ("__base__", "ok"): 2, ("other", "rejected"): 2}
    m = settled(bounded_server, want, "quiver_requests_total", "adapter", "outcome")
    requests = by_label(m, "quiver_requests_total", "adapter", "outcome")
    assert requests == want
    assert sum(requests.values()) == sent
    values = {a for a, _ in requests}
    assert values == {*TEN[:MAX_LABELS], "other", "__base__"}
    assert len(values) == MAX_LABELS + 2
    # every per-adapter series uses the same bounded set, and no total is lost to the bound
    for name in ("quiver_generated_tokens_total", "quiver_prompt_tokens_total",
                 "quiver_time_to_first_token_seconds_count"):
        assert set(by_label(m, name, "adapter")) <= values, name
    assert sum(by_label(m, "quiver_generated_tokens_total", "adapter").values()) == generated
    assert not {dict(labels).get("adapter") for _, labels in m} & (set(TEN[MAX_LABELS:]) | {"not-an-adapter"})
