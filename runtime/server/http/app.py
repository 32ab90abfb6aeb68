"""The HTTP server: a FastAPI app on uvicorn, on its own thread, beside gRPC in one process.

    HttpServer(core, ...).start() -> port      binds (port 0 = any free), serves on a thread
    HttpServer.stop()                          after the drain (app.py): uvicorn finishes open
                                               responses briefly, then the thread ends

Why a thread and not the main thread: `quiver serve` steps the engine on the main thread (it is
~2x faster there, runtime/engine/loop.py). uvicorn runs its own asyncio loop on this thread with
signal handling left to serve_cli.py (uvicorn installs none off the main thread), so SIGTERM
drains both front ends the same way. The loop only parses, converts and writes: engine
work, tokenizing and adapter loads happen on a thread pool (routes.py).

TLS: with --tls-cert/--tls-key the port speaks HTTPS only; --tls-client-ca requires client
certificates (mTLS), as on the gRPC port.
"""
from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import uvicorn
from fastapi import FastAPI

from runtime.nn.kernels import helper_thread
from runtime.server.core import Core
from runtime.server.http import errors, finetune
from runtime.server.http.routes import HttpContext, build_router

log = logging.getLogger(__name__)

#: seconds uvicorn gives open responses once stop() is called (the drain ran before it)
STOP_GRACE_S = 2.0


def http_context(core: Core, base_id: str, draining) -> tuple[HttpContext, ThreadPoolExecutor]:
    """The routes' context over `core` and the pool their blocking work runs on (the caller
    shuts it down). The seam between the routes and a transport: HttpServer serves them on
    uvicorn; a Ray Serve replica (runtime/distributed/replica.py) calls the same app in-process."""
    pool = ThreadPoolExecutor(max_workers=2 * core.cfg.grpc_workers, thread_name_prefix="quiver-http",
                              initializer=helper_thread)  # no OpenMP team of its own (kernels.py)
    return HttpContext(core, base_id, pool, core.cfg.max_message_bytes, draining, int(time.time())), pool


def make_app(ctx: HttpContext) -> FastAPI:
    app = FastAPI(title="Quiver", docs_url=None, redoc_url=None, openapi_url=None)
    errors.install(app)
    app.include_router(build_router(ctx))
    app.include_router(finetune.build_router(ctx))  # Files + Fine-tuning (runtime/training)
    return app


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (IPv6 when the host is), so port 0 can be reported."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host.strip("[]"), port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


class HttpServer:
    def __init__(self, core: Core, base_id: str, draining, port: int):
        cfg = core.cfg
        self.ctx, self._pool = http_context(core, base_id, draining)
        self.host, self.requested_port = cfg.host, port
        self.port: int | None = None
        self.config = uvicorn.Config(
            make_app(self.ctx), log_level="warning", access_log=False, lifespan="off",
            timeout_graceful_shutdown=STOP_GRACE_S, ssl_certfile=cfg.tls_cert, ssl_keyfile=cfg.tls_key,
            ssl_ca_certs=cfg.tls_client_ca,
            ssl_cert_reqs=ssl.CERT_REQUIRED if cfg.tls_client_ca else ssl.CERT_NONE)
        self._server = uvicorn.Server(self.config)
        self._thread: threading.Thread | None = None

    def start(self, timeout_s: float = 30.0) -> "HttpServer":
        sock = bind(self.host, self.requested_port)
        self.port = sock.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, args=(sock,), name="quiver-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the HTTP server did not start on {self.host}:{self.port}")
            time.sleep(0.01)
        return self

    def _serve(self, sock: socket.socket) -> None:
        asyncio.run(self._server.serve(sockets=[sock]))

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(STOP_GRACE_S + 5)
        self._pool.shutdown(wait=False, cancel_futures=True)
