"""Shared tiny bases for the adapter tests (built once per session; PEFT wraps deep copies)."""
from __future__ import annotations

import pytest

from tests.peft_factory import make_tiny_model

#: name -> (arch, HF config overrides)
BASES = {
    "llama": ("llama", {}),
    "llama_tied": ("llama", {"tie_word_embeddings": True}),
    "llama_hd32": ("llama", {"head_dim": 32}),  # head_dim != hidden / heads: q_dim 128, kv_dim 64
    "qwen2": ("qwen2", {}),  # q/k/v bias
    "mistral": ("mistral", {}),
}


@pytest.fixture(scope="session")
def bases():
    """`bases("llama")` -> the tiny HF model of that name (cached)."""
    cache = {}

    def get(name: str):
        if name not in cache:
            arch, overrides = BASES[name]
            cache[name] = make_tiny_model(arch, seed=0, **overrides)
        return cache[name]

    return get
