"""`quiver serve-ray`: the Ray Serve application (README "Ray Serve"), started and held.

    quiver serve-ray --adapter-store s3://bucket/adapters --num-replicas 2 --http-port 8000
    quiver serve-ray --address auto ...          on a running cluster (`ray start --head` first)

Without --address a new local Ray instance is started for this process (a laptop, one machine;
never a cluster that `ray start` left running here: that one is `--address auto`), with
--num-cpus CPUs, and stopped with it.
Prints `quiver serve-ray on http://HOST:PORT (N replicas)` when the application is running, then
holds until SIGTERM / SIGINT, which deletes the application (each replica drains with
--grace-period) and, for a local Ray instance, stops it.

The same flags as `quiver serve` configure each replica, except the network (replicas serve
gRPC on free loopback ports of their node, listed by GET /v1/replicas) and fine-tuning (README).
"""
from __future__ import annotations

import argparse
import json
import signal
import threading


def add_parser(sub) -> None:
    from runtime.config import ServerConfig
    from runtime.server.serve_cli import add_serving_options

    p = sub.add_parser("serve-ray", help="serve replicas of the base model on Ray Serve, routed by adapter")
    add_serving_options(p, network=False, fine_tuning=False)
    ray = p.add_argument_group("Ray Serve (README \"Ray Serve\")")
    ray.add_argument("--address", default=None,
                     help="Ray cluster to join (`auto`, or ray://HOST:10001); default: start one here")
    ray.add_argument("--num-cpus", type=int, default=None,
                     help="CPUs of the local Ray instance (default: the machine's); not with --address")
    ray.add_argument("--host", default="127.0.0.1",
                     help="the HTTP proxy's bind address (default 127.0.0.1; 0.0.0.0 on a cluster)")
    ray.add_argument("--http-port", type=int, default=8000, help="the HTTP proxy's port (default 8000)")
    ray.add_argument("--served-model-name", default=None, metavar="NAME",
                     help="the base model's id in the `model` field (default: its name)")
    ray.add_argument("--num-replicas", type=int, default=2, help="Quiver replicas (default 2)")
    ray.add_argument("--autoscaling-config", default=None, metavar="JSON",
                     help="Serve's autoscaling_config instead of --num-replicas, e.g. "
                          "'{\"min_replicas\": 1, \"max_replicas\": 4, \"target_ongoing_requests\": 32}'")
    ray.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs reserved per replica (default 1)")
    ray.add_argument("--replica-gpus", type=float, default=0.0, help="GPUs reserved per replica (default 0)")
    ray.add_argument("--max-ongoing-requests", type=int, default=128,
                     help="requests Serve sends one replica at once (default 128; keep it above "
                          "--max-running, app.py)")
    ray.add_argument("--replica-host", default="127.0.0.1",
                     help="where each replica binds its own gRPC port (default loopback)")
    ray.add_argument("--app-name", default="quiver", help="the Serve application's name (default quiver)")
    ray.add_argument("--adapter-check-interval", type=float, default=30.0, metavar="S",
                     help="seconds between each replica's check that the adapters it holds are "
                          "still the store's copy (S3: one LIST per adapter); a replaced one is "
                          "reloaded; 0 = never (default 30)")
    # what `quiver serve`'s network and fine-tuning flags would set (replica.replica_config
    # gives each replica free ports and no fine-tuning anyway)
    d = ServerConfig()
    p.set_defaults(run=run, port=0, metrics_port=0, grpc_workers=d.grpc_workers, data_dir=None,
                   train_share=d.train_share, max_file_bytes=d.max_file_bytes, max_file_rows=d.max_file_rows,
                   max_train_epochs=d.max_train_epochs, max_train_seq_len=d.max_train_seq_len)


def options_from_args(args: argparse.Namespace):
    from runtime.distributed.app import RayOptions

    autoscaling = json.loads(args.autoscaling_config) if args.autoscaling_config else None
    return RayOptions(num_replicas=args.num_replicas, autoscaling_config=autoscaling,
                      replica_cpus=args.replica_cpus, replica_gpus=args.replica_gpus,
                      max_ongoing_requests=args.max_ongoing_requests, app_name=args.app_name,
                      adapter_check_s=args.adapter_check_interval)


def config_from_args(args: argparse.Namespace):
    from dataclasses import replace

    from runtime.server import serve_cli

    proxy_port, args.http_port = args.http_port, -1  # the replicas open no HTTP port of their own
    proxy_host, args.host = args.host, args.replica_host
    try:
        cfg = serve_cli.config_from_args(args)
    finally:
        args.http_port, args.host = proxy_port, proxy_host
    return replace(cfg, data_dir=None)


def run(args: argparse.Namespace) -> int:
    cfg, opts = config_from_args(args), options_from_args(args)  # flag errors before Ray starts
    import ray
    from ray import serve

    from runtime.distributed.app import build_app

    local = args.address is None  # then ray.init starts a Ray instance for this process
    if not local and args.num_cpus is not None:
        raise ValueError("--num-cpus sizes the local Ray instance; a cluster joined with "
                         "--address has its own (ray start --num-cpus)")
    # "local": a new instance even where RAY_ADDRESS or an earlier `ray start` names one
    # (ray.init(address=None) would join that cluster, and shutting down would stop its Serve)
    ray.init(address=args.address or "local", num_cpus=args.num_cpus, include_dashboard=False,
             namespace="quiver")
    stop = threading.Event()  # set by SIGTERM / SIGINT, also during the start; installed after
    for sig in (signal.SIGTERM, signal.SIGINT):  # ray.init, whose own SIGTERM handler kills the process
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": args.host, "port": args.http_port})
        serve.run(build_app(cfg, opts), name=opts.app_name, route_prefix="/")
        count = opts.autoscaling_config or opts.num_replicas
        print(f"quiver serve-ray on http://{args.host}:{args.http_port} ({count} replicas)", flush=True)
        stop.wait()
        serve.delete(opts.app_name)  # replicas drain (graceful_shutdown_timeout_s, then __del__)
        _remove_directory(opts.app_name)
    finally:
        if local:  # the Ray instance and its processes go with this one
            serve.shutdown()
            ray.shutdown()
    print("quiver serve-ray stopped", flush=True)
    return 0


def _remove_directory(app_name: str) -> None:
    """The app's replica directory is a detached actor: it would outlive the app on a cluster."""
    import ray

    from runtime.distributed.directory import directory_name

    try:
        ray.kill(ray.get_actor(directory_name(app_name), namespace="quiver"))
    except ValueError:
        pass  # no replica ever registered
