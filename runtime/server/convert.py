"""pb <-> domain at the edge: small pure functions, no I/O, no server state.

Requests: a GenerateRequest becomes a `GenerateCall` (core.py) holding the engine's own
SamplingParams / StoppingParams / ResponseOptions; proto3 `optional` fields keep "unset" apart
from an explicit 0, so an unset top_p means "off" while `top_p: 0` reaches validation and is
refused with a message. Responses: engine `Output`s become GenerateResponses, one per Output in
a stream, all folded into one for the unary call.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

from runtime.adapters.registry import AdapterInfo, AdapterState
from runtime.engine.params import ResponseOptions, SamplingParams, StoppingParams, StopReason
from runtime.engine.request import Output, TokenInfo
from runtime.server.core import GenerateCall, Prompt, Truncation
from runtime.server.metrics import adapter_type
from runtime.server.stubs import adapters_pb2 as apb
from runtime.server.stubs import generation_pb2 as gpb

STOP_REASON_TO_PB = {
    None: gpb.STOP_REASON_UNSPECIFIED,
    StopReason.MAX_TOKENS: gpb.STOP_REASON_MAX_TOKENS,
    StopReason.EOS_TOKEN: gpb.STOP_REASON_EOS_TOKEN,
    StopReason.STOP_SEQUENCE: gpb.STOP_REASON_STOP_SEQUENCE,
    StopReason.CANCELLED: gpb.STOP_REASON_CANCELLED,
    StopReason.TIME_LIMIT: gpb.STOP_REASON_TIME_LIMIT,
    StopReason.ERROR: gpb.STOP_REASON_ERROR,
}
ADAPTER_STATE_TO_PB = {
    AdapterState.HOST: apb.ADAPTER_STATE_HOST,
    AdapterState.DEVICE: apb.ADAPTER_STATE_DEVICE,
    AdapterState.LOADING: apb.ADAPTER_STATE_LOADING,
    AdapterState.UNLOADING: apb.ADAPTER_STATE_UNLOADING,
}
#: metrics type label (metrics.adapter_type) -> pb enum
ADAPTER_TYPE_TO_PB = {
    "lora": apb.ADAPTER_TYPE_LORA,
    "dora": apb.ADAPTER_TYPE_DORA,
    "adalora": apb.ADAPTER_TYPE_ADALORA,
    "prompt_tuning": apb.ADAPTER_TYPE_PROMPT_TUNING,
    "p_tuning": apb.ADAPTER_TYPE_P_TUNING,
    "prefix_tuning": apb.ADAPTER_TYPE_PREFIX_TUNING,
}


# ---- requests ---------------------------------------------------------------------------------
def prompt_from_pb(text: str, input_ids: Iterable[int], messages: Iterable) -> Prompt:
    return Prompt(text=text, ids=tuple(input_ids),
                  messages=tuple((m.role, m.content) for m in messages))


def call_from_pb(req: gpb.GenerateRequest, default_max_new_tokens: int) -> GenerateCall:
    p = req.params
    return GenerateCall(
        adapter_id=req.adapter_id,
        prompt=prompt_from_pb(req.text, req.input_ids, req.messages),
        sampling=sampling_from_pb(p),
        stopping=stopping_from_pb(p, default_max_new_tokens),
        options=options_from_pb(p),
        truncation=Truncation(max_tokens=p.truncate_input_tokens, to_fit=p.truncate_prompt),
    )


def sampling_from_pb(p: gpb.GenerationParameters) -> SamplingParams:
    return SamplingParams(
        temperature=p.temperature,
        top_k=p.top_k,
        top_p=p.top_p if p.HasField("top_p") else 1.0,
        typical_p=p.typical_p if p.HasField("typical_p") else 1.0,
        repetition_penalty=p.repetition_penalty if p.HasField("repetition_penalty") else 1.0,
        seed=p.seed if p.HasField("seed") else None,
    )


def stopping_from_pb(p: gpb.GenerationParameters, default_max_new_tokens: int) -> StoppingParams:
    return StoppingParams(
        max_new_tokens=p.max_new_tokens if p.HasField("max_new_tokens") else default_max_new_tokens,
        min_new_tokens=p.min_new_tokens,
        stop_sequences=tuple(p.stop_sequences),
        time_limit_s=p.time_limit_seconds if p.HasField("time_limit_seconds") else None,
        ignore_eos=p.ignore_eos,
        include_stop_sequence=p.include_stop_sequence,
    )


def options_from_pb(p: gpb.GenerationParameters) -> ResponseOptions:
    return ResponseOptions(token_ids=p.return_token_ids, logprobs=p.return_logprobs,
                           top_n=p.top_n, input_tokens=p.return_input_tokens)


# ---- responses --------------------------------------------------------------------------------
def wants_tokens(options: ResponseOptions) -> bool:
    return options.token_ids or options.logprobs or options.top_n > 0


def token_to_pb(t: TokenInfo, options: ResponseOptions) -> gpb.Token:
    tok = gpb.Token(id=t.token_id, text=t.text)
    if options.logprobs:
        tok.logprob = t.logprob
    tok.top.extend(gpb.TopToken(id=i, logprob=lp) for i, lp in t.top[: options.top_n])
    return tok


def input_tokens_to_pb(tokens: Sequence[TokenInfo]) -> list[gpb.Token]:
    return [gpb.Token(id=t.token_id, text=t.text) for t in tokens]


def response_from_outputs(outputs: Sequence[Output], options: ResponseOptions,
                          request_id: str = "", input_tokens: Sequence[TokenInfo] = (),
                          truncated: int = 0) -> gpb.GenerateResponse:
    """One response for a run of Outputs: text concatenated, tokens in order, the counts and
    stop reason of the last. A stream sends one per Output; Generate folds them all.
    truncated: prompt tokens the request's truncation dropped."""
    last = outputs[-1]
    resp = gpb.GenerateResponse(
        text="".join(o.text for o in outputs),
        input_token_count=last.input_token_count,
        generated_token_count=last.generated_token_count,
        stop_reason=STOP_REASON_TO_PB[last.stop_reason if last.finished else None],
        request_id=request_id,
        input_tokens=input_tokens_to_pb(input_tokens),
        truncated_input_tokens=truncated,
    )
    if wants_tokens(options):
        resp.tokens.extend(token_to_pb(t, options) for o in outputs for t in o.tokens)
    ttft = next((o.first_token_time_s for o in reversed(outputs) if o.first_token_time_s is not None), None)
    if ttft is not None:
        resp.time_to_first_token_seconds = ttft
    return resp


def worth_sending(out: Output, options: ResponseOptions, echo_pending: bool) -> bool:
    """A stream skips Outputs that carry nothing for this client (text held back by a pending
    stop sequence or an incomplete UTF-8 character, when token details were not asked for).
    echo_pending: the input tokens were asked for and not sent yet."""
    return (out.finished or echo_pending or bool(out.text)
            or (wants_tokens(options) and bool(out.tokens)))


def tokenize_response(ids: Sequence[int], tokens: Sequence[str]) -> gpb.TokenizeResponse:
    return gpb.TokenizeResponse(ids=ids, tokens=tokens)


def model_info_to_pb(info: dict) -> gpb.ModelInfoResponse:
    return gpb.ModelInfoResponse(**info)


# ---- adapters ---------------------------------------------------------------------------------
def adapter_info_to_pb(info: AdapterInfo) -> apb.AdapterInfo:
    return apb.AdapterInfo(
        adapter_id=info.adapter_id,
        type=ADAPTER_TYPE_TO_PB.get(adapter_type(info.peft_type, info.use_dora), apb.ADAPTER_TYPE_UNSPECIFIED),
        rank=info.rank,
        target_modules=info.target_modules,
        bytes=info.nbytes,
        state=ADAPTER_STATE_TO_PB[info.state],
        requests_served=info.requests_served,
        in_flight=max(info.in_flight, 0),
        num_virtual_tokens=info.num_virtual_tokens,
        source=info.source,
        peft_type=info.peft_type,
    )
