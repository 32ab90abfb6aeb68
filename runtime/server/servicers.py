"""The gRPC servicers: convert pb -> domain, call the Core, convert domain -> pb. Nothing else.

Errors are raised as domain exceptions and mapped to statuses by errors.py. Access control
(auth.py) and request decoding (wire.py) happen in interceptors before a servicer runs, so no
method here sees a token or a malformed message. A client that
cancels, or whose deadline passes, ends its RPC; the RPC's done-callback cancels the engine
request, which frees its KV blocks and adapter slot at the next engine step.
"""
from __future__ import annotations

import grpc

from runtime.server import convert, errors
from runtime.server.core import Core
from runtime.server.stubs import adapters_pb2 as apb
from runtime.server.stubs import adapters_pb2_grpc
from runtime.server.stubs import generation_pb2 as gpb
from runtime.server.stubs import generation_pb2_grpc


class GenerationServicer(generation_pb2_grpc.GenerationServicer):
    def __init__(self, core: Core):
        self.core = core

    def _submit(self, request: gpb.GenerateRequest, context: grpc.ServicerContext):
        call = convert.call_from_pb(request, self.core.default_max_new_tokens)
        handle = self.core.submit(call, wait_s=context.time_remaining())
        if not context.add_callback(handle.cancel):  # the RPC already ended
            handle.cancel()
        return call, handle

    @errors.unary
    def Generate(self, request, context):
        call, handle = self._submit(request, context)
        outputs = list(handle)
        return convert.response_from_outputs(outputs, call.options, handle.request_id,
                                             handle.input_tokens, handle.truncated)

    @errors.stream
    def GenerateStream(self, request, context):
        call, handle = self._submit(request, context)
        echo = handle.input_tokens
        for out in handle:
            if convert.worth_sending(out, call.options, echo_pending=bool(echo)):
                yield convert.response_from_outputs([out], call.options, handle.request_id, echo,
                                                    handle.truncated)
                echo = []

    @errors.unary
    def Tokenize(self, request, context):
        prompt = convert.prompt_from_pb(request.text, (), request.messages)
        add_special = request.add_special_tokens if request.HasField("add_special_tokens") else True
        return convert.tokenize_response(*self.core.tokenize(prompt, add_special))

    @errors.unary
    def ModelInfo(self, request, context):
        return convert.model_info_to_pb(self.core.model_info())


class AdaptersServicer(adapters_pb2_grpc.AdaptersServicer):
    def __init__(self, core: Core):
        self.core = core

    @errors.unary
    def LoadAdapter(self, request, context):
        info = self.core.load_adapter(request.adapter_id, request.source)
        return apb.LoadAdapterResponse(adapter=convert.adapter_info_to_pb(info))

    @errors.unary
    def UnloadAdapter(self, request, context):
        unloaded, in_flight = self.core.unload_adapter(request.adapter_id)
        return apb.UnloadAdapterResponse(unloaded=unloaded, in_flight=in_flight)

    @errors.unary
    def ListAdapters(self, request, context):
        infos = self.core.list_adapters()
        return apb.ListAdaptersResponse(adapters=[convert.adapter_info_to_pb(i) for i in infos])
