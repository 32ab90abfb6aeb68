"""The fused elementwise ops (three-op rotary, fused RMSNorm) against HF's formulations."""
from __future__ import annotations

import pytest
import torch

from runtime.config import ModelConfig
from runtime.nn.rotary import Rotary, rotate, rotate_reference
from tests.nn.conftest import make_hf_model


@pytest.mark.parametrize("variant", ["llama-tied", "llama3-rope", "llama-yarn-rope"])
def test_rotate_equals_rotate_half(variant):
    hf = make_hf_model(variant)
    rotary = Rotary(ModelConfig.from_hf_dict(hf.config.to_dict()))
    positions = torch.tensor([0, 1, 7, 300, 5, 5])
    x = torch.randn(6, 4, hf.config.hidden_size // hf.config.num_attention_heads)
    cos, sin = rotary.cos_sin(positions, x.dtype)
    assert (rotate(x, cos, sin) - rotate_reference(x, positions, rotary)).abs().max() <= 1e-6


def test_fused_rms_norm_equals_hf_formulation():
    from runtime.nn.model import RMSNorm

    norm = RMSNorm(torch.randn(64), eps=1e-5)
    x = torch.randn(7, 64) * 3
    assert (norm(x) - norm.reference_forward(x)).abs().max() <= 1e-5
