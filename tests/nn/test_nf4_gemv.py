"""The cpu-gemv kernel (csrc/nf4_gemv.cpp via QuantLinear) against the pure-torch reference:
dequantize, then a dense fp32 matmul (`QuantLinear.reference_forward`). It sums in another
order than the dense matmul, so the two agree to fp32 rounding, not to the bit; where the gemv
does not apply (more rows, gradients, other dtypes) the layer is bitsandbytes' standard path,
bit for bit."""
from __future__ import annotations

import pytest
import torch

from runtime.config import QuantConfig
from runtime.nn.kernels import gemv_available, gemv_shape_ok, resolve_kernel
from runtime.nn.quant import GEMV_MAX_ROWS, QuantLinear

pytestmark = pytest.mark.skipif(not gemv_available(), reason="the native extension is not built")


def pair(out_f: int, in_f: int, method: str = "nf4", bias: bool = False, blocksize: int = 64,
         double_quant: bool = True, seed: int = 0) -> tuple[QuantLinear, QuantLinear]:
    """The same 4-bit weight twice: on the standard kernel and on the gemv."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * 0.05
    b = torch.randn(out_f, generator=g) if bias else None
    std = QuantLinear.from_dense(w, b, QuantConfig(method, blocksize=blocksize, double_quant=double_quant))
    gemv = QuantLinear.from_dense(w, b, QuantConfig(method, blocksize=blocksize, double_quant=double_quant))
    assert gemv.use_kernel("cpu-gemv") == "cpu-gemv"
    return std, gemv


def close(got: torch.Tensor, want: torch.Tensor) -> None:
    scale = want.abs().max().item()
    assert got.shape == want.shape and got.dtype == want.dtype
    assert (got - want).abs().max().item() <= 2e-6 * scale, (got - want).abs().max().item() / scale


@pytest.mark.parametrize("method", ["nf4", "fp4"])
@pytest.mark.parametrize("out_f, in_f", [(576, 576), (192, 576), (1536, 576), (576, 1536), (33, 128)])
@pytest.mark.parametrize("rows", [1, 3, GEMV_MAX_ROWS])
def test_gemv_equals_the_dequantized_matmul(method, out_f, in_f, rows):
    std, gemv = pair(out_f, in_f, method, seed=rows)
    x = torch.randn(rows, in_f, generator=torch.Generator().manual_seed(in_f))
    with torch.no_grad():
        close(gemv(x), std.reference_forward(x))


@pytest.mark.parametrize("blocksize, double_quant", [(64, False), (128, True), (256, True), (4096, True)])
def test_other_blocksizes_and_plain_statistics(blocksize, double_quant):
    std, gemv = pair(96, 4096, blocksize=blocksize, double_quant=double_quant)
    x = torch.randn(2, 4096)
    with torch.no_grad():
        close(gemv(x), std.reference_forward(x))


def test_bias_leading_dims_and_strided_rows():
    std, gemv = pair(192, 576, bias=True)
    x = torch.randn(2, 3, 576)  # [.., in]: 6 rows
    with torch.no_grad():
        close(gemv(x), std.reference_forward(x))
        wide = torch.randn(4, 2 * 576)[:, :576]  # rows of a wider tensor (a stride of 1152)
        close(gemv(wide), std.reference_forward(wide))
        assert gemv(torch.randn(0, 576)).shape == (0, 192)


def test_where_the_gemv_does_not_apply_the_layer_is_the_standard_path_bit_for_bit():
    """More rows than GEMV_MAX_ROWS (prefill), a gradient (training on the resident base) and
    bf16 inputs all take bitsandbytes' matmul_4bit, so a job trains as `quiver train` does."""
    std, gemv = pair(192, 576)
    x = torch.randn(GEMV_MAX_ROWS + 1, 576)
    with torch.no_grad():
        assert torch.equal(gemv(x), std(x))
        assert torch.equal(gemv(x[:2].bfloat16()), std(x[:2].bfloat16()))
    xg = torch.randn(2, 576, requires_grad=True)
    xs = xg.detach().clone().requires_grad_(True)
    gemv(xg).sum().backward()
    std(xs).sum().backward()
    assert torch.equal(xg.grad, xs.grad)


def test_the_standard_codes_and_statistics_stay_and_switching_back_is_exact():
    std, gemv = pair(192, 576)
    assert torch.equal(gemv.weight, std.weight)
    assert torch.equal(gemv.dequantized_weight(), std.dequantized_weight())
    assert gemv.state_dict().keys() == std.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(gemv.state_dict().values(), std.state_dict().values()))
    assert gemv.resident_bytes() == std.resident_bytes() + 4 * 192 * 576 // 64 + 4 * 16  # fp32 absmax, code
    x = torch.randn(1, 576)
    assert gemv.use_kernel("standard") == "standard"
    with torch.no_grad():
        assert torch.equal(gemv(x), std(x))


@pytest.mark.parametrize("in_f, blocksize, ok", [(576, 64, True), (96, 64, False), (128, 32, True),
                                                 (64, 8, False)])
def test_gemv_shape_rule_and_refused_shapes_stay_standard(in_f, blocksize, ok):
    assert gemv_shape_ok(in_f, blocksize) is ok
    if not ok and blocksize >= 64:
        lin = QuantLinear.from_dense(torch.randn(32, in_f), None, QuantConfig("nf4", blocksize=blocksize))
        assert lin.use_kernel("cpu-gemv") == "standard"


def test_asking_for_the_gemv_off_the_cpu_is_a_clear_error():
    assert resolve_kernel("cpu-gemv", torch.device("cpu"), exact_fp32=False) == "cpu-gemv"
    with pytest.raises(ValueError, match="cpu-gemv"):
        resolve_kernel("cpu-gemv", torch.device("cuda"), exact_fp32=False)
