"""`quiver serve` on the embedded SmolLM2-135M-Instruct (NF4, the defaults), as an operator runs it:
Generate, health, reflection without grpcurl, /metrics, and a clean SIGTERM exit."""
from __future__ import annotations

import signal
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from runtime.models.embedded import EmbeddedModelUnavailableError, find_embedded_gguf
from runtime.server.client import QuiverClient
from runtime.server.stubs import generation_pb2 as gpb
from tests.server.test_lifecycle import start_serve


@pytest.mark.slow
def test_serve_embedded_model_end_to_end():
    try:
        find_embedded_gguf()  # located, never imported (its own dependencies are not installed)
    except EmbeddedModelUnavailableError as e:
        pytest.skip(str(e))
    proc, address, metrics_port = start_serve(["--metrics-port", "0", "--max-device-adapters", "2",
                                               "--max-lora-rank", "8", "--kv-cache-tokens", "4096"],
                                              timeout=600)
    try:
        with QuiverClient(address, timeout=300) as q:
            r = q.generate("The capital of France is", max_new_tokens=8, return_token_ids=True)
            assert r.generated_token_count == len(r.tokens) > 0 and r.text.strip()
            assert r.stop_reason in (gpb.STOP_REASON_MAX_TOKENS, gpb.STOP_REASON_EOS_TOKEN)
            chunks = list(q.generate_stream("The capital of France is", max_new_tokens=8))
            assert "".join(c.text for c in chunks) == r.text
            chat = q.generate(messages=[("user", "Say hello.")], max_new_tokens=4)
            assert chat.input_token_count > 5
            info = q.model_info()
            assert info.model.endswith("SmolLM2-135M-Instruct") and info.quantize == "nf4"
            assert info.has_chat_template
        with grpc.insecure_channel(address) as ch:
            status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=30)
            assert status.status == health_pb2.HealthCheckResponse.SERVING
            db = ProtoReflectionDescriptorDatabase(ch)
            assert {"quiver.v1.Generation", "quiver.v1.Adapters", "grpc.health.v1.Health",
                    "grpc.reflection.v1alpha.ServerReflection"} <= set(db.get_services())
            assert db.FindFileContainingSymbol("quiver.v1.AdapterInfo").name == "quiver/v1/adapters.proto"
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30).read().decode()
        assert 'quiver_requests_total{adapter="__base__",outcome="ok"} 3.0' in text
        assert 'quantize="nf4"' in text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
