"""Assembling a Quiver server and running its life cycle.

    build_server(cfg)   load_base -> AdapterRegistry(slots, max rank) -> AdapterStore ->
                        AdapterLoader -> Engine -> EngineLoop -> Core (+ Metrics wiring)
    server.start()      --preload adapters, engine thread, gRPC (Generation, Adapters, Health,
                        reflection), /metrics HTTP, the OpenAI HTTP port (runtime/server/http,
                        same Core), gauge refresher; health -> SERVING
    server.shutdown()   drain (below), then everything stops

Drain (SIGTERM, see serve_cli.py): health goes NOT_SERVING so load balancers move away; new
Generate calls are answered UNAVAILABLE ("shutting down") while the gRPC server itself keeps
running, so the in-flight streams keep flowing and health checks still get an answer; once the
engine has no work, or the grace period is over, gRPC stops (a request still running then is
cancelled, which frees its KV) and the engine thread ends. The HTTP port follows the same
steps: /health answers 503 from the start of the drain, new requests 503, open streams finish,
then uvicorn stops.

Every RPC passes two interceptors before a servicer: auth.py (bearer tokens: Adapters needs the
admin token, Generation the API token when set; health and reflection stay open), then wire.py
(the request is parsed inside the handler, so a malformed message is INVALID_ARGUMENT rather than
gRPC's INTERNAL). Requests above --max-message-bytes are refused by gRPC itself
(RESOURCE_EXHAUSTED). With --tls-cert/--tls-key the port speaks TLS only (tls.py).

Tests build a server in-process with `build_server(ServerConfig(port=0, ...))` on a tiny model.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from runtime.adapters.loader import AdapterLoader
from runtime.adapters.registry import AdapterRegistry
from runtime.adapters.store import open_store
from runtime.config import ServerConfig
from runtime.engine.engine import Engine, EngineConfig
from runtime.engine.loop import EngineLoop
from runtime.models.base import DTYPES, LoadedBase, load_base
from runtime.nn.kernels import helper_thread, set_threads
from runtime.server import auth, tls
from runtime.server.core import Core
from runtime.server.metrics import Metrics
from runtime.server.servicers import AdaptersServicer, GenerationServicer
from runtime.server.stubs import (adapters_pb2, adapters_pb2_grpc, generation_pb2, generation_pb2_grpc,
                                  training_pb2, training_pb2_grpc)
from runtime.server.wire import DecodeGuard

log = logging.getLogger(__name__)

GENERATION_SERVICE = generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name
ADAPTERS_SERVICE = adapters_pb2.DESCRIPTOR.services_by_name["Adapters"].full_name
TRAINING_SERVICE = training_pb2.DESCRIPTOR.services_by_name["Training"].full_name
#: gauges (adapters resident, running / waiting, KV usage) are refreshed at least this often
GAUGE_REFRESH_S = 1.0
#: HTTP/2 keepalive: a peer that vanished without closing its connection (a crashed client, a
#: dropped NAT entry) is noticed within about a minute and its RPCs are cancelled, which gives
#: back their gRPC worker thread and engine capacity.
KEEPALIVE_OPTIONS = [("grpc.keepalive_time_ms", 60_000), ("grpc.keepalive_timeout_ms", 20_000)]


def build_server(cfg: ServerConfig, base: LoadedBase | None = None,
                 interceptors: Sequence[grpc.ServerInterceptor] = ()) -> "QuiverServer":
    """Everything wired, nothing started. `base` skips loading (tests share one).

    interceptors: extra ones, run on every RPC after the built-in token check (auth.py) and
    before request decoding (wire.py) and the servicers.
    """
    credentials = (tls.server_credentials(cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca)
                   if cfg.tls_cert else None)  # file errors before the slow model load
    set_threads(cfg.threads)
    base = base or load_base(cfg.model, cfg.quantize, cfg.dtype, cfg.device, cfg.nf4_kernel)
    registry = AdapterRegistry(base.model, num_slots=cfg.max_device_adapters, max_rank=cfg.max_lora_rank,
                               weight_dtype=DTYPES[cfg.adapter_dtype] if cfg.adapter_dtype else None)
    store = open_store(cfg.adapter_dir, cfg.allow_adapter_roots, cfg.adapter_store,
                       cfg.adapter_cache_dir, cfg.s3_endpoint_url)
    loader = AdapterLoader(registry, store, base.config)
    engine = Engine(base.model, base.tokenizer, registry, EngineConfig(
        max_batch_tokens=cfg.max_batch_tokens, max_running=cfg.max_running,
        kv_cache_tokens=cfg.kv_cache_tokens, max_queue=cfg.max_queue, prefix_cache=cfg.prefix_cache,
        kv_preallocate=cfg.kv_preallocate))
    loop = EngineLoop(engine, bind_threads=cfg.bind_threads and base.device.type == "cpu")
    metrics = Metrics(cfg.metrics_max_adapter_labels)
    core = Core(cfg, base, engine, loop, registry, store, loader, metrics)
    loop.on_step = core.on_step
    loader.on_loaded, loader.on_failed = core.on_adapter_loaded, core.on_adapter_failed
    registry.on_evict = core.on_adapter_evicted
    metrics.set_base(base.describe(), base.model.base_bytes())
    metrics.lora_state(registry.num_slots, set(), set())  # the series exists before any request
    core.training = _training(cfg, core, loop)
    rules = auth.rules_for(cfg.host, cfg.admin_token, cfg.api_token)
    rules[TRAINING_SERVICE] = rules[auth.ADAPTERS_SERVICE]  # training is an admin surface too
    guard = auth.AuthInterceptor(rules, on_refused=metrics.auth_refused)
    return QuiverServer(cfg, core, (guard, *interceptors, DecodeGuard()), credentials)


def _training(cfg: ServerConfig, core: Core, loop: EngineLoop):
    """Fine-tuning jobs (runtime/training) when --data-dir is set: their scheduler becomes the
    engine loop's background work, so training slices run between engine steps."""
    if cfg.data_dir is None:
        return None
    from runtime.training.service import DataDirBusy, TrainingService

    try:
        service = TrainingService.build(cfg, core, cfg.served_model_name or core.model_info()["model"])
    except DataDirBusy as e:  # serving goes on; only fine-tuning is off in this process
        log.error("fine-tuning is off: %s", e)
        return None
    loop.background = service.scheduler
    return service


def host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class QuiverServer:
    def __init__(self, cfg: ServerConfig, core: Core, interceptors: Sequence[grpc.ServerInterceptor] = (),
                 credentials: grpc.ServerCredentials | None = None):
        self.cfg, self.core = cfg, core
        self.interceptors = tuple(interceptors)
        self.credentials = credentials  # None: plaintext
        self.health = health.HealthServicer()
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.http_port: int | None = None
        self._http = None
        self._grpc: grpc.Server | None = None
        self._metrics_http = None
        self._closing = threading.Event()
        self._closed = threading.Event()
        self._shutdown_lock = threading.Lock()
        self._refresher: threading.Thread | None = None

    @property
    def address(self) -> str:
        return host_port(self.cfg.host, self.port)

    @property
    def base_model_id(self) -> str:
        """The base model's id on the HTTP port (`model` field, first in GET /v1/models)."""
        return self.cfg.served_model_name or self.core.model_info()["model"]

    # ---- start ------------------------------------------------------------------------------
    def start(self, engine_thread: bool = True) -> "QuiverServer":
        """Serve. engine_thread=False leaves stepping the engine to the caller, who then runs
        `core.loop.run()` on its (main) thread: `quiver serve` does (runtime/engine/loop.py)."""
        for adapter_id in self.cfg.preload:
            self.core.load_adapter(adapter_id)  # a bad preload fails start-up, loudly
        if engine_thread:
            self.core.loop.start()
        self._grpc = self._make_grpc_server()
        self.port = self._bind(host_port(self.cfg.host, self.cfg.port))
        self._grpc.start()
        if self.cfg.metrics_port is not None:
            self._metrics_http, _ = self.core.metrics.serve_http(self.cfg.metrics_port, self.cfg.host)
            self.metrics_port = self._metrics_http.server_port
        if self.cfg.http_port is not None:
            from runtime.server.http.app import HttpServer  # FastAPI only when HTTP is on

            self._http = HttpServer(self.core, self.base_model_id, self._closing.is_set,
                                    self.cfg.http_port).start()
            self.http_port = self._http.port
        self._refresher = threading.Thread(target=self._refresh_gauges, name="quiver-gauges", daemon=True)
        self._refresher.start()
        for service in ("", GENERATION_SERVICE, ADAPTERS_SERVICE, *self._training_services()):
            self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving on %s (%s)", self.address, "TLS" if self.credentials else "plaintext")
        return self

    def _bind(self, address: str) -> int:
        if self.credentials is not None:
            return self._grpc.add_secure_port(address, self.credentials)
        if not auth.is_loopback(self.cfg.host):
            log.warning("serving plaintext on %s: requests, and any tokens, cross the network in "
                        "clear text; set --tls-cert/--tls-key", self.cfg.host)
        return self._grpc.add_insecure_port(address)

    def _make_grpc_server(self) -> grpc.Server:
        workers = self.cfg.grpc_workers
        server = grpc.server(
            # no OpenMP team of its own on a gRPC thread (kernels.helper_thread)
            ThreadPoolExecutor(max_workers=workers, thread_name_prefix="quiver-grpc", initializer=helper_thread),
            interceptors=self.interceptors,
            # one thread per in-flight RPC; beyond that gRPC answers RESOURCE_EXHAUSTED itself
            maximum_concurrent_rpcs=workers,
            options=[
                ("grpc.so_reuseport", 0),  # never share the port with another process by accident
                # a larger request is refused by gRPC before it is parsed: RESOURCE_EXHAUSTED
                ("grpc.max_receive_message_length", self.cfg.max_message_bytes),
                *KEEPALIVE_OPTIONS,
            ],
        )
        generation_pb2_grpc.add_GenerationServicer_to_server(GenerationServicer(self.core), server)
        adapters_pb2_grpc.add_AdaptersServicer_to_server(AdaptersServicer(self.core), server)
        if self.core.training is not None:
            from runtime.server.training_servicer import TrainingServicer

            training_pb2_grpc.add_TrainingServicer_to_server(TrainingServicer(self.core.training), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (GENERATION_SERVICE, ADAPTERS_SERVICE, *self._training_services(), health.SERVICE_NAME,
             reflection.SERVICE_NAME), server)
        return server

    def _training_services(self) -> tuple[str, ...]:
        return (TRAINING_SERVICE,) if self.core.training is not None else ()

    def _refresh_gauges(self) -> None:
        dirty = self.core.gauges_dirty
        while not self._closing.is_set():
            dirty.clear()
            try:
                self.core.refresh_adapter_gauges()
                self.core.refresh_engine_gauges()
            except Exception:  # noqa: BLE001 - metrics must never take the server down
                log.exception("refreshing gauges failed")
            dirty.wait(GAUGE_REFRESH_S)

    # ---- stop -------------------------------------------------------------------------------
    def shutdown(self, grace_s: float | None = None) -> bool:
        """Drain and stop (module docstring). True if every in-flight request finished."""
        grace_s = self.cfg.grace_period_s if grace_s is None else grace_s
        with self._shutdown_lock:
            if self._closing.is_set():
                self._closed.wait()
                return True
            self._closing.set()
            t0 = time.monotonic()
            self.core.loop.accepting = False  # intake first: NOT_SERVING implies UNAVAILABLE
            self.health.enter_graceful_shutdown()
            drained = self.core.loop.drain(grace_s)
            log.info("drain %s in %.1f s", "complete" if drained else "timed out", time.monotonic() - t0)
            if self._grpc is not None:
                # Handlers of finished requests only have their last message to send; give
                # them a moment. Past the grace period, running RPCs are cancelled.
                self._grpc.stop(grace=1.0 if drained else 0).wait()
            if self._http is not None:
                self._http.stop()  # open responses got the drain; the rest are cut now
            self.core.loop.drain(2.0)  # let cancellations of what was left reach the engine
            self.core.loop.stop()
            self.core.loader.shutdown()
            if self.core.training is not None:
                self.core.training.close()
            if self._metrics_http is not None:
                self._metrics_http.shutdown()
            self.core.gauges_dirty.set()
            self._closed.set()
            return drained

    def wait(self, timeout: float | None = None) -> bool:
        """Block until shutdown() has finished (True) or the timeout passes."""
        return self._closed.wait(timeout)
