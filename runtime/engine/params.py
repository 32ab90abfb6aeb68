"""What a client may ask of one generation: sampling, stopping and response options.

These are plain frozen dataclasses with no torch import, so the gRPC edge can build and validate
them before anything heavy runs, and the engine can hand the same objects to the sampler
(`engine/sampling.py`) and the stop checker (`engine/stopping.py`). Defaults mean "off": a request
that sets nothing is greedy, stops at EOS or `max_new_tokens`, and asks for text only.

Validation lives here, next to the fields, and raises `InvalidParams` (a `ValueError`) whose
message names the field and the allowed range, so the server can return it verbatim as
INVALID_ARGUMENT. Caps that an operator may tune (how many tokens, how many stop sequences) come
in through `RequestLimits` rather than being hard-coded.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

#: torch.Generator.manual_seed takes an unsigned 64-bit seed (the wire type is uint64 too).
MAX_SEED = 2**64 - 1


class InvalidParams(ValueError):
    """A request parameter is out of range; the message says which one and what is allowed."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


class StopReason(str, Enum):
    """Why a generation ended. Values are short lowercase names, usable as metric labels."""

    MAX_TOKENS = "max_tokens"  # generated max_new_tokens tokens
    EOS_TOKEN = "eos_token"  # the model produced an end-of-sequence token
    STOP_SEQUENCE = "stop_sequence"  # the text reached one of the request's stop sequences
    CANCELLED = "cancelled"  # the client went away or cancelled
    TIME_LIMIT = "time_limit"  # the request's time_limit_s ran out
    ERROR = "error"  # the engine failed this request


@dataclass(frozen=True)
class RequestLimits:
    """Operator caps on what a single request may ask for."""

    max_new_tokens: int = 4096
    max_stop_sequences: int = 16
    max_stop_sequence_chars: int = 256
    max_top_n: int = 20


DEFAULT_LIMITS = RequestLimits()


def _is_real(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen. Processing order and meaning follow Hugging Face
    `generate`: repetition penalty, then temperature, top-k, top-p, typical-p. OpenAI's
    presence / frequency penalties (over the generated tokens only) come right after the
    repetition penalty, where vLLM applies them too."""

    temperature: float = 0.0  # 0 = greedy (argmax after repetition penalty); else divide logits
    top_k: int = 0  # keep the k most likely tokens; 0 = off
    top_p: float = 1.0  # nucleus: keep the smallest set with mass >= top_p; 1 = off
    typical_p: float = 1.0  # locally typical sampling mass; 1 = off
    repetition_penalty: float = 1.0  # CTRL-style penalty on tokens seen in prompt+output; 1 = off
    seed: int | None = None  # same seed + same inputs -> same tokens, whatever else is batched
    #: OpenAI: logit[j] -= count_j * frequency_penalty + (count_j > 0) * presence_penalty, with
    #: count_j = times token j was generated so far (the prompt does not count); 0 = off
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def is_default(self) -> bool:
        """Plain greedy: the sampler can take the cheapest path (one argmax) for this row."""
        return self.greedy and self.repetition_penalty == 1.0 and not self.has_output_penalty

    @property
    def has_output_penalty(self) -> bool:
        """Presence or frequency penalty on: the sampler needs the row's generated ids."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def validate(self, limits: RequestLimits = DEFAULT_LIMITS) -> None:
        t = self.temperature
        if not _is_real(t) or math.isnan(t) or t < 0 or math.isinf(t):
            raise InvalidParams(
                "temperature", f"must be a finite number >= 0 (0 = greedy), got {t!r}"
            )
        if not _is_int(self.top_k) or self.top_k < 0:
            raise InvalidParams("top_k", f"must be an integer >= 0 (0 = off), got {self.top_k!r}")
        for name in ("top_p", "typical_p"):
            v = getattr(self, name)
            if not _is_real(v) or math.isnan(v) or not 0.0 < v <= 1.0:
                raise InvalidParams(name, f"must be in (0, 1] (1 = off), got {v!r}")
        r = self.repetition_penalty
        if not _is_real(r) or math.isnan(r) or r <= 0 or math.isinf(r):
            raise InvalidParams(
                "repetition_penalty", f"must be a finite number > 0 (1 = off), got {r!r}"
            )
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not _is_real(v) or math.isnan(v) or not -2.0 <= v <= 2.0:
                raise InvalidParams(name, f"must be a number in [-2, 2] (0 = off), got {v!r}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed <= MAX_SEED):
            raise InvalidParams("seed", f"must be an integer in [0, 2**64), got {self.seed!r}")


@dataclass(frozen=True)
class StoppingParams:
    """When a generation ends. A token can end it (EOS, stop sequence) only once more than
    `min_new_tokens` tokens exist; `max_new_tokens` and the time limit always apply."""

    max_new_tokens: int = 64
    min_new_tokens: int = 0  # EOS is suppressed and stop sequences ignored before this many
    stop_sequences: tuple[str, ...] = ()  # matched on decoded text, across token boundaries
    time_limit_s: float | None = None  # wall-clock budget from admission; None = no limit
    ignore_eos: bool = False  # keep generating through EOS tokens (benchmarks)
    include_stop_sequence: bool = False  # keep the matched stop sequence in the output text

    def __post_init__(self) -> None:
        # Accept any iterable of strings from callers; store a hashable tuple.
        if isinstance(self.stop_sequences, str):
            object.__setattr__(self, "stop_sequences", (self.stop_sequences,))
        else:
            object.__setattr__(self, "stop_sequences", tuple(self.stop_sequences))

    def validate(self, limits: RequestLimits = DEFAULT_LIMITS) -> None:
        m = self.max_new_tokens
        if not _is_int(m) or not 0 < m <= limits.max_new_tokens:
            raise InvalidParams(
                "max_new_tokens", f"must be an integer in [1, {limits.max_new_tokens}], got {m!r}"
            )
        n = self.min_new_tokens
        if not _is_int(n) or n < 0:
            raise InvalidParams("min_new_tokens", f"must be an integer >= 0, got {n!r}")
        if n > m:
            raise InvalidParams(
                "min_new_tokens", f"({n}) must not exceed max_new_tokens ({m})"
            )
        self._validate_stop_sequences(limits)
        t = self.time_limit_s
        if t is not None and (not _is_real(t) or math.isnan(t) or t <= 0 or math.isinf(t)):
            raise InvalidParams(
                "time_limit_s", f"must be a finite number of seconds > 0, got {t!r}"
            )

    def _validate_stop_sequences(self, limits: RequestLimits) -> None:
        stops = self.stop_sequences
        if len(stops) > limits.max_stop_sequences:
            raise InvalidParams(
                "stop_sequences",
                f"at most {limits.max_stop_sequences} are allowed, got {len(stops)}",
            )
        for i, s in enumerate(stops):
            if not isinstance(s, str):
                raise InvalidParams(f"stop_sequences[{i}]", f"must be a string, got {s!r}")
            if not s:
                raise InvalidParams(f"stop_sequences[{i}]", "must not be empty")
            if len(s) > limits.max_stop_sequence_chars:
                raise InvalidParams(
                    f"stop_sequences[{i}]",
                    f"is {len(s)} characters; at most {limits.max_stop_sequence_chars} "
                    "are allowed",
                )


@dataclass(frozen=True)
class ResponseOptions:
    """What the response carries besides the text."""

    token_ids: bool = False  # the generated token ids
    logprobs: bool = False  # log-probability of each generated token (see sampling.py)
    top_n: int = 0  # this many most likely alternatives per generated token, with logprobs
    input_tokens: bool = False  # echo the prompt's token ids (and text pieces)

    def validate(self, limits: RequestLimits = DEFAULT_LIMITS) -> None:
        n = self.top_n
        if not _is_int(n) or not 0 <= n <= limits.max_top_n:
            raise InvalidParams(
                "top_n", f"must be an integer in [0, {limits.max_top_n}], got {n!r}"
            )
