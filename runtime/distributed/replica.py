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

A replaced adapter (README "Ray Serve"): vLLM's load route through the ingress for an id that is
already loaded replaces it: the replica that takes the call loads the new weights from
`lora_path` (after its own requests for the id finish), publishes them to the store, and bumps
the id's generation in the app's directory. Every replica polls the generations (every
`refresh_s`, one call to a local actor) and reloads, from the store, an adapter it holds at an
older generation: its new requests for that id wait until the in-flight ones have finished on
the old weights, then the new copy is swapped in (no request sees two versions, none fails).
An adapter replaced in the store by anything else (an upload straight to the bucket) is found
every `check_s`: the replica compares the store's version of each adapter it holds (the S3
objects' ETags, one LIST each; a directory's files' mtime and size) with the one it loaded, and
reloads it the same way when they differ.

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
import threading
import time
from dataclasses import replace
from pathlib import Path

from runtime.adapters.registry import AdapterBusy, AdapterNotFound
from runtime.adapters.s3_store import S3AdapterStore
from runtime.config import ServerConfig
from runtime.distributed.asgi import Head, HttpCall, exchange

log = logging.getLogger(__name__)

#: vLLM's load route: on a replica it also publishes the adapter to the shared store
LOAD_ROUTE = "/v1/load_lora_adapter"
MODELS_ROUTE = "/v1/models"
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


#: how long a request waits for its adapter's pending reload before it runs on the old copy
RELOAD_WAIT_S = 60.0


class QuiverReplica:
    def __init__(self, cfg: ServerConfig, app_name: str = "quiver", refresh_s: float = 1.0,
                 check_s: float = 30.0):
        from ray import serve

        from runtime.nn.kernels import on_passing_thread
        from runtime.server.app import build_server
        from runtime.server.http.app import http_context, make_app

        self.cfg = cfg = replica_config(cfg)
        # built on a passing thread: no OpenMP team outlives it beside the engine's (kernels.py)
        self.server = on_passing_thread(build_server, cfg).start(engine_thread=True)
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
        # replaced adapters (module docstring): the directory's generations as last polled, the
        # generation and store version each held adapter was loaded at, those whose reload is pending
        self._generations: dict[str, int] = {}
        self._loaded_at: dict[str, int] = {}
        self._versions: dict[str, dict | None] = {}
        self._stale: set[str] = set()
        self._closing = threading.Event()
        self._register()
        threading.Thread(target=self._watch, args=(refresh_s, check_s), name="quiver-adapter-watch",
                         daemon=True).start()
        log.info("replica %s serving %s (gRPC %s)", self.replica_id, self.base, self.server.address)

    async def _lease(self, adapter_id: str) -> AdapterLease:
        generation = self._generations.get(adapter_id, 0)  # polled before the fetch: never newer
        await asyncio.get_running_loop().run_in_executor(self._pool, self._ensure, adapter_id)
        self._loaded_at[adapter_id] = generation
        return AdapterLease(self.server.core, adapter_id)

    def _ensure(self, adapter_id: str) -> None:
        self.server.core.ensure_adapter(adapter_id)  # lazily, from the store
        self._versions[adapter_id] = self._copy_version(adapter_id)

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
        if call.path == MODELS_ROUTE and call.method == "GET":
            for part in await self._models(call):
                yield self._tagged(part)
            return
        if adapter_id in self._stale:  # its new copy goes in once the running requests finish
            deadline = time.monotonic() + RELOAD_WAIT_S
            while adapter_id in self._stale and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
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
        """vLLM's load route, then the adapter goes to the shared store (store.publish), into
        Serve's multiplexer here, and its generation is bumped (every other holder reloads it),
        so this replica is where its requests go and any other can fetch it. An id this replica
        holds already is replaced (module docstring), not refused. The answer is held until then:
        a failed upload is the answer."""
        adapter_id = _lora_name(call.body)
        core = self.server.core
        replacing = bool(adapter_id) and core.registry.contains(adapter_id)
        if replacing:
            refusal = await self._refusal(call)  # the route's own auth, before anything changes
            if refusal is not None:
                for part in refusal:
                    yield self._tagged(part)
                return
            self._stale.add(adapter_id)  # new requests for it wait; the running ones finish
        try:
            if replacing:
                await asyncio.get_running_loop().run_in_executor(self._pool, self._unload_when_idle, adapter_id)
            parts = [p async for p in exchange(self.app, call)]
            if parts[0].status == 200:
                parts = await self._publish(adapter_id) or parts
        finally:
            self._stale.discard(adapter_id)
        for part in parts:
            yield self._tagged(part)

    async def _publish(self, adapter_id: str) -> list | None:
        """Upload the loaded adapter, hold it in the multiplexer, bump its generation; None when
        all went well, else the error answer."""
        core = self.server.core
        try:
            source = Path(core.adapter_info(adapter_id).source)
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._pool, core.store.publish, adapter_id, source)
            await self._adapter(adapter_id)
            self._versions[adapter_id] = await loop.run_in_executor(self._pool, self._store_version, adapter_id)
            self._loaded_at[adapter_id] = await self._directory.replaced.remote(adapter_id)
        except Exception as e:  # noqa: BLE001 - as the routes answer it
            from runtime.server.http.errors import from_exception

            status, body = from_exception(e)
            return [Head(status, [("content-type", "application/json")]), json.dumps(body).encode()]
        return None

    async def _refusal(self, call: HttpCall) -> list | None:
        """The load route's admin-token check on `call`: None if it passes, else its answer."""
        from starlette.requests import Request

        from runtime.server import auth
        from runtime.server.http.access import guard
        from runtime.server.http.errors import HttpError, from_exception

        cfg, core = self.cfg, self.server.core
        rule = auth.rules_for(cfg.host, cfg.admin_token, cfg.api_token)[auth.ADAPTERS_SERVICE]
        try:
            await guard(rule, auth.ADAPTERS_SERVICE, core.metrics.auth_refused)(Request(call.scope()))
        except HttpError as e:
            status, body = from_exception(e)
            return [Head(status, [("content-type", "application/json")]), json.dumps(body).encode()]
        return None

    # ---- replaced adapters ------------------------------------------------------------------
    def _watch(self, refresh_s: float, check_s: float) -> None:
        """Poll the directory's generations every refresh_s, the store's versions of the held
        adapters every check_s (0: never); reload what is held at an older one."""
        import ray

        checked = time.monotonic()
        while not self._closing.wait(refresh_s):
            try:
                self._generations = ray.get(self._directory.generations.remote(), timeout=10)
            except Exception as e:  # noqa: BLE001 - the directory is restarting: next time
                log.debug("adapter generations unavailable: %s", e)
            for adapter_id, generation in self._generations.items():
                if self._loaded_at.get(adapter_id, 0) < generation and self.server.core.registry.contains(adapter_id):
                    self._reload(adapter_id, generation)
            if check_s and time.monotonic() - checked >= check_s:
                checked = time.monotonic()
                self._check_versions()

    def _check_versions(self) -> None:
        """Reload each held adapter whose copy in the store is not the one it was loaded from."""
        for adapter_id, loaded in list(self._versions.items()):
            if not self.server.core.registry.contains(adapter_id):
                self._versions.pop(adapter_id, None)
                continue
            try:
                now = self._store_version(adapter_id)
            except Exception as e:  # noqa: BLE001 - the store is unreachable: next time
                log.debug("adapter %s: the store's version is unknown: %s", adapter_id, e)
                continue
            if now and now != loaded:  # {}: gone from the store; the held copy keeps serving
                self._reload(adapter_id, self._loaded_at.get(adapter_id, 0), now)

    def _reload(self, adapter_id: str, generation: int, version: dict | None = None) -> None:
        """The store's copy in place of the held one, once its running requests have finished
        (new ones wait: self._stale). `version`: the store's, when the check found it."""
        core = self.server.core
        self._stale.add(adapter_id)
        try:
            core.store.fetch(adapter_id)  # the new objects into the cache (s3_store.py)
            while not self._closing.is_set():
                if self._idle(adapter_id):
                    try:
                        core.load_adapter(adapter_id)  # from the store's path for the id
                        break
                    except AdapterBusy:  # a request slipped in before the gate: wait again
                        pass
                time.sleep(0.02)
            version = self._copy_version(adapter_id)
            log.info("adapter %s reloaded from %s (generation %d)", adapter_id, core.store.describe(), generation)
        except Exception as e:  # noqa: BLE001 - keeps the old copy; the next replacement retries
            log.warning("adapter %s could not be reloaded from the store: %s", adapter_id, e)
        finally:
            self._loaded_at[adapter_id] = generation
            if version is not None:  # a failed reload is not retried for the same version
                self._versions[adapter_id] = version
            self._stale.discard(adapter_id)

    def _store_version(self, adapter_id: str) -> dict | None:
        """The version of the adapter in the store now (S3 ETags, or a directory's files)."""
        return self.server.core.store.version(adapter_id)

    def _copy_version(self, adapter_id: str) -> dict | None:
        """The version of the local copy this replica loads the adapter from."""
        return self.server.core.store.cached_version(adapter_id)

    def _unload_when_idle(self, adapter_id: str) -> None:
        """Unload `adapter_id` once its running requests finish (--grace-period at most; past
        it, it goes when they finish and the load route answers that it is busy)."""
        deadline = time.monotonic() + self.cfg.grace_period_s
        while not self._idle(adapter_id) and time.monotonic() < deadline:
            time.sleep(0.02)
        self.server.core.unload_adapter(adapter_id)

    def _idle(self, adapter_id: str) -> bool:
        try:
            return self.server.core.adapter_info(adapter_id).in_flight == 0
        except AdapterNotFound:
            return True

    async def _models(self, call: HttpCall) -> list:
        """GET /v1/models: the route's list (the base, what this replica holds or has cached),
        then every other adapter in a shared S3 store, so the app lists what any replica can
        serve, not what one replica happened to fetch. (A local --adapter-dir is listed whole
        by the route already.)"""
        parts = [p async for p in exchange(self.app, call)]
        store = self.server.core.store
        if parts[0].status != 200 or not isinstance(store, S3AdapterStore):
            return parts
        listing = json.loads(b"".join(parts[1:]))
        try:
            remote = await asyncio.get_running_loop().run_in_executor(self._pool, store.remote_ids)
        except Exception as e:  # noqa: BLE001 - the store is down: the replica's own view
            log.warning("GET /v1/models without the store's adapters: %s", e)
            remote = []
        seen = {card["id"] for card in listing["data"]}
        base = listing["data"][0]
        listing["data"] += [{"id": a, "object": "model", "created": base["created"], "owned_by": "quiver",
                             "root": store.location.uri(a), "parent": self.base} for a in remote if a not in seen]
        head = Head(200, [(k, v) for k, v in parts[0].headers if k.lower() != "content-length"])
        return [head, json.dumps(listing).encode()]

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
        self._directory = directory(self.app_name)
        ray.get(self._directory.register.remote(self.replica_id, self.info(), me))

    # ---- life cycle -------------------------------------------------------------------------
    def check_health(self) -> None:
        """Serve's periodic probe: a replica whose engine loop died is replaced."""
        if not self.server.core.loop.running:
            raise RuntimeError("the engine loop has stopped")

    def __del__(self):
        closing = getattr(self, "_closing", None)
        if closing is not None:
            closing.set()
        server = getattr(self, "server", None)
        if server is not None:
            server.shutdown()  # drain with --grace-period, as on SIGTERM
            self._pool.shutdown(wait=False, cancel_futures=True)


def _lora_name(body: bytes) -> str:
    """The load route's `lora_name`, "" when the body has none (the route answers that)."""
    try:
        value = json.loads(body).get("lora_name")
    except (ValueError, AttributeError):
        return ""
    return value if isinstance(value, str) else ""


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
