"""Deciding when one request's generation ends, and which of its text may be streamed yet.

Stop sequences are matched on decoded TEXT, not token ids: the same string can be tokenised
many ways and a stop string may span several tokens ("\\n\\n" as "\\n" + "\\n"). A streamed
response must never show text that later turns out to belong to a stop sequence, so the
checker holds back the longest tail of the text that is still the start of some stop sequence
and releases it once it no longer can be (or at the end). Example, stop "END":

    delta  "The E"  -> emit "The ",  hold "E"
    delta  "N"      -> emit "",      hold "EN"
    delta  "D."     -> stop STOP_SEQUENCE; emit ""; final text "The "

Rules, in the order they are checked after each new token (count n, 1-based):
  1. EOS_TOKEN      the token is an EOS id, unless ignore_eos; its own text is dropped.
  2. STOP_SEQUENCE  a stop sequence ends inside this token's text. If several do, the one that
                    ends first wins (then the longest), which makes the outcome independent of
                    how the text was split into tokens. The output ends just before the match
                    (or just after it with include_stop_sequence); text after it is dropped.
  3. MAX_TOKENS     n == max_new_tokens.
  4. TIME_LIMIT     the injected monotonic clock says time_limit_s has passed since admission.
Rules 1 and 2 apply only once n > min_new_tokens (the sampler also suppresses EOS before that,
see `suppressed_ids`); a stop sequence that began in earlier text still counts if it ends in a
token past the minimum. On MAX_TOKENS / TIME_LIMIT / EOS the held-back tail is released: it was
never completed into a stop sequence. Reasons decided outside (CANCELLED, ERROR, or a time limit
hit while queued) go through `flush(reason)`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterable

from runtime.engine.params import StoppingParams, StopReason


@dataclass(frozen=True)
class StepOutcome:
    emit_text: str  # text that may be streamed now (may be empty)
    stop: StopReason | None = None  # set when the request is finished


class StopChecker:
    """Per-request stop state; feed it every generated token in order."""

    def __init__(
        self,
        params: StoppingParams,
        eos_token_ids: Iterable[int] = (),
        clock: Callable[[], float] = time.monotonic,
        started_at: float | None = None,
    ):
        self.params = params
        self.eos_token_ids = frozenset(eos_token_ids)
        self._stops = tuple(params.stop_sequences)
        self._stop_first_chars = frozenset(s[0] for s in self._stops)
        self._max_stop_len = max((len(s) for s in self._stops), default=0)
        self._clock = clock
        self.started_at = clock() if started_at is None else started_at
        self.generated = 0  # tokens fed so far
        self.text = ""  # everything emitted so far: the response text once stopped
        self.stop_reason: StopReason | None = None
        self._held = ""  # tail that may still become the start of a stop sequence

    @property
    def finished(self) -> bool:
        return self.stop_reason is not None

    def suppressed_ids(self) -> set[int] | None:
        """Ids the sampler must not pick for the next token: EOS while below min_new_tokens."""
        if self.generated < self.params.min_new_tokens and self.eos_token_ids:
            return set(self.eos_token_ids)
        return None

    def time_expired(self, now: float | None = None) -> bool:
        limit = self.params.time_limit_s
        now = self._clock() if now is None else now
        return limit is not None and now - self.started_at >= limit

    def step(self, token_id: int, text_delta: str) -> StepOutcome:
        """Account for one generated token and its decoded text (possibly "")."""
        if self.finished:
            raise RuntimeError(f"step() after the request stopped ({self.stop_reason.value})")
        self.generated += 1
        may_end = self.generated > self.params.min_new_tokens
        if may_end and token_id in self.eos_token_ids and not self.params.ignore_eos:
            return self._stop(StopReason.EOS_TOKEN, self._held)
        held_len, buf = len(self._held), self._held + text_delta
        match = find_stop(buf, self._stops, held_len) if may_end else None
        if match is not None:
            start, end = match
            keep = end if self.params.include_stop_sequence else start
            return self._stop(StopReason.STOP_SEQUENCE, buf[:keep])
        if self.generated >= self.params.max_new_tokens:
            return self._stop(StopReason.MAX_TOKENS, buf)
        if self.time_expired():
            return self._stop(StopReason.TIME_LIMIT, buf)
        cut = len(buf) - self._holdback(buf)
        self._held = buf[cut:]
        self.text += buf[:cut]
        return StepOutcome(buf[:cut])

    def flush(self, reason: StopReason) -> str:
        """Stop for a reason decided outside the checker; returns the held-back tail."""
        if self.finished:
            return ""
        return self._stop(reason, self._held).emit_text

    def _stop(self, reason: StopReason, emit: str) -> StepOutcome:
        self.stop_reason = reason
        self._held = ""
        self.text += emit
        return StepOutcome(emit, reason)

    def _holdback(self, buf: str) -> int:
        """Length of the longest tail of buf that is a proper prefix of some stop sequence."""
        for i in range(max(0, len(buf) - self._max_stop_len + 1), len(buf)):
            if buf[i] in self._stop_first_chars:
                tail = buf[i:]
                if any(len(s) > len(tail) and s.startswith(tail) for s in self._stops):
                    return len(buf) - i
        return 0


def find_stop(text: str, stops: Iterable[str], after: int = 0) -> tuple[int, int] | None:
    """(start, end) of the stop-sequence occurrence in `text` that ends first, among those
    ending beyond index `after`; ties go to the longest. None when there is none."""
    best: tuple[int, int] | None = None  # (end, start)
    for s in stops:
        i = text.find(s, max(0, after - len(s) + 1))
        if i >= 0 and (best is None or (i + len(s), i) < best):
            best = (i + len(s), i)
    return None if best is None else (best[1], best[0])
