"""One Quiver replica in a Ray Serve application: a whole Quiver server (one base, one engine with
its continuous batching across adapters) inside a Serve replica actor.

    forward(HttpCall)      the OpenAI routes of runtime/server/http, called in-process (asgi.py);
                           streams a Head, then body chunks, back to the ingress
    base_id() / info()     the base model's id; this replica's id, node and ports

Adapters and Serve's model multiplexing: the ingress sends each request with
`multiplexed_model_id = <adapter id>`; Serve routes it to a replica that reported that id. The
replica "loads the model" for Serve by making sure the adapter is registered (Core.ensure_adapter:
lazily, from the shared store, s3_store.py), and Serve's per-replica LRU holds at most
`max_device_adapters` ids, the engine's device slots; when Serve evicts one (the lease's
`__del__`), the adapter is unloaded here too, so what Serve routes by is what the replica holds.
The engine's own LRU still decides slot by slot which registered adapters are on the device.
No `@serve.batch`: it would split batches by model id, and one batch mixing adapters is the point.

Each replica also serves gRPC (Generation, Adapters: ListAdapters per replica) on a free port of
--replica-host (loopback by default), and registers itself in the app's directory
(directory.py), which GET /v1/replicas on the ingress lists.

Shutdown (scale-down, rolling update): Serve stops routing to the replica and waits for its
in-flight requests (graceful_shutdown_timeout_s, set from --grace-period), then calls
`__del__`, which drains the engine as SIGTERM does for `quiver serve` (app.py QuiverServer.shutdown).
A replica whose engine loop died fails `check_health`, and Serve replaces it.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
from dataclasses import replace
from pathlib import Path

from runtime.config import ServerConfig
from runtime.distributed.asgi import Head, HttpCall, exchange

log = logging.getLogger(__name__)

#: vLLM's load route: on a replica it also publishes the adapter to the shared store
LOAD_ROUTE = "/v1/load_lora_adapter"
REPLICA_HEADER = "x-quiver-replica"
#: "1" when the replica held the request's adapter before the request (affinity, bench/ray_bench.py)
RESIDENT_HEADER = "x-quiver-adapter-resident"


class AdapterLease:
    """What Serve's multiplexer caches for an adapter id. Serve calls `__del__` when it evicts
    the id (LRU); the adapter is then unloaded from this replica (after its in-flight requests)."""

    def __init__(self, core, adapter_id: str):
        self.core, self.adapter_id = core, adapter_id
        self.released = False

    def __del__(self):
        if self.released:  # Serve calls it, then the garbage collector does again
            return
        self.released = True
        try:
            self.core.unload_adapter(self.adapter_id)
        except Exception:  # noqa: BLE001 - already gone (unloaded over gRPC, never loaded)
            pass


class QuiverReplica:
    def __init__(self, cfg: ServerConfig, app_name: str = "quiver"):
        from ray import serve

        from runtime.server.app import build_server
        from runtime.server.http.app import http_context, make_app

        self.cfg = cfg = replica_config(cfg)
        self.server = build_server(cfg).start(engine_thread=True)
        core = self.server.core
        self.base = self.server.base_model_id
        self.ctx, self._pool = http_context(core, self.base, lambda: not core.loop.accepting)
        self.app = make_app(self.ctx)
        context = serve.get_replica_context()
        self.replica_id = context.replica_id.unique_id
        self.actor_name = context.replica_id.to_full_id_str()  # in Ray's "serve" namespace
        self.app_name = app_name
        # Serve's multiplexer, bounded by the engine's device slots (module docstring). Wired on
        # the instance (Serve detects that at run time) because the bound comes from the config.
        # (A plain function: Serve keeps its cache as an attribute of what it decorates.)
        async def lease(adapter_id: str) -> AdapterLease:
            return await self._lease(adapter_id)

        self._adapter = serve.multiplexed(max_num_models_per_replica=cfg.max_device_adapters)(lease)
        self._register()
        log.info("replica %s serving %s (gRPC %s)", self.replica_id, self.base, self.server.address)

    async def _lease(self, adapter_id: str) -> AdapterLease:
        await asyncio.get_running_loop().run_in_executor(self._pool, self.server.core.ensure_adapter, adapter_id)
        return AdapterLease(self.server.core, adapter_id)

    # ---- requests ---------------------------------------------------------------------------
    async def forward(self, call: HttpCall, adapter_id: str = ""):
        """The routes' answer to `call`: a Head (with this replica's id and whether it held the
        adapter already), then body chunks. The adapter is Serve's multiplexed model id, or
        `adapter_id` when the ingress routes without multiplexing (RayOptions.route_by_adapter)."""
        from ray import serve

        adapter_id = adapter_id or serve.get_multiplexed_model_id()
        if call.path == LOAD_ROUTE:
            async for part in self._load_and_publish(call):
                yield part
            return
        resident = bool(adapter_id) and self.server.core.registry.contains(adapter_id)
        if adapter_id:
            try:
                await self._adapter(adapter_id)
            except Exception as e:  # noqa: BLE001 - the route answers it properly (404, 400, 503...)
                log.info("adapter %s not loaded ahead of its request: %s", adapter_id, e)
        async for part in exchange(self.app, call):
            if isinstance(part, Head) and adapter_id:
                part.headers.append((RESIDENT_HEADER, "1" if resident else "0"))
            yield self._tagged(part)

    async def _load_and_publish(self, call: HttpCall):
        """vLLM's load route, then the adapter goes to the shared store (store.publish) and into
        Serve's multiplexer here, so this replica is where its requests go and any other can
        fetch it. The answer is held until then: a failed upload is the answer."""
        parts = [p async for p in exchange(self.app, call)]
        head = parts[0]
        if head.status == 200:
            adapter_id = json.loads(call.body)["lora_name"]
            try:
                core = self.server.core
                source = Path(core.adapter_info(adapter_id).source)
                await asyncio.get_running_loop().run_in_executor(self._pool, core.store.publish, adapter_id, source)
                await self._adapter(adapter_id)
            except Exception as e:  # noqa: BLE001 - as the routes answer it
                from runtime.server.http.errors import from_exception

                status, body = from_exception(e)
                parts = [Head(status, [("content-type", "application/json")]), json.dumps(body).encode()]
        for part in parts:
            yield self._tagged(part)

    def _tagged(self, part):
        if isinstance(part, Head):
            part.headers.append((REPLICA_HEADER, self.replica_id))

        return part

    # ---- inspection -------------------------------------------------------------------------
    def base_id(self) -> str:
        return self.base

    def info(self) -> dict:
        core = self.server.core
        return {"replica_id": self.replica_id, "actor_name": self.actor_name, "node_ip": _node_ip(), "pid": os.getpid(),
                "grpc": _reachable(self.cfg.host, self.server.port),
                "metrics": _reachable(self.cfg.host, self.server.metrics_port) if self.server.metrics_port else None,
                "max_device_adapters": core.registry.num_slots}

    def _register(self) -> None:
        import ray

        from runtime.distributed.directory import directory

        me = ray.get_runtime_context().current_actor
        ray.get(directory(self.app_name).register.remote(self.replica_id, self.info(), me))

    # ---- life cycle -------------------------------------------------------------------------
    def check_health(self) -> None:
        """Serve's periodic probe: a replica whose engine loop died is replaced."""
        if not self.server.core.loop.running:
            raise RuntimeError("the engine loop has stopped")

    def __del__(self):
        server = getattr(self, "server", None)
        if server is not None:
            server.shutdown()  # drain with --grace-period, as on SIGTERM
            self._pool.shutdown(wait=False, cancel_futures=True)


def replica_config(cfg: ServerConfig) -> ServerConfig:
    """A replica's own settings: gRPC and metrics on free ports (several replicas share a node),
    no HTTP port of its own (the ingress is the front door), no fine-tuning (jobs live in one
    server's --data-dir; README "Ray Serve"), tokens from the node's environment (never shipped
    in the application's config)."""
    return replace(cfg, port=0, metrics_port=0, http_port=None, data_dir=None, preload=list(cfg.preload),
                   admin_token=cfg.admin_token or os.environ.get("QUIVER_ADMIN_TOKEN"),
                   api_token=cfg.api_token or os.environ.get("QUIVER_API_TOKEN"))


def _node_ip() -> str:
    import ray

    return ray.util.get_node_ip_address()


def _reachable(host: str, port: int | None) -> str | None:
    if port is None:
        return None
    if host in ("0.0.0.0", "::", ""):
        host = _node_ip() if host != "" else socket.gethostname()
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
