"""`quiver serve`: the gRPC server (README "Server").

Prints one line when ready, `quiver serving on HOST:PORT and http :H (metrics :P)` (scripts and
tests wait for it; with port 0 it carries the ports actually bound; `http off` / `metrics off`
when disabled; the gRPC address stays the 4th word and the metrics port the text after
"(metrics ", as before the HTTP port existed). SIGTERM or SIGINT starts a drain
(app.py): intake stops, in-flight requests get --grace-period seconds to finish, then the process
exits 0. A second signal exits at once (status 130).

Secrets: --admin-token / --api-token on the command line are visible to other local users in
`ps`; the environment variables QUIVER_ADMIN_TOKEN / QUIVER_API_TOKEN are the better carrier (a
flag, when given, wins). Neither is ever printed or logged.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

#: seconds a thread holding the GIL keeps it while another waits (CPython's default: 0.005)
GIL_SWITCH_S = 0.001


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve the base model and its adapters over gRPC and HTTP")
    add_serving_options(p)
    p.set_defaults(run=run)


def add_serving_options(p: argparse.ArgumentParser, network: bool = True, fine_tuning: bool = True) -> None:
    """The flags of one server (model, adapters, engine, security, operations); `quiver
    serve-ray` (runtime/distributed/cli.py) shares them, with its own network flags and no
    fine-tuning, and sets those attributes' defaults itself."""
    from runtime.cli import add_model_options
    from runtime.config import ServerConfig

    d = ServerConfig()
    add_model_options(p)
    if network:
        _network_options(p, d)
    _adapter_and_engine_options(p, d)
    if fine_tuning:
        _fine_tuning_options(p, d)
    _security_and_ops_options(p, d)


def _network_options(p: argparse.ArgumentParser, d) -> None:
    net = p.add_argument_group("network")
    net.add_argument("--host", default=d.host, help=f"bind address (default {d.host}: loopback only)")
    net.add_argument("--port", type=int, default=d.port, help=f"gRPC port (default {d.port}; 0 = any free)")
    net.add_argument("--metrics-port", type=int, default=d.metrics_port,
                     help=f"Prometheus /metrics port (default {d.metrics_port}; -1 = off; 0 = any free)")
    net.add_argument("--http-port", type=int, default=8000,
                     help="OpenAI-compatible HTTP port, same --host (default 8000; -1 = off; 0 = any free)")
    net.add_argument("--served-model-name", default=None, metavar="NAME",
                     help="the base model's id in the HTTP API's `model` field (default: its name)")
    net.add_argument("--grpc-workers", type=int, default=d.grpc_workers,
                     help=f"concurrent RPCs (default {d.grpc_workers}); more are RESOURCE_EXHAUSTED")


def _adapter_and_engine_options(p: argparse.ArgumentParser, d) -> None:
    from runtime.config import ADAPTER_DTYPES

    ad = p.add_argument_group("adapters")
    ad.add_argument("--adapter-dir", default=None,
                    help="directory of PEFT adapters: an unknown adapter id is loaded from "
                         "<adapter-dir>/<id> on first use")
    ad.add_argument("--adapter-store", default=None, metavar="URI",
                    help="a store every server shares: s3://bucket/prefix (AWS settings from the "
                         "environment; README \"Ray Serve\"), or a directory (= --adapter-dir)")
    ad.add_argument("--adapter-cache-dir", default=None, metavar="DIR",
                    help="local copies of an s3:// store's adapters (default: "
                         "$QUIVER_HOME/adapter-cache/<bucket>/<prefix>)")
    ad.add_argument("--s3-endpoint-url", default=None, metavar="URL",
                    help="an S3-compatible server (MinIO, Ceph...; default: AWS_ENDPOINT_URL or AWS)")
    ad.add_argument("--allow-adapter-root", action="append", default=[], metavar="DIR",
                    dest="allow_adapter_roots",
                    help="another directory LoadAdapter may read sources from (repeatable)")
    ad.add_argument("--preload", nargs="+", default=[], metavar="ID",
                    help="adapter ids to load from --adapter-dir before serving")
    ad.add_argument("--max-device-adapters", type=int, default=d.max_device_adapters,
                    help=f"adapters resident on the device at once (default {d.max_device_adapters})")
    ad.add_argument("--max-lora-rank", type=int, default=d.max_lora_rank,
                    help=f"largest LoRA rank accepted; sizes the device slots (default {d.max_lora_rank})")
    ad.add_argument("--adapter-dtype", choices=ADAPTER_DTYPES, default=None,
                    help="LoRA slot weights' storage (default: the activations' dtype, fp32 on CPU). "
                         "bfloat16 halves the memory a step over many adapters streams; the math "
                         "stays fp32, each weight is rounded to bf16 once at load (exact for "
                         "adapters saved in bf16)")
    en = p.add_argument_group("engine")
    en.add_argument("--max-batch-tokens", type=int, default=d.max_batch_tokens,
                    help=f"tokens per engine step (default {d.max_batch_tokens})")
    en.add_argument("--max-running", type=int, default=d.max_running,
                    help=f"requests in the running batch (default {d.max_running})")
    en.add_argument("--kv-cache-tokens", type=int, default=d.kv_cache_tokens,
                    help=f"KV cache budget over all requests (default {d.kv_cache_tokens})")
    en.add_argument("--prefix-cache", action=argparse.BooleanOptionalAction, default=d.prefix_cache,
                    help="reuse the KV of a prompt's leading full blocks computed earlier for the "
                         "same adapter (default on; --no-prefix-cache recomputes every prompt)")
    en.add_argument("--kv-preallocate", action="store_true",
                    help="allocate the whole --kv-cache-tokens budget at start-up (memory stays put; "
                         "default: the cache doubles up to it as traffic needs)")
    en.add_argument("--bind-threads", action=argparse.BooleanOptionalAction, default=d.bind_threads,
                    help="pin the engine's compute threads one per CPU on CPU devices, where --threads "
                         "is the number of CPUs (default off: placement left to the OS)")
    en.add_argument("--max-queue", type=int, default=d.max_queue,
                    help=f"waiting requests before RESOURCE_EXHAUSTED (default {d.max_queue}; 0 = no cap)")
    en.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens,
                    help=f"cap on a request's max_new_tokens (default {d.max_new_tokens})")


def _fine_tuning_options(p: argparse.ArgumentParser, d) -> None:
    ft = p.add_argument_group("fine-tuning jobs (README \"Fine-tuning in the server\")")
    ft.add_argument("--data-dir", default=None, metavar="DIR",
                    help="uploaded files, job state and checkpoints (default: $QUIVER_HOME/data, "
                         "i.e. ~/.cache/quiver/data)")
    ft.add_argument("--train-share", type=float, default=d.train_share,
                    help=f"largest share of engine time a job trains while requests wait (default "
                         f"{d.train_share}; with no traffic it takes all of it)")
    ft.add_argument("--max-file-bytes", type=int, default=d.max_file_bytes,
                    help=f"largest uploaded training file (default {d.max_file_bytes})")
    ft.add_argument("--max-file-rows", type=int, default=d.max_file_rows,
                    help=f"most rows in one training file (default {d.max_file_rows})")
    ft.add_argument("--max-train-epochs", type=int, default=d.max_train_epochs,
                    help=f"largest n_epochs a job may ask for (default {d.max_train_epochs})")
    ft.add_argument("--max-train-seq-len", type=int, default=d.max_train_seq_len,
                    help=f"largest max_seq_len a job may ask for (default {d.max_train_seq_len})")


def _security_and_ops_options(p: argparse.ArgumentParser, d) -> None:
    sec = p.add_argument_group("security and limits (README \"Security and limits\")")
    sec.add_argument("--admin-token", default=None, metavar="TOKEN",
                     help="bearer token the Adapters service requires (default: env "
                          "QUIVER_ADMIN_TOKEN; none: Adapters is open on a loopback bind and "
                          "disabled on any other)")
    sec.add_argument("--api-token", default=None, metavar="TOKEN",
                     help="bearer token Generation requires (default: env QUIVER_API_TOKEN; none: open)")
    sec.add_argument("--tls-cert", default=None, metavar="PEM", help="certificate chain: serve TLS only")
    sec.add_argument("--tls-key", default=None, metavar="PEM", help="private key of --tls-cert")
    sec.add_argument("--tls-client-ca", default=None, metavar="PEM",
                     help="CA bundle for client certificates: every client must present one (mTLS)")
    sec.add_argument("--max-message-bytes", type=int, default=d.max_message_bytes,
                     help=f"largest request accepted (default {d.max_message_bytes}); "
                          "larger ones are RESOURCE_EXHAUSTED")
    sec.add_argument("--max-input-chars", type=int, default=d.max_input_chars,
                     help=f"longest prompt text, or chat contents together (default {d.max_input_chars}); "
                          "longer is INVALID_ARGUMENT")
    ops = p.add_argument_group("operations")
    ops.add_argument("--grace-period", type=float, default=d.grace_period_s,
                     help=f"seconds in-flight requests get after SIGTERM (default {d.grace_period_s:g})")
    ops.add_argument("--metrics-max-adapter-labels", type=int, default=d.metrics_max_adapter_labels,
                     help="adapters with their own metrics label; the rest report as 'other' "
                          f"(default {d.metrics_max_adapter_labels})")


def config_from_args(args: argparse.Namespace):
    from runtime.config import ServerConfig

    return ServerConfig(
        model=args.model, quantize=args.quantize, dtype=args.dtype, device=args.device,
        nf4_kernel=args.nf4_kernel, threads=args.threads,
        host=args.host, port=args.port,
        metrics_port=None if args.metrics_port < 0 else args.metrics_port,
        http_port=None if args.http_port < 0 else args.http_port,
        served_model_name=args.served_model_name,
        grpc_workers=args.grpc_workers, adapter_dir=args.adapter_dir,
        allow_adapter_roots=args.allow_adapter_roots, preload=args.preload,
        adapter_store=args.adapter_store, adapter_cache_dir=args.adapter_cache_dir,
        s3_endpoint_url=args.s3_endpoint_url,
        max_device_adapters=args.max_device_adapters, max_lora_rank=args.max_lora_rank,
        adapter_dtype=args.adapter_dtype,
        max_batch_tokens=args.max_batch_tokens, max_running=args.max_running,
        kv_cache_tokens=args.kv_cache_tokens, prefix_cache=args.prefix_cache,
        kv_preallocate=args.kv_preallocate, bind_threads=args.bind_threads, max_queue=args.max_queue,
        max_new_tokens=args.max_new_tokens, grace_period_s=args.grace_period,
        data_dir=args.data_dir or _default_data_dir(), train_share=args.train_share,
        max_file_bytes=args.max_file_bytes, max_file_rows=args.max_file_rows,
        max_train_epochs=args.max_train_epochs, max_train_seq_len=args.max_train_seq_len,
        metrics_max_adapter_labels=args.metrics_max_adapter_labels,
        admin_token=args.admin_token or os.environ.get("QUIVER_ADMIN_TOKEN"),
        api_token=args.api_token or os.environ.get("QUIVER_API_TOKEN"),
        tls_cert=args.tls_cert, tls_key=args.tls_key, tls_client_ca=args.tls_client_ca,
        max_message_bytes=args.max_message_bytes, max_input_chars=args.max_input_chars,
    )


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)  # flag errors before the slow model load
    from runtime.server.app import build_server

    server = build_server(cfg).start(engine_thread=False)
    print(f"quiver: {server.core.base.kernel_line()}; {torch_threads()} threads", flush=True)
    stop = _install_signal_handlers(server)
    metrics = f"metrics :{server.metrics_port}" if server.metrics_port is not None else "metrics off"
    http = f"http :{server.http_port}" if server.http_port is not None else "http off"
    print(f"quiver serving on {server.address} and {http} ({metrics})", flush=True)
    drained: list[bool] = []

    def drain_on_signal() -> None:
        stop.wait()
        drained.append(server.shutdown())  # the engine keeps stepping meanwhile; ends its loop

    stopper = threading.Thread(target=drain_on_signal, name="quiver-shutdown", daemon=True)
    stopper.start()
    # The engine steps on this main thread (much faster than on a second thread: loop.py). It
    # runs Python between kernels and waits at most 50 ms when idle, so a SIGTERM delivered to
    # any thread reaches the handler here promptly.
    # The engine thread takes the GIL back after each C++ call; a helper thread busy in Python
    # (a job's tokenizing, an adapter's load) held it up to CPython's 5 ms switch interval each
    # time, several times a step: 1 ms bounds that wait (GIL_SWITCH_S).
    sys.setswitchinterval(GIL_SWITCH_S)
    server.core.loop.run()
    stopper.join()
    print(f"quiver stopped ({'drained' if drained and drained[0] else 'grace period over; the rest were cancelled'})",
          flush=True)
    return 0


def _install_signal_handlers(server) -> threading.Event:
    """First SIGTERM / SIGINT: begin the drain. Second: exit at once (status 130), for an
    operator who will not wait; in-flight requests are lost then."""
    stop = threading.Event()

    def handle(signum, frame):
        if stop.is_set():
            print("quiver: second signal, exiting without draining", file=sys.stderr, flush=True)
            os._exit(130)
        stop.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
    return stop


def _default_data_dir() -> str:
    from runtime.models.embedded import quiver_home

    return str(quiver_home() / "data")
