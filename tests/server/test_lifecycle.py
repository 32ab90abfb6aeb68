"""Capacity and life cycle: cancellation and deadlines free KV within a step, the bounded queue,
health and reflection, metrics wiring, the CLI against a live server, and SIGTERM draining a
real `quiver serve` process."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from prometheus_client.parser import text_string_to_metric_families

from runtime.server.client import QuiverClient
from runtime.server.stubs import generation_pb2 as gpb
from tests.server.conftest import server_config, wait_until, words

REPO_ROOT = Path(__file__).resolve().parents[2]
LONG = dict(max_new_tokens=200, ignore_eos=True)


def _idle(engine) -> bool:
    return not engine.running and engine.num_queued() == 0 and engine.cache.used_blocks == 0


def test_cancelled_stream_frees_its_kv_within_a_step(client, server):
    engine = server.core.engine
    assert wait_until(lambda: _idle(engine))
    cancelled_before = _cancelled(server)
    steps, told = [], []
    original = server.core.loop.on_step
    server.core.loop.on_step = lambda stats: (steps.append(stats), original(stats))
    cancel = engine.cancel
    # counted from when the server hears of the cancel (the RPC's done-callback), not from the
    # client's call: the cancel's trip over gRPC takes a varying number of (sub-ms) steps
    engine.cancel = lambda request_id: (told.append(len(steps)), cancel(request_id))
    try:
        stream = client.generate_stream("w5 w6 w7", "lora-qv", **LONG)
        first = next(stream)
        assert first.generated_token_count >= 1 and engine.cache.used_blocks > 0
        stream.cancel()
        assert wait_until(lambda: _idle(engine), timeout=5)
        # the cancel is taken from the inbox at the start of the next step, which reaps it
        assert told and len(steps) - told[0] <= 2
    finally:
        server.core.loop.on_step = original
        engine.cancel = cancel
    assert _cancelled(server) == cancelled_before + 1


def _cancelled(server) -> float:
    return server.core.metrics.registry.get_sample_value(
        "quiver_requests_total", {"adapter": "lora-qv", "outcome": "cancelled"}) or 0.0


def test_deadline_frees_capacity_and_others_keep_going(client, server):
    engine = server.core.engine
    with pytest.raises(grpc.RpcError) as e:
        # 250 tokens (nearly the tiny model's 256-token context) take far longer than 50 ms
        client.generate("w5 w6", "", timeout=0.05, max_new_tokens=250, ignore_eos=True, min_new_tokens=250)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_until(lambda: _idle(engine), timeout=5)
    assert client.generate("w5 w6", max_new_tokens=3).generated_token_count == 3


def test_queue_full_is_resource_exhausted(tiny_model_dir):
    from runtime.server.app import build_server

    srv = build_server(server_config(tiny_model_dir, max_running=1, max_queue=2, metrics_port=None)).start()
    try:
        with QuiverClient(srv.address, timeout=60) as q:
            running = q.generate_stream("w5", **LONG)
            next(running)
            waiting = [q.generation.Generate.future(q.request("w6", **LONG)) for _ in range(2)]
            assert wait_until(lambda: srv.core.engine.num_queued() == 2)
            with pytest.raises(grpc.RpcError) as e:
                q.generate("w7", max_new_tokens=2)
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "--max-queue 2" in e.value.details()
            running.cancel()
            assert [f.result().generated_token_count for f in waiting] == [200, 200]
            assert q.generate("w7", max_new_tokens=2).generated_token_count == 2
    finally:
        srv.shutdown(grace_s=0)


def test_health_and_reflection(server):
    with grpc.insecure_channel(server.address) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for service in ("", "quiver.v1.Generation", "quiver.v1.Adapters"):
            resp = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        db = ProtoReflectionDescriptorDatabase(ch)
        services = set(db.get_services())
        assert {"quiver.v1.Generation", "quiver.v1.Adapters", "grpc.health.v1.Health"} <= services
        assert db.FindFileContainingSymbol("quiver.v1.Generation").name == "quiver/v1/generation.proto"
        from google.protobuf.descriptor_pool import DescriptorPool

        pool = DescriptorPool(db)
        methods = {m.name for m in pool.FindServiceByName("quiver.v1.Generation").methods}
        assert methods == {"Generate", "GenerateStream", "Tokenize", "ModelInfo"}
        stop = pool.FindEnumTypeByName("quiver.v1.StopReason")
        assert "STOP_REASON_EOS_TOKEN" in stop.values_by_name


def _scrape(server) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_metrics_follow_requests(client, server):
    def requests(adapter, outcome):
        return m.get(("quiver_requests_total", (("adapter", adapter), ("outcome", outcome))), 0.0)

    m = _scrape(server)
    before = {k: requests(*k) for k in [("prefix-3", "ok"), ("__base__", "ok"), ("other", "rejected"),
                                        ("__base__", "rejected")]}
    gen_before = m.get(("quiver_generated_tokens_total", (("adapter", "prefix-3"),)), 0.0)
    got = [client.generate("w5 w6", "prefix-3", max_new_tokens=n, ignore_eos=True).generated_token_count
           for n in (3, 4)]
    client.generate("w5", max_new_tokens=2)
    for bad in (lambda: client.generate("w5", "no-such-adapter"), lambda: client.generate("w5", max_new_tokens=0)):
        with pytest.raises(grpc.RpcError):
            bad()
    m = _scrape(server)
    assert requests("prefix-3", "ok") == before[("prefix-3", "ok")] + 2
    assert requests("__base__", "ok") == before[("__base__", "ok")] + 1
    assert requests("other", "rejected") == before[("other", "rejected")] + 1  # unknown id: no label
    assert requests("__base__", "rejected") == before[("__base__", "rejected")] + 1
    assert m[("quiver_generated_tokens_total", (("adapter", "prefix-3"),))] == gen_before + sum(got)
    assert not any(dict(labels).get("adapter") == "no-such-adapter" for _, labels in m)
    assert m[("quiver_base_model_info", (("device", "cpu"), ("dtype", "float32"),
                                         ("model", str(server.cfg.model)), ("quantize", "none")))] == 1
    assert m[("quiver_batch_size_count", ())] > 0

    def gauge_agrees() -> bool:  # refreshed on adapter events and every second
        resident = sum(v for (name, _), v in _scrape(server).items() if name == "quiver_adapters")
        return resident == len(client.list_adapters())

    assert wait_until(gauge_agrees, timeout=5, interval=0.2)


def test_cli_against_a_live_server(server, capsys, extra_root):
    from runtime.cli import main

    assert main(["generate", "--server", server.address, "--adapter", "lora-qv",
                 "--max-new-tokens", "4", "--json", "w5 w6", "w7"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in lines] == ["w5 w6", "w7"]
    assert all(len(r["tokens"]) <= 4 and r["stop_reason"] in ("MAX_TOKENS", "EOS_TOKEN") for r in lines)
    assert main(["adapters", "load", "cli/x", "--source", str(extra_root / "extra-lora"),
                 "--server", server.address, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["adapter_id"] == "cli/x"
    assert main(["adapters", "list", "--server", server.address]) == 0
    assert "cli/x" in capsys.readouterr().out
    assert main(["adapters", "unload", "cli/x", "--server", server.address]) == 0
    assert capsys.readouterr().out.strip() == "unloaded"
    assert main(["adapters", "unload", "cli/x", "--server", server.address]) == 2
    assert "NOT_FOUND" in capsys.readouterr().err
    assert main(["generate", "--server", server.address, "--adapter", "../x", "w5"]) == 2
    assert "INVALID_ARGUMENT" in capsys.readouterr().err


# ---- a real `quiver serve` process ---------------------------------------------------------------
def start_serve(args: list[str], timeout: float = 300) -> tuple[subprocess.Popen, str, str]:
    """`quiver serve ARGS --port 0 --http-port 0` as a subprocess (any free ports: never the
    default 8000 a machine may already use); (process, address, metrics port) once ready."""
    proc = subprocess.Popen([sys.executable, "-m", "runtime.cli", "serve", "--port", "0",
                             "--http-port", "0", *args],
                            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    ready = threading.Event()

    def read():
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("quiver serving on "):
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    if not ready.wait(timeout) or proc.poll() is not None:
        proc.kill()
        pytest.fail("quiver serve did not start:\n" + "".join(lines))
    ready_line = next(x for x in lines if x.startswith("quiver serving on "))
    address = ready_line.split()[3]
    metrics = ready_line.split("(metrics ")[1].rstrip(")\n").lstrip(":")  # a port, or "off"
    proc.output = lines  # everything it printed, for the asserts and failures
    return proc, address, metrics


def test_sigterm_finishes_in_flight_requests(tiny_model_dir):
    proc, address, _ = start_serve(["--model", str(tiny_model_dir), "--quantize", "none",
                                    "--dtype", "float32", "--metrics-port", "-1", "--max-running", "2",
                                    "--grace-period", "60"])
    try:
        with QuiverClient(address, timeout=120) as q:
            streams = [q.generate_stream(words(range(3, 20)), **LONG) for _ in range(6)]
            first = [next(s) for s in streams[:2]]  # two running, four queued behind them
            proc.send_signal(signal.SIGTERM)
            # draining: health answers NOT_SERVING, and new requests are refused UNAVAILABLE by
            # the server itself while the in-flight ones keep streaming
            health = health_pb2_grpc.HealthStub(q.channel)
            assert wait_until(lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
                              == health_pb2.HealthCheckResponse.NOT_SERVING, timeout=30)
            with pytest.raises(grpc.RpcError) as refused:
                q.generate("w5", max_new_tokens=1)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "shutting down" in refused.value.details()
            rest = [list(s) for s in streams]
        assert all(f.stop_reason == gpb.STOP_REASON_UNSPECIFIED for f in first)
        for i, chunks in enumerate(rest):
            assert chunks[-1].stop_reason == gpb.STOP_REASON_MAX_TOKENS, i
            assert chunks[-1].generated_token_count == 200, i
        assert proc.wait(timeout=60) == 0
        assert any("quiver stopped (drained)" in x for x in proc.output)
    finally:
        if proc.poll() is None:
            proc.kill()
