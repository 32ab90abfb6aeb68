"""Tiny random HF models (transformers' own classes) as references for runtime/nn."""
from __future__ import annotations

import pytest
import torch
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM)

COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=101, max_position_embeddings=256)

VARIANTS = {
    "llama-tied": (LlamaConfig, LlamaForCausalLM, dict(tie_word_embeddings=True)),
    "llama-mha": (LlamaConfig, LlamaForCausalLM, dict(num_key_value_heads=4)),
    "llama3-rope": (LlamaConfig, LlamaForCausalLM, dict(rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 32})),
    "llama-linear-rope": (LlamaConfig, LlamaForCausalLM, dict(rope_parameters={
        "rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0})),
    "llama-yarn-rope": (LlamaConfig, LlamaForCausalLM, dict(rope_parameters={
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
        "original_max_position_embeddings": 64})),
    "mistral-window": (MistralConfig, MistralForCausalLM, dict(sliding_window=8)),
    "qwen2-bias": (Qwen2Config, Qwen2ForCausalLM, dict(num_key_value_heads=1)),
}


def make_hf_model(variant: str, seed: int = 0):
    cfg_cls, model_cls, extra = VARIANTS[variant]
    torch.manual_seed(seed)
    hf = model_cls(cfg_cls(**{**COMMON, **extra})).eval()
    with torch.no_grad():  # HF inits biases to zero; make them count
        for name, p in hf.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return hf


@pytest.fixture(params=list(VARIANTS))
def hf_variant(request):
    return request.param, make_hf_model(request.param)
