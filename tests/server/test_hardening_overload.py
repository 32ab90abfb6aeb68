"""Overload and client faults (hardening issue, part 4): a burst against the bounded queue, time
limits ending requests with TIME_LIMIT, many cancellations and deadlines (running and queued)
giving capacity back within a step, and a stream reader that stops reading without slowing
anyone else or growing the server's buffers. (A single cancelled stream, one deadline, a full
queue and the SIGTERM drain are in test_lifecycle.py.)

Steps are slowed on purpose where timing matters (`slow_steps`: a sleep in the engine thread's
step callback), so that "running", "queued" and "after the time limit" are states the test can
rely on, not races it hopes to win on a loaded machine.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import grpc
import pytest

from runtime.server.client import QuiverClient
from runtime.server.stubs import generation_pb2 as gpb
from runtime.server.stubs import generation_pb2_grpc
from tests.server.conftest import wait_until, words
from tests.server.hardening import assert_still_serving, running_server, scrape

MAX_RUNNING, MAX_QUEUE = 4, 4


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    with running_server(tiny_model_dir, max_running=MAX_RUNNING, max_queue=MAX_QUEUE, grpc_workers=64) as srv:
        yield srv


@pytest.fixture
def client(server):
    with QuiverClient(server.address, timeout=60) as q:
        yield q


@contextmanager
def slow_steps(server, seconds: float):
    """Every engine step takes at least `seconds` longer; yields the list of steps seen."""
    loop, steps = server.core.loop, []
    original = loop.on_step

    def slow(stats):
        steps.append(stats)
        time.sleep(seconds)
        original(stats)

    loop.on_step = slow
    try:
        yield steps
    finally:
        loop.on_step = original


def _idle(server) -> bool:
    e = server.core.engine
    return not e.running and e.num_queued() == 0 and e.cache.used_blocks == 0


def _gauges(server) -> tuple[float, float]:
    m = scrape(server.metrics_port)
    return m[("quiver_requests_running", ())], m[("quiver_requests_waiting", ())]


def test_burst_against_the_bounded_queue(server, client):
    """40 requests at once against 4 queue places (and 4 running ones, filled from the queue as
    the engine admits): the overflow is RESOURCE_EXHAUSTED at once (nothing waits unbounded),
    every accepted one completes in full, and the server is idle and serving afterwards."""
    rejected_before = scrape(server.metrics_port).get(
        ("quiver_requests_total", (("adapter", "__base__"), ("outcome", "rejected"))), 0.0)
    with slow_steps(server, 0.005):
        futures = [client.generation.Generate.future(client.request(
            words([5 + i % 100, 7]), max_new_tokens=20, ignore_eos=True), timeout=60) for i in range(40)]
        outcomes = []
        for f in futures:
            try:
                outcomes.append(f.result().generated_token_count)
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (e.code(), e.details())
                assert f"--max-queue {MAX_QUEUE}" in e.details()
                outcomes.append("rejected")
    done = [o for o in outcomes if o != "rejected"]
    assert len(done) >= MAX_QUEUE and outcomes.count("rejected") >= 1
    assert set(done) == {20}
    assert wait_until(lambda: _idle(server), timeout=10)
    assert wait_until(lambda: _gauges(server) == (0, 0), timeout=5, interval=0.2)
    after = scrape(server.metrics_port)[("quiver_requests_total", (("adapter", "__base__"), ("outcome", "rejected")))]
    assert after == rejected_before + outcomes.count("rejected")
    assert_still_serving(client)


def test_time_limit_ends_with_time_limit(server, client):
    with slow_steps(server, 0.02):  # 200 tokens would take > 4 s
        t0 = time.monotonic()
        r = client.generate("w5 w6", max_new_tokens=200, ignore_eos=True, time_limit_seconds=0.3)
        assert r.stop_reason == gpb.STOP_REASON_TIME_LIMIT and 0 < r.generated_token_count < 200
        assert time.monotonic() - t0 < 3
        chunks = list(client.generate_stream("w5 w6", max_new_tokens=200, ignore_eos=True,
                                             time_limit_seconds=0.3, return_token_ids=True))
        assert chunks[-1].stop_reason == gpb.STOP_REASON_TIME_LIMIT
        assert sum(len(c.tokens) for c in chunks) == chunks[-1].generated_token_count < 200
    assert wait_until(lambda: _idle(server), timeout=5)


def test_cancellations_and_deadlines_free_capacity_within_a_step(server, client):
    """4 running + 4 queued streams, all cancelled at once: everything is freed within two steps
    (the cancels are taken from the inbox at the start of the next step, which reaps them). Then a
    queued request whose deadline passes leaves the queue while the running ones go on."""
    engine = server.core.engine
    with slow_steps(server, 0.01) as steps:
        streams = [client.generate_stream(words([5, 6 + i]), max_new_tokens=200, ignore_eos=True)
                   for i in range(MAX_RUNNING)]
        for s in streams:
            next(s)
        streams += [client.generate_stream(words([5, 6 + i]), max_new_tokens=200, ignore_eos=True)
                    for i in range(MAX_QUEUE)]
        assert wait_until(lambda: len(engine.running) == MAX_RUNNING and engine.num_queued() == MAX_QUEUE)
        for s in streams:
            s.cancel()
        cancelled_at = len(steps)
        assert wait_until(lambda: _idle(server), timeout=5)
        assert len(steps) - cancelled_at <= 2

        running = [client.generate_stream(words([5, 6 + i]), max_new_tokens=200, ignore_eos=True)
                   for i in range(MAX_RUNNING)]
        for s in running:
            next(s)
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as e:
            client.generate("w9", max_new_tokens=5, timeout=0.5)  # queued behind the 4 running
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert wait_until(lambda: engine.num_queued() == 0, timeout=2)
        assert time.monotonic() - t0 < 1.5 and len(engine.running) == MAX_RUNNING
        for s in running:
            s.cancel()
    assert wait_until(lambda: _idle(server), timeout=5)
    assert wait_until(lambda: _gauges(server) == (0, 0), timeout=5, interval=0.2)


def test_a_reader_that_stops_reading_blocks_nobody(server, client):
    """One client opens a stream with bulky messages and a 1 KiB receive window, and does not
    read. Its gRPC handler stalls on flow control; the engine does not: the request finishes, its
    outputs fold into a buffer that stays at 64 entries, and other clients are served as fast as
    without it. When the client finally reads, it gets every token."""
    handles, submit = [], server.core.submit

    def recording_submit(call, wait_s=None):
        handles.append(submit(call, wait_s))
        return handles[-1]

    def others() -> float:
        t0 = time.monotonic()
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda i: client.generate(words([9, i + 10]), max_new_tokens=30,
                                                              ignore_eos=True), range(4)))
        assert all(r.generated_token_count == 30 for r in results)
        return time.monotonic() - t0

    baseline = others()
    server.core.submit = recording_submit
    stalled_channel = grpc.insecure_channel(server.address, options=[("grpc.http2.lookahead_bytes", 1024),
                                                                     ("grpc.http2.bdp_probe", 0)])
    try:
        stub = generation_pb2_grpc.GenerationStub(stalled_channel)
        request = QuiverClient.request("w5 w6", max_new_tokens=240, ignore_eos=True, return_logprobs=True, top_n=20)
        stalled = stub.GenerateStream(request, timeout=120)  # never read until the end
        assert wait_until(lambda: handles and handles[0]._stream.finished is False
                          and len(handles[0]._stream._buf) == 64, timeout=30)
        server.core.submit = submit
        during = others()
        assert wait_until(lambda: _idle(server), timeout=30)  # the engine finished it unread
        buffered = handles[0]._stream._buf
        assert len(buffered) == 64 and buffered[-1].finished  # folded, not grown
        messages = list(stalled)
    finally:
        server.core.submit = submit
        stalled_channel.close()
    assert during < 3 * baseline + 1.0, (baseline, during)
    assert sum(len(m.tokens) for m in messages) == 240 == messages[-1].generated_token_count
    assert messages[-1].stop_reason == gpb.STOP_REASON_MAX_TOKENS
    full = client.generate("w5 w6", max_new_tokens=240, ignore_eos=True, return_token_ids=True)
    assert [t.id for m in messages for t in m.tokens] == [t.id for t in full.tokens]
