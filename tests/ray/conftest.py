"""A real Ray cluster started by the tests (2 CPUs, no dashboard), the Quiver Serve application on
it (2 replicas of the tiny random chat model), adapters in a real S3 server on loopback (moto),
and a single in-process Quiver on the same base and store as the reference for answers.

    cluster       ray.init + serve.start on a port of 19600-19699; shut down after the module
    quiver_app    (http base url, S3 endpoint): the application running, adapters uploaded
    single        QuiverServer (HTTP) on the same model and bucket, its own cache
    openai_at     the official openai client on a base url (no retries unless asked)
    replicas      GET /v1/replicas of the ingress (live replicas and their gRPC ports)
"""
from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time

import pytest

from tests.fixtures import one_thread  # noqa: F401  (autouse: every test here)
from tests.http.conftest import BASE_ID
from tests.peft_factory import make_peft_adapter, make_tiny_model
from tests.s3_factory import s3_bucket, s3_client, upload_adapter
from tests.server.conftest import server_config
from tests.training import conftest as training

chat_model_dir = training.chat_model_dir  # the tiny random chat model, as a fixture here too
BUCKET, PREFIX = "ray-adapters", "fleet/"
ADAPTERS = [f"tenant-{i}/lora" for i in range(6)]
PORTS = range(19600, 19700)


def free_port(ports: range = PORTS) -> int:
    """The first port of `ports` free on loopback (each test file its own range)."""
    for port in ports:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {ports.start}-{ports.stop - 1}")


@pytest.fixture(scope="module")
def s3_endpoint():
    with s3_bucket(BUCKET) as url:
        yield url


@pytest.fixture(scope="module")
def adapter_sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray-adapter-src")
    base = make_tiny_model("llama", seed=0)  # the chat model's weights (tests/training/conftest.py)
    return {a: make_peft_adapter(base, "lora", root / a, seed=40 + i) for i, a in enumerate(ADAPTERS + ["fresh"])}


def app_config(model_dir, endpoint: str, cache_dir, **overrides):
    return server_config(model_dir, served_model_name=BASE_ID, adapter_store=f"s3://{BUCKET}/{PREFIX}",
                         adapter_cache_dir=str(cache_dir), s3_endpoint_url=endpoint, threads=1,
                         max_device_adapters=8, grace_period_s=5, **overrides)


@pytest.fixture(scope="module")
def cluster(s3_endpoint):
    """After the S3 server: Ray's workers inherit the AWS_* settings it exported."""
    import ray
    from ray import serve

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    temp = tempfile.mkdtemp(prefix="qray-", dir="/tmp")
    ray.init(num_cpus=2, include_dashboard=False, namespace="quiver-tests", _temp_dir=temp,
             log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def quiver_app(cluster, chat_model_dir, s3_endpoint, adapter_sources, tmp_path_factory):
    from ray import serve

    from runtime.distributed.app import RayOptions, build_app

    client = s3_client(s3_endpoint)
    for adapter_id in ADAPTERS:
        upload_adapter(client, BUCKET, PREFIX, adapter_id, adapter_sources[adapter_id])
    uploads = adapter_sources["fresh"].parent
    cfg = app_config(chat_model_dir, s3_endpoint, tmp_path_factory.mktemp("ray-cache"),
                     allow_adapter_roots=[str(uploads)])
    # adapter_check_s=0: a replaced adapter reaches these replicas only through the load route
    opts = RayOptions(num_replicas=2, replica_cpus=1, max_ongoing_requests=64, adapter_check_s=0)
    serve.run(build_app(cfg, opts), name="quiver", route_prefix="/")
    wait_for_replicas(cluster, 2)
    return cluster


@pytest.fixture(scope="module")
def single(chat_model_dir, s3_endpoint, tmp_path_factory):
    from runtime.server.app import build_server

    cfg = app_config(chat_model_dir, s3_endpoint, tmp_path_factory.mktemp("single-cache"), http_port=0)
    srv = build_server(cfg).start()
    yield f"http://127.0.0.1:{srv.http_port}"
    srv.shutdown(grace_s=2)


def openai_at(base_url: str, retries: int = 0):
    import openai

    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=retries, timeout=120)


def replicas(base_url: str) -> list[dict]:
    import httpx

    return httpx.get(f"{base_url}/v1/replicas", timeout=30).json()["data"]


def wait_for_replicas(base_url: str, n: int, timeout_s: float = 150, exclude=()) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            live = [r for r in replicas(base_url) if r["replica_id"] not in exclude]
        except Exception:  # noqa: BLE001 - the ingress itself may still be starting
            live = []
        if len(live) >= n:
            return live
        time.sleep(0.5)
    raise AssertionError(f"fewer than {n} replicas registered after {timeout_s} s")


def held(replica: dict) -> set[str]:
    """ListAdapters on the replica's own gRPC port."""
    from runtime.server.client import QuiverClient

    with QuiverClient(replica["grpc"], timeout=30) as q:
        return {a.adapter_id for a in q.list_adapters()}
