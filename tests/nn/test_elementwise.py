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


@pytest.mark.parametrize("shape", [(1, 576), (7, 64), (64, 576), (3, 5, 100), (2, 1)])
def test_one_pass_rms_norm_equals_hf_formulation_and_the_aten_op(shape):
    from runtime.nn import native
    from runtime.nn.model import RMSNorm

    kernel = native.rms_norm_kernel()
    if kernel is None:
        pytest.skip("the C++ extension is not built")
    g = torch.Generator().manual_seed(sum(shape))
    norm = RMSNorm(torch.randn(shape[-1], generator=g), eps=1e-5)
    x = torch.randn(*shape, generator=g) * 3
    got = norm(x)  # no grad needed: the C++ pass
    torch.testing.assert_close(got, norm.reference_forward(x), atol=2e-6, rtol=2e-6)
    torch.testing.assert_close(got, torch.nn.functional.rms_norm(x, (shape[-1],), norm.weight, 1e-5),
                               atol=2e-6, rtol=2e-6)
    assert torch.equal(got, kernel(x, norm.weight, 1e-5))
    # a row of zeros stays zero (eps keeps the scale finite)
    z = torch.zeros(2, shape[-1])
    assert torch.equal(norm(z), torch.zeros_like(z))


def test_rms_norm_with_gradients_takes_autograd():
    from runtime.nn.model import RMSNorm

    norm = RMSNorm(torch.randn(32), eps=1e-6)
    x = torch.randn(4, 32, requires_grad=True)
    y = norm(x)
    assert y.grad_fn is not None  # training (prompt tuning) differentiates through the norm
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_one_pass_rotate_on_a_strided_view_equals_the_three_ops():
    """q and k arrive as views of the merged q|k|v output (rows strided): the C++ pass reads
    them in place and gives what `addcmul(x * cos, roll(x), sin)` gives."""
    from runtime.nn import native

    kernel = native.rotate_kernel()
    if kernel is None:
        pytest.skip("the C++ extension is not built")
    cfg = ModelConfig.from_hf_dict(make_hf_model("llama3-rope").config.to_dict())
    rotary = Rotary(cfg)
    T, H, hd = 5, 4, cfg.head_dim
    qkv = torch.randn(T, 3 * H * hd)
    q = qkv[:, H * hd: 2 * H * hd].view(T, H, hd)  # a strided view
    positions = torch.tensor([0, 3, 9, 100, 255])
    cos, sin = rotary.cos_sin(positions, q.dtype)
    three_ops = torch.addcmul(q * cos, q.roll(hd // 2, dims=-1), sin)
    torch.testing.assert_close(kernel(q, cos, sin), three_ops, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(rotate(q, cos, sin), rotate_reference(q, positions, rotary), atol=1e-5, rtol=1e-5)
