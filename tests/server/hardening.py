"""What the hardening tests (test_hardening_*.py) share: a dedicated server with its own limits,
status assertions that also prove the server still serves, raw calls with hand-built bytes, and
/metrics scraped over HTTP.

Each hardening module builds its own server (the tiny model loads in about a second) so that
limits, tokens and TLS can be set without touching the session server other tests share.
"""
from __future__ import annotations

import urllib.request
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from runtime.server.client import QuiverClient
from tests.server.conftest import server_config

#: Statuses a well-behaved server may answer a bad request with; never UNKNOWN or INTERNAL.
CLIENT_ERROR_CODES = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                      grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.FAILED_PRECONDITION,
                      grpc.StatusCode.OUT_OF_RANGE}


@contextmanager
def running_server(model_dir: Path, **overrides):
    """A started QuiverServer (quantize none, float32, CPU, port 0), shut down on exit."""
    from runtime.server.app import build_server

    srv = build_server(server_config(model_dir, **overrides)).start()
    try:
        yield srv
    finally:
        srv.shutdown(grace_s=2)


def expect_status(call, code: grpc.StatusCode, needle: str) -> grpc.RpcError:
    """`call()` fails with `code`, and its message contains `needle` (something to act on)."""
    with pytest.raises(grpc.RpcError) as e:
        call()
    assert e.value.code() == code, (e.value.code(), e.value.details())
    assert needle in (e.value.details() or ""), e.value.details()
    return e.value


def assert_still_serving(client: QuiverClient, adapter_id: str = "") -> None:
    """A good request right after a bad one is answered in full."""
    r = client.generate("w5 w6", adapter_id, max_new_tokens=2, ignore_eos=True)
    assert r.generated_token_count == 2


def raw_unary(channel: grpc.Channel, method: str, payload: bytes, timeout: float = 30,
              metadata=None) -> tuple[grpc.StatusCode, str]:
    """Send `payload` as the serialized request of a unary method; (status, details)."""
    call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
    try:
        call(payload, timeout=timeout, metadata=metadata)
        return grpc.StatusCode.OK, ""
    except grpc.RpcError as e:
        return e.code(), e.details() or ""


def raw_stream(channel: grpc.Channel, method: str, payload: bytes, timeout: float = 30) -> tuple[grpc.StatusCode, str]:
    """The same for a server-streaming method (every message read)."""
    call = channel.unary_stream(method, request_serializer=None, response_deserializer=None)
    try:
        for _ in call(payload, timeout=timeout):
            pass
        return grpc.StatusCode.OK, ""
    except grpc.RpcError as e:
        return e.code(), e.details() or ""


def scrape(metrics_port: int) -> dict[tuple[str, tuple], float]:
    """/metrics over HTTP, parsed by prometheus_client: (sample name, sorted labels) -> value."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def load_failures(metrics_port: int, reason: str) -> float:
    return scrape(metrics_port)[("quiver_adapter_load_failures_total", (("reason", reason),))]
