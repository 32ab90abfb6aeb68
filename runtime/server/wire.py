"""Decoding requests inside the handler, so a malformed message is INVALID_ARGUMENT.

gRPC Python deserializes a request before the servicer runs and, when that fails (bytes that are
not the message, a string field holding invalid UTF-8, a truncated varint), answers INTERNAL
"Exception deserializing request!". INTERNAL says "the server is broken"; here it is the client's
message that is, and the client should be told what is wrong with it. `DecodeGuard` swaps the
handler's deserializer for the identity and parses inside the handler instead:

    raw bytes -> handler(raw, context): msg = Message.FromString(raw)   DecodeError -> INVALID_ARGUMENT
                                        return servicer(msg, context)

Only methods with a single request message are wrapped (every Quiver, health and unary method);
the request-streaming reflection service is left as it is.
"""
from __future__ import annotations

import grpc


class DecodeGuard(grpc.ServerInterceptor):
    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        return guarded(handler, handler_call_details.method)


def guarded(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    """The same handler, parsing its request itself (module docstring)."""
    parse = handler.request_deserializer

    def wrap(behaviour):
        def call(raw: bytes, context: grpc.ServicerContext):
            try:
                request = parse(raw)
            except Exception as e:  # noqa: BLE001 - DecodeError and anything a parser may raise
                context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                              f"malformed request for {method}: {e} (send a serialized "
                              "message of the method's request type; strings must be UTF-8)")
            return behaviour(request, context)

        return call

    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(
            wrap(handler.unary_stream), response_serializer=handler.response_serializer)
    return grpc.unary_unary_rpc_method_handler(
        wrap(handler.unary_unary), response_serializer=handler.response_serializer)
