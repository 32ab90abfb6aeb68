"""A small Python client for a Quiver server.

    from runtime.server.client import QuiverClient
    with QuiverClient("127.0.0.1:8033") as q:
        r = q.generate("Once upon a time", adapter_id="story-v2", max_new_tokens=32)
        print(r.text, r.stop_reason)
        for chunk in q.generate_stream("Hi", temperature=0.7, seed=1):
            print(chunk.text, end="")
        q.load_adapter("support-v3", source="support-v3")   # relative to the server's --adapter-dir

Keyword arguments of generate / generate_stream are GenerationParameters fields. Calls return
the protobuf messages (GenerateResponse, AdapterInfo, ...); errors arrive as grpc.RpcError with
the status code and the server's message (README "Errors").

A server with tokens or TLS (README "Security and limits"):

    QuiverClient("gpu-1:8033", token=os.environ["QUIVER_TOKEN"], tls_ca="ca.pem")
    QuiverClient(..., tls_ca="ca.pem", tls_cert="me.pem", tls_key="me-key.pem")   # mTLS

The token goes with every call as `authorization: Bearer <token>` (a channel interceptor, so the
stubs' own methods, `.future` included, carry it too).
"""
from __future__ import annotations

import argparse
import os
from collections.abc import Iterator, Sequence

import grpc

from runtime.server.tls import channel_credentials

from runtime.server.stubs import adapters_pb2 as apb
from runtime.server.stubs import adapters_pb2_grpc
from runtime.server.stubs import generation_pb2 as gpb
from runtime.server.stubs import generation_pb2_grpc


class _BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds `authorization: Bearer <token>` to every call's metadata."""

    def __init__(self, token: str):
        self._header = ("authorization", f"Bearer {token}")

    def _with_token(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return _CallDetails(details.method, details.timeout, [*(details.metadata or ()), self._header],
                            details.credentials, details.wait_for_ready, details.compression)

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._with_token(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._with_token(client_call_details), request)


class _CallDetails(grpc.ClientCallDetails):
    def __init__(self, method, timeout, metadata, credentials, wait_for_ready, compression):
        self.method, self.timeout, self.metadata = method, timeout, metadata
        self.credentials, self.wait_for_ready, self.compression = credentials, wait_for_ready, compression


def make_channel(target: str, *, token: str | None = None, tls: bool = False, tls_ca: str | None = None,
                 tls_cert: str | None = None, tls_key: str | None = None) -> grpc.Channel:
    """A channel to a Quiver server: TLS when `tls` or any tls_* file is given (no CA file: the
    system's roots), plaintext otherwise; `token` sent with every call."""
    if tls or tls_ca or tls_cert:
        channel = grpc.secure_channel(target, channel_credentials(tls_ca, tls_cert, tls_key))
    else:
        channel = grpc.insecure_channel(target)
    return grpc.intercept_channel(channel, _BearerToken(token)) if token else channel


class QuiverClient:
    def __init__(self, target: str, timeout: float | None = None, channel: grpc.Channel | None = None,
                 *, token: str | None = None, tls: bool = False, tls_ca: str | None = None,
                 tls_cert: str | None = None, tls_key: str | None = None):
        """target: HOST:PORT. timeout: default deadline (seconds) of every call; None = none.
        token / tls*: see make_channel (ignored when `channel` is given)."""
        self.channel = channel or make_channel(target, token=token, tls=tls, tls_ca=tls_ca,
                                               tls_cert=tls_cert, tls_key=tls_key)
        self.timeout = timeout
        self.generation = generation_pb2_grpc.GenerationStub(self.channel)
        self.adapters = adapters_pb2_grpc.AdaptersStub(self.channel)

    def __enter__(self) -> "QuiverClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    # ---- generation -------------------------------------------------------------------------
    @staticmethod
    def request(text: str = "", adapter_id: str = "", *, input_ids: Sequence[int] = (),
                messages: Sequence[tuple[str, str]] = (), **params) -> gpb.GenerateRequest:
        """A GenerateRequest; `params` are GenerationParameters fields."""
        return gpb.GenerateRequest(
            adapter_id=adapter_id, text=text, input_ids=list(input_ids),
            messages=[gpb.ChatMessage(role=r, content=c) for r, c in messages],
            params=gpb.GenerationParameters(**params))

    def generate(self, text: str = "", adapter_id: str = "", *, timeout: float | None = None,
                 **kw) -> gpb.GenerateResponse:
        return self.generation.Generate(self.request(text, adapter_id, **kw),
                                        timeout=timeout or self.timeout)

    def generate_stream(self, text: str = "", adapter_id: str = "", *, timeout: float | None = None,
                        **kw) -> Iterator[gpb.GenerateResponse]:
        """Iterate the stream's messages; `.cancel()` on the returned iterator cancels it."""
        return self.generation.GenerateStream(self.request(text, adapter_id, **kw),
                                              timeout=timeout or self.timeout)

    def tokenize(self, text: str = "", messages: Sequence[tuple[str, str]] = (),
                 add_special_tokens: bool = True) -> gpb.TokenizeResponse:
        req = gpb.TokenizeRequest(text=text, add_special_tokens=add_special_tokens,
                                  messages=[gpb.ChatMessage(role=r, content=c) for r, c in messages])
        return self.generation.Tokenize(req, timeout=self.timeout)

    def model_info(self) -> gpb.ModelInfoResponse:
        return self.generation.ModelInfo(gpb.ModelInfoRequest(), timeout=self.timeout)

    # ---- adapters ---------------------------------------------------------------------------
    def load_adapter(self, adapter_id: str, source: str = "") -> apb.AdapterInfo:
        req = apb.LoadAdapterRequest(adapter_id=adapter_id, source=source)
        return self.adapters.LoadAdapter(req, timeout=self.timeout).adapter

    def unload_adapter(self, adapter_id: str) -> apb.UnloadAdapterResponse:
        return self.adapters.UnloadAdapter(apb.UnloadAdapterRequest(adapter_id=adapter_id),
                                           timeout=self.timeout)

    def list_adapters(self) -> list[apb.AdapterInfo]:
        return list(self.adapters.ListAdapters(apb.ListAdaptersRequest(), timeout=self.timeout).adapters)


def stop_reason_name(value: int) -> str:
    """STOP_REASON_MAX_TOKENS -> "MAX_TOKENS" (the local `quiver generate` spelling)."""
    return gpb.StopReason.Name(value).removeprefix("STOP_REASON_")


def rpc_error_message(e: grpc.RpcError) -> str:
    return f"{e.code().name}: {e.details()}"


def client_from_args(args: argparse.Namespace, timeout: float | None = None) -> QuiverClient:
    """The client the CLI flags of client_options.py describe (the token from QUIVER_TOKEN when
    --token is not given)."""
    return QuiverClient(args.server, timeout, token=args.token or os.environ.get("QUIVER_TOKEN") or None,
                        tls=args.tls, tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key)


def generate_remote(args: argparse.Namespace) -> list[dict]:
    """`quiver generate --server HOST:PORT`: every prompt sent at once (one batch on the server)."""
    params = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                  top_p=args.top_p, top_k=args.top_k, return_token_ids=True)
    if args.seed is not None:
        params["seed"] = args.seed
    with client_from_args(args) as q:
        futures = []
        for prompt in args.prompts:
            kw = dict(messages=[("user", prompt)]) if args.chat else dict(text=prompt)
            req = q.request(adapter_id=args.adapter or "", **kw, **params)
            futures.append(q.generation.Generate.future(req))
        try:
            responses = [f.result() for f in futures]
        except grpc.RpcError as e:
            raise RuntimeError(rpc_error_message(e)) from e
    return [{"prompt": p, "text": r.text, "tokens": [t.id for t in r.tokens],
             "stop_reason": stop_reason_name(r.stop_reason)}
            for p, r in zip(args.prompts, responses)]
