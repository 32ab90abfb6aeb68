"""The Ray Serve application: one ingress deployment in front of N Quiver replica deployments.

    app = build_app(ServerConfig(...), RayOptions(num_replicas=2))
    serve.run(app, name="quiver", route_prefix="/")        # what `quiver serve-ray` does

    serve run runtime.distributed.app:app_builder adapter_store=s3://bucket/adapters num_replicas=2

`app_builder` takes Serve's `key=value` arguments: any ServerConfig field (model, quantize,
adapter_store, max_device_adapters, ...) and any RayOptions field; `autoscaling_config` as JSON.

Sizing: a replica holds a base and an engine; `replica_cpus` (and `replica_gpus`) reserve a
node's share for it, and its torch threads follow replica_cpus unless --threads says otherwise.
`max_ongoing_requests` is how many requests Serve lets a replica hold at once: at least the
engine's running batch, or multiplexing routes an adapter's requests past the replica holding it
as soon as that replica looks busy.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace

from runtime.config import ServerConfig

APP_NAME = "quiver"


@dataclass
class RayOptions:
    num_replicas: int = 2  # ignored when autoscaling_config is set
    #: Serve's autoscaling_config (min_replicas, max_replicas, target_ongoing_requests, ...)
    autoscaling_config: dict | None = None
    replica_cpus: float = 1.0
    replica_gpus: float = 0.0
    max_ongoing_requests: int = 128
    ingress_replicas: int = 1
    app_name: str = APP_NAME
    #: how long the ingress's router waits for a replica to say how busy it is before it treats
    #: it as busy (Ray's RAY_SERVE_QUEUE_LENGTH_RESPONSE_DEADLINE_S, 0.1 s by default). A replica
    #: stepping its engine on a CPU answers slower than that at times, and a request for an
    #: adapter then falls back to a replica without it: multiplexing gives up after one miss.
    queue_probe_deadline_s: float = 1.0
    #: False: requests go to any replica (Serve's power-of-two choices), not to one holding
    #: their adapter; only a baseline for bench/ray_bench.py
    route_by_adapter: bool = True
    #: how often each replica asks the app's directory which adapters were replaced (through
    #: the load route) and reloads those it holds (replica.py)
    adapter_refresh_s: float = 1.0
    #: how often each replica compares the store's version of the adapters it holds (S3 ETags:
    #: one LIST each) with the one it loaded, and reloads a replaced one; 0 = never
    adapter_check_s: float = 30.0

    def __post_init__(self) -> None:
        if self.autoscaling_config is None and self.num_replicas < 1:
            raise ValueError("--num-replicas must be >= 1")
        if self.max_ongoing_requests < 1 or self.ingress_replicas < 1:
            raise ValueError("--max-ongoing-requests and --ingress-replicas must be >= 1")
        if self.adapter_refresh_s <= 0 or self.adapter_check_s < 0:
            raise ValueError("adapter_refresh_s must be > 0 and --adapter-check-interval >= 0")


def replica_options(cfg: ServerConfig, opts: RayOptions) -> dict:
    """serve.deployment(...) options of the Quiver replicas."""
    scale = ({"autoscaling_config": opts.autoscaling_config} if opts.autoscaling_config
             else {"num_replicas": opts.num_replicas})
    return dict(name="QuiverReplica", **scale, max_ongoing_requests=opts.max_ongoing_requests,
                ray_actor_options={"num_cpus": opts.replica_cpus, "num_gpus": opts.replica_gpus},
                # a rolling update or scale-down waits this long for in-flight requests (the
                # SIGTERM grace of `quiver serve`), then the replica drains its engine (__del__)
                graceful_shutdown_timeout_s=cfg.grace_period_s + 5, graceful_shutdown_wait_loop_s=0.5,
                health_check_period_s=5, health_check_timeout_s=30)


def build_app(cfg: ServerConfig, opts: RayOptions | None = None):
    from ray import serve

    from runtime.distributed.ingress import QuiverIngress
    from runtime.distributed.replica import QuiverReplica

    opts = opts or RayOptions()
    if cfg.threads is None:
        cfg = replace(cfg, threads=max(1, int(opts.replica_cpus)))
    # Secrets stay out of the application's config (it is stored in Ray's GCS): replicas read
    # QUIVER_API_TOKEN / QUIVER_ADMIN_TOKEN from their node's environment (replica.replica_config).
    cfg = replace(cfg, admin_token=None, api_token=None)
    replica = serve.deployment(QuiverReplica, **replica_options(cfg, opts))
    ingress = serve.deployment(QuiverIngress, name="QuiverIngress", num_replicas=opts.ingress_replicas,
                               max_ongoing_requests=opts.max_ongoing_requests * max(1, opts.num_replicas),
                               ray_actor_options={"num_cpus": 0, "runtime_env": {"env_vars": {
                                   "RAY_SERVE_QUEUE_LENGTH_RESPONSE_DEADLINE_S": str(opts.queue_probe_deadline_s)}}})
    return ingress.bind(replica.bind(cfg, opts.app_name, opts.adapter_refresh_s, opts.adapter_check_s), opts.app_name, cfg.max_message_bytes,
                        opts.route_by_adapter)


def app_builder(args: dict):
    """`serve run runtime.distributed.app:app_builder key=value ...` (module docstring)."""
    server_fields = {f.name: f for f in fields(ServerConfig)}
    option_fields = {f.name: f for f in fields(RayOptions)}
    server, options = {}, {}
    for key, value in args.items():
        if key in option_fields:
            options[key] = _typed(value, option_fields[key].type)
        elif key in server_fields:
            server[key] = _typed(value, server_fields[key].type)
        else:
            raise ValueError(f"unknown argument {key!r}: a ServerConfig or RayOptions field")
    return build_app(ServerConfig(**server), RayOptions(**options))


def _typed(value, annotation: str):
    """Serve passes strings; the dataclasses' annotations (strings here) say what they mean."""
    if not isinstance(value, str):
        return value
    kind = str(annotation)
    if "dict" in kind or "list" in kind:
        return json.loads(value)
    if kind.startswith("bool"):
        return value.lower() in ("1", "true", "yes", "on")
    if kind.startswith("int"):
        return int(value)
    if kind.startswith("float"):
        return float(value)
    return None if value == "" and "None" in kind else value


def describe(cfg: ServerConfig, opts: RayOptions) -> dict:
    """The settings a `serve-ray` start prints (no secrets: the config holds none here)."""
    return {"replicas": opts.autoscaling_config or opts.num_replicas, **{k: v for k, v in asdict(cfg).items()
            if k in ("model", "adapter_store", "adapter_dir", "max_device_adapters")}}
