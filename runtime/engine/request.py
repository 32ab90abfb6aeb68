"""A generation request as the engine sees it: what was asked, and where it stands.

`GenerationRequest` is the domain input (the server edge and the CLI build it from pb / argv).
`Sequence` is the engine's mutable per-request state; `Output` is what the engine reports back,
one per step in which something happened to the request.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Callable

import torch

from runtime.engine.detokenize import IncrementalDetokenizer
from runtime.engine.params import ResponseOptions, SamplingParams, StoppingParams, StopReason
from runtime.engine.stopping import StopChecker
from runtime.nn.kv_cache import SeqCache

_ids = itertools.count()


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    adapter_id: str = ""  # "" = base model
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stopping: StoppingParams = field(default_factory=StoppingParams)
    options: ResponseOptions = field(default_factory=ResponseOptions)
    request_id: str = field(default_factory=lambda: f"req-{next(_ids)}")
    #: called from the engine thread with each Output; must not block (queue it)
    on_output: Callable[["Output"], None] | None = None


@dataclass
class TokenInfo:
    token_id: int
    text: str  # this token's own decoded text (may be "" while UTF-8 is incomplete)
    logprob: float = 0.0
    top: list[tuple[int, float]] = field(default_factory=list)  # (token id, logprob)


@dataclass
class Output:
    request_id: str
    text: str  # new text since the last Output (stop sequences and special tokens excluded)
    tokens: list[TokenInfo]  # tokens generated since the last Output
    input_token_count: int
    generated_token_count: int
    finished: bool = False
    stop_reason: StopReason | None = None
    error: str | None = None
    queue_time_s: float = 0.0  # arrival -> admission (set once admitted)
    first_token_time_s: float | None = None  # arrival -> first token (set on the first token)


class Phase(str, Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    """Engine-side state of one request."""

    req: GenerationRequest
    detok: IncrementalDetokenizer
    stop: StopChecker
    generator: torch.Generator | None
    arrival: float = field(default_factory=time.monotonic)
    phase: Phase = Phase.WAITING
    slot: int = -1  # adapter device slot while admitted; -1 = base / not admitted
    kv: SeqCache = field(default_factory=SeqCache)
    prefix_len: int = 0  # adapter KV rows in front of the tokens (prompt / prefix tuning)
    fed: int = 0  # tokens of `tokens` already in the KV cache
    output_ids: list[int] = field(default_factory=list)
    admitted_at: float | None = None
    first_token_at: float | None = None
    cancelled: bool = False

    @property
    def tokens(self) -> list[int]:
        """Everything that must be in the cache before the next sample: prompt + generated."""
        return self.req.prompt_ids + self.output_ids

    @property
    def pending(self) -> int:
        """Tokens still to feed before the next token can be sampled."""
        return len(self.req.prompt_ids) + len(self.output_ids) - self.fed
