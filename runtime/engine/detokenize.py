"""Turning a stream of token ids into a stream of text, one token at a time.

Decoding each token alone is wrong in two ways: a byte-level BPE token may carry only part of a
UTF-8 character (an emoji is often 2-4 tokens, each decoding to U+FFFD on its own), and
SentencePiece-style decoders change a token's text depending on what precedes it (the leading
"▁" becomes a space except at the start). Re-decoding the whole sequence every step is right but
quadratic. So we decode a small sliding window, the method vLLM and TGI use:

    ids:  ... | prefix_offset ......... read_offset ......... len(ids)
                [ already emitted text ][ not yet emitted             ]
    prefix = decode(ids[prefix_offset:read_offset])
    full   = decode(ids[prefix_offset:])
    new text = full[len(prefix):], released only if it is non-empty and does not end in U+FFFD

The prefix gives the decoder the left context it needs; the offsets move forward only when text
is released, and a release happens only when the window ends on a complete character, so every
window starts on a character boundary and the concatenation of released pieces equals decoding
everything at once (`finish()` releases what is still held, U+FFFD and all, as a full decode
would show it). Special tokens decode to "" when `skip_special_tokens`, so their text never
appears. Tokenizer "clean-up" of spaces before punctuation is switched off: it is not local to a
window (and transformers already ignores it for BPE tokenizers); the stream equals
`tokenizer.decode(ids, skip_special_tokens=..., clean_up_tokenization_spaces=False)`.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import tokenizers

REPLACEMENT_CHAR = "\ufffd"

#: How many prompt tokens the first window starts before the generated ones, so that the first
#: generated token is decoded in context (a leading space is not stripped as a start of text).
PROMPT_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Per-request streaming decoder over a Hugging Face tokenizer."""

    def __init__(
        self,
        tokenizer: Any,
        prompt_ids: Sequence[int] | None = None,
        skip_special_tokens: bool = True,
    ):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._decode = _window_decoder(tokenizer, skip_special_tokens)
        self.ids: list[int] = list(prompt_ids or ())
        self.read_offset = len(self.ids)  # ids before this are already accounted for
        self.prefix_offset = max(0, self.read_offset - PROMPT_CONTEXT_TOKENS)

    def push(self, token_id: int) -> str:
        """Add one generated token; return the text that is now final (often "")."""
        self.ids.append(int(token_id))
        return self._release(final=False)

    def finish(self) -> str:
        """Release whatever is still held (an incomplete character decodes to U+FFFD)."""
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.read_offset == len(self.ids):
            return ""
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) <= len(prefix) or (not final and full.endswith(REPLACEMENT_CHAR)):
            return ""  # nothing visible yet, or a character is still incomplete
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return full[len(prefix) :]


def _window_decoder(tokenizer: Any, skip_special_tokens: bool) -> Callable[[Sequence[int]], str]:
    """ids -> text, as `tokenizer.decode(ids, skip_special_tokens, clean-up off)`.

    A fast HF tokenizer's `decode` is its Rust `backend_tokenizer.decode` plus the clean-up we
    switch off, wrapped in ~15 us of Python; called twice per token for every running request,
    that wrapper is most of the cost, so we call the backend directly when there is one.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if isinstance(backend, tokenizers.Tokenizer):
        return lambda ids: backend.decode(ids, skip_special_tokens=skip_special_tokens)
    return lambda ids: tokenizer.decode(
        ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False
    )
