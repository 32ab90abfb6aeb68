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


def _native():
    from runtime.nn import native

    ext = native.extension()
    if ext is None:
        pytest.skip("the C++ extension is not built")
    return ext


@pytest.mark.parametrize("shape", [(1, 1536), (32, 1536), (5, 37), (3, 16)])
def test_one_pass_silu_mul_equals_aten(shape):
    """Within a few fp32 roundings of F.silu(g) * u (each within two of the exact value), on a strided view (the split of gate|up),
    over the range an activation takes and the ends where exp over- and underflows."""
    ext = _native()
    gu = torch.randn(shape[0], 2 * shape[1]) * 8
    gu[0, :6] = torch.tensor([100.0, -100.0, 0.0, -0.0, 88.9, -88.9])
    g, u = gu.split(shape[1], dim=-1)
    got, ref = ext.silu_mul(g, u), torch.nn.functional.silu(g) * u
    torch.testing.assert_close(got, ref, rtol=6e-7, atol=1e-35)
    exact = g.double() * torch.sigmoid(g.double()) * u.double()
    assert ((got.double() - exact).abs() <= 4e-7 * exact.abs() + 1e-35).all()  # ATen flushes there too


def test_silu_mul_with_gradients_takes_autograd():
    from runtime.nn.model import silu_mul

    g = torch.randn(3, 8, requires_grad=True)
    u = torch.randn(3, 8)
    out = silu_mul(g, u)
    assert out.grad_fn is not None
    out.sum().backward()
    sig = torch.sigmoid(g.detach())
    torch.testing.assert_close(g.grad, u * sig * (1 + g.detach() * (1 - sig)))


@pytest.mark.parametrize("rows, n", [(1, 1536), (32, 1536), (4, 37)])
def test_bf16_silu_mul_is_convert_silu_mul_convert(rows, n):
    """The C++ decode layers' one pass from gate|up's bf16 output to down's bf16 input gives
    the bits of what the modules compute: fp32, silu_mul, then ATen's rounding to bf16."""
    ext = _native()
    gu = (torch.randn(rows, 2 * n) * 6).bfloat16()
    gu[0, :3] = torch.tensor([float("nan"), 1e30, -1e30])
    g, u = gu.float().split(n, dim=-1)
    expected = ext.silu_mul(g, u).bfloat16()
    got = ext.silu_mul_bf16(gu)
    torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)  # NaN's bits may differ
