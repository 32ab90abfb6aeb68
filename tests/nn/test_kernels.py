"""The 4-bit kernels (runtime/nn/kernels.py, quant.py) against the pure-torch reference.

The fused CPU kernel only exists on AVX512-BF16 CPUs: its tests skip elsewhere (and say so);
the choice rules and the standard path are tested everywhere.
"""
from __future__ import annotations

import os

import pytest
import torch

from runtime.config import QuantConfig
from runtime.nn.kernels import cpu_has_fused_nf4, fused_shape_ok, gemv_available, resolve_kernel
from runtime.nn.quant import QuantLinear, unpack_fused_codes

fused_only = pytest.mark.skipif(not cpu_has_fused_nf4(),
                                reason="this CPU has no AVX512-BF16: bitsandbytes' fused kernel is absent")
CPU = torch.device("cpu")


def quant_linear(out_f: int, in_f: int, seed: int = 0, bias: bool = False, method: str = "nf4"):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * 0.05
    b = torch.randn(out_f, generator=g) if bias else None
    return QuantLinear.from_dense(w, b, QuantConfig(method))


def bf16_reference(lin: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """What the fused kernel means: bf16 input and weight, fp32 accumulation, bf16 output."""
    w = lin.dequantized_weight().to(torch.bfloat16).float()
    y = (x.to(torch.bfloat16).float() @ w.T).to(torch.bfloat16).to(x.dtype)
    return y if lin.bias is None else y + lin.bias


# ---- the choice ------------------------------------------------------------------------------
def test_auto_takes_the_fused_kernel_exactly_where_the_cpu_has_it_else_the_gemv():
    expected = "cpu-fused" if cpu_has_fused_nf4() else "cpu-gemv" if gemv_available() else "standard"
    assert resolve_kernel("auto", CPU, exact_fp32=False) == expected
    assert resolve_kernel("auto", CPU, exact_fp32=True) == "standard"  # --dtype float32: no bf16
    assert resolve_kernel("auto", torch.device("cuda"), exact_fp32=False) == "standard"
    assert resolve_kernel("standard", CPU, exact_fp32=False) == "standard"
    with pytest.raises(ValueError, match="nf4-kernel"):
        resolve_kernel("tiled", CPU, exact_fp32=False)


@pytest.mark.skipif(cpu_has_fused_nf4(), reason="this CPU has the fused kernel")
def test_asking_for_the_fused_kernel_without_it_is_a_clear_error():
    with pytest.raises(ValueError, match="AVX512-BF16"):
        resolve_kernel("cpu-fused", CPU, exact_fp32=False)


@pytest.mark.parametrize("out_f, in_f, ok", [(64, 64, True), (96, 128, True), (48, 64, False),
                                              (64, 96, False), (1536, 576, True), (100, 64, False)])
def test_fused_shape_rule(out_f, in_f, ok):
    assert fused_shape_ok(out_f, in_f, 64) is ok


# ---- the fused kernel ------------------------------------------------------------------------
@fused_only
@pytest.mark.parametrize("out_f, in_f", [(64, 64), (192, 576), (1536, 576), (576, 1536), (96, 128)])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 17, 32, 64])
def test_fused_equals_the_bf16_reference(out_f, in_f, rows):
    lin = quant_linear(out_f, in_f, seed=rows, bias=rows % 2 == 1)
    x = torch.randn(rows, in_f, generator=torch.Generator().manual_seed(rows))
    assert lin.use_kernel("cpu-fused") == "cpu-fused"
    got, ref = lin(x), bf16_reference(lin, x)
    scale = ref.abs().max()
    # bf16 rounding of the products' inputs is shared; only the summation order differs
    assert (got - ref).abs().max() <= 2e-2 * scale
    assert (got - lin.reference_forward(x)).abs().max() <= 3e-2 * scale  # and near fp32
    assert got.dtype == x.dtype


@fused_only
@pytest.mark.parametrize("method", ["nf4", "fp4"])
def test_fused_equals_bitsandbytes_own_fused_op(method):
    """The direct C entry computes what bitsandbytes' gemv_4bit op computes, for both 4-bit types."""
    import bitsandbytes.functional as bnbf

    lin = quant_linear(192, 576, method=method)
    lin.use_kernel("cpu-fused")
    x = torch.randn(7, 576)
    assert torch.equal(lin(x), bnbf.gemv_4bit(x, lin.weight, state=lin._fused_state))


@fused_only
def test_fused_rows_do_not_depend_on_the_batch():
    """A row's output is the same alone and in any batch (decode rows, prefill chunks)."""
    lin = quant_linear(192, 576)
    lin.use_kernel("cpu-fused")
    x = torch.randn(37, 576)
    together = lin(x)
    for i in (0, 5, 36):
        assert torch.equal(lin(x[i:i + 1]), together[i:i + 1])


@fused_only
@pytest.mark.parametrize("out_f, in_f", [(48, 64), (64, 96), (100, 128)])
def test_shapes_the_fused_kernel_refuses_stay_standard(out_f, in_f):
    lin = quant_linear(out_f, in_f)
    x = torch.randn(3, in_f)
    before = lin(x)
    assert lin.use_kernel("cpu-fused") == "standard"  # no abort: the layer keeps its layout
    assert torch.equal(lin(x), before)


@fused_only
@pytest.mark.parametrize("method", ["nf4", "fp4"])
def test_fused_layout_keeps_the_standard_codes_and_statistics(method):
    """Repacking moves codes only: the standard bytes and the dequantized weight (DoRA norms,
    gradients) are bit-identical before, during and after the fused layout."""
    lin = quant_linear(192, 576, method=method)
    codes, dense = lin.weight.clone(), lin.dequantized_weight()
    lin.use_kernel("cpu-fused")
    assert lin.weight.shape == (192, 288)  # the fused tiles
    assert torch.equal(unpack_fused_codes(lin.weight, 192, 576), codes)
    assert torch.equal(lin.dequantized_weight(), dense)
    lin.use_kernel("standard")
    assert torch.equal(lin.weight, codes)
    assert torch.equal(lin.dequantized_weight(), dense)


@fused_only
def test_state_dict_holds_the_standard_layout_on_every_kernel():
    lin = quant_linear(192, 576, bias=True)
    standard = {k: v.clone() for k, v in lin.state_dict().items()}
    lin.use_kernel("cpu-fused")
    fused = lin.state_dict()
    assert fused.keys() == standard.keys()
    assert all(torch.equal(fused[k], standard[k]) for k in standard)
    assert lin.resident_bytes() == sum(v.numel() * v.element_size() for v in standard.values()) + \
        lin._fused_state.absmax.numel() * 2  # + the bf16 absmax of the packed layout


@fused_only
@pytest.mark.parametrize("shape", [(192, 576), (576, 1536), (1536, 576)])
def test_fused_backward_is_the_bf16_matmul_with_the_dequantized_weight(shape):
    """The fused path's input gradient is, bit for bit, the pure-torch bf16 product with the
    dequantized weight (quant.py `_FusedMatmul`), for fp32 and bf16 activations alike; and within
    bf16 rounding of the fp32 product (what the standard path computes in fp32)."""
    lin = quant_linear(*shape, bias=True)
    g = torch.Generator().manual_seed(1)
    x, upstream = torch.randn(6, shape[1], generator=g), torch.randn(6, shape[0], generator=g)
    lin.use_kernel("cpu-fused")
    w = lin.dequantized_weight()  # [out, in] fp32, the pure-torch meaning
    for dtype in (torch.float32, torch.bfloat16):
        xg = x.to(dtype).detach().clone().requires_grad_()
        (lin(xg) * upstream.to(dtype)).sum().backward()
        reference = (upstream.to(dtype).to(torch.bfloat16) @ w.to(torch.bfloat16)).to(dtype)
        assert xg.grad.dtype == dtype and torch.equal(xg.grad, reference)
    xg = x.clone().requires_grad_()
    (lin(xg) * upstream).sum().backward()
    exact = upstream @ w
    assert ((xg.grad - exact).norm() / exact.norm()) < 1e-2  # bf16 rounding, nothing more
    lin.use_kernel("standard")
    xs = x.clone().requires_grad_()
    (lin(xs) * upstream).sum().backward()
    assert ((xg.grad - xs.grad).norm() / xs.grad.norm()) < 1e-2


@fused_only
def test_bf16_dequantized_weight_is_the_fp32_one_rounded():
    lin = quant_linear(576, 1536)
    lin.use_kernel("cpu-fused")
    assert torch.equal(lin.dequantized_weight(torch.bfloat16), lin.dequantized_weight().to(torch.bfloat16))


def _unpack_reference(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """unpack_fused_codes' meaning, code by code: code m of tile (g, c) is low nibble of byte m
    (m < 32) or high nibble of byte m - 32, and stands for row 32g + m // 2, column 2c + m % 2;
    the standard byte of (row, column pair) holds the even column's code high."""
    tiles = packed.view(n // 32, k // 2, 32)  # [out/32, in/2, 32 bytes]
    codes = torch.cat([tiles & 0xF, tiles >> 4], dim=-1)  # [out/32, in/2, 64 codes]
    codes = codes.view(n // 32, k // 2, 32, 2).permute(0, 2, 1, 3).reshape(n, k // 2, 2)
    return ((codes[..., 0] << 4) | codes[..., 1]).reshape(-1, 1)


@fused_only
@pytest.mark.parametrize("shape", [(32, 64), (192, 576), (576, 1536), (1536, 576)])
def test_unpacking_the_fused_tiles_gives_the_standard_codes(shape):
    lin = quant_linear(*shape, seed=5)
    standard = lin.weight.clone()
    lin.use_kernel("cpu-fused")
    assert torch.equal(_unpack_reference(lin.weight, *shape), standard)
    assert torch.equal(unpack_fused_codes(lin.weight, *shape), standard)


@fused_only
def test_fused_equals_transformers_linear4bit_bitwise():
    """Quiver's fused projection computes exactly what bitsandbytes' Linear4bit computes on the
    same weights (the module transformers builds), which also takes the fused kernel here."""
    from bitsandbytes.nn import Linear4bit, Params4bit

    w = torch.randn(192, 576) * 0.05
    b = torch.randn(192)
    ref = Linear4bit(576, 192, bias=True, compute_dtype=torch.float32, quant_type="nf4",
                     compress_statistics=True).eval()
    ref.bias.data = b.clone()
    ref.weight = Params4bit(w.clone(), requires_grad=False, compress_statistics=True,
                            quant_type="nf4", blocksize=64)._quantize("cpu")
    lin = QuantLinear.from_dense(w, b, QuantConfig("nf4"))
    lin.use_kernel("cpu-fused")
    x = torch.randn(9, 576)
    with torch.no_grad():
        expected = ref(x)
    assert ref.weight.quant_state.packing_format_for_cpu  # the reference took the fused path
    assert torch.equal(lin(x), expected)


# ---- merged projections (runtime/nn/groups.py) ------------------------------------------------
@fused_only
@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: q/k/v bias in the merged matmul
def test_merged_groups_compute_what_their_members_compute(arch, tmp_path):
    """q/k/v and gate/up as one fused matmul each, with LoRA and DoRA on the members' slices,
    give the logits the members give one by one; the codes are stored once."""
    from runtime.nn.groups import ProjectionGroup
    from tests.peft_factory import make_peft_adapter, make_tiny_model
    from tests.quiver_factory import QuiverStack

    hf = make_tiny_model(arch, seed=3)
    q = QuiverStack.from_hf(hf, quant="nf4", slots=3, kernel="cpu-fused")
    groups = [m for m in q.model.modules() if isinstance(m, ProjectionGroup)]
    assert groups and all(g.merged for g in groups)
    attn = q.model.model.layers[0].self_attn
    assert attn.q_proj.base.weight.data_ptr() == attn.qkv.weight.data_ptr()  # a view, not a copy
    for name, opts in [("lora", dict(target_modules="all-linear")),
                       ("dora", dict(target_modules=["q_proj", "v_proj", "up_proj"], use_dora=True))]:
        q.load(name, make_peft_adapter(hf, "lora", tmp_path / name, seed=7, **opts))
    ids = torch.randint(0, 128, (9,), generator=torch.Generator().manual_seed(0))
    rows = [(ids, "lora"), (ids[:5], ""), (ids, "dora")]
    merged = q.batch_logits(rows)
    for g in groups:
        g.unmerge()
    assert not attn.qkv.merged and attn.qkv.weight is None
    for got, ref in zip(merged, q.batch_logits(rows)):
        assert (got - ref).abs().max() <= 1e-5


@fused_only
def test_merged_groups_pass_gradients_to_their_input():
    """Training on the served base (in-server fine-tuning) differentiates through merged q/k/v:
    the input's gradient equals the one through the members, unmerged."""
    from runtime.nn.groups import ProjectionGroup
    from tests.peft_factory import make_tiny_model
    from tests.quiver_factory import QuiverStack

    q = QuiverStack.from_hf(make_tiny_model("llama", seed=4), quant="nf4", slots=2, kernel="cpu-fused")
    group = q.model.model.layers[0].self_attn.qkv
    assert isinstance(group, ProjectionGroup) and group.merged
    x = torch.randn(3, q.cfg.hidden_size, requires_grad=True)
    sum(p.square().sum() for p in group(x, None)).backward()
    merged_grad = x.grad.clone()
    x.grad = None
    sum(p.square().sum() for p in [m(x, None) for m in group._members]).backward()
    assert merged_grad.abs().sum() > 0
    torch.testing.assert_close(merged_grad, x.grad)
    with torch.no_grad():  # serving: the one merged call
        outs = group(x, None)
    assert outs[0].grad_fn is None


def test_a_helper_thread_computes_on_one_thread_and_no_other_thread_changes():
    """kernels.helper_thread (the loader's, gRPC's and HTTP's pools): its own OpenMP team size
    only; the caller's and a thread started afterwards keep torch's count."""
    import threading

    from runtime.nn.kernels import helper_thread

    if torch.get_num_threads() < 2:
        pytest.skip("one torch thread here: nothing to reduce")
    before = torch.get_num_threads()
    seen = {}

    def helper():
        helper_thread()
        seen["helper"] = torch.get_num_threads()

    def later():
        seen["later"] = torch.get_num_threads()

    for fn in (helper, later):
        t = threading.Thread(target=fn)
        t.start()
        t.join()
    assert seen["helper"] == 1 and seen["later"] == before == torch.get_num_threads()


_TEAM_PROBE = """
import os, sys, torch
from concurrent.futures import ThreadPoolExecutor
from runtime.nn.kernels import helper_thread
torch.set_num_threads(2)
torch.randn(4_000_000).sum()  # the main thread's own team: started before counting
before = len(os.listdir("/proc/self/task"))
pool = ThreadPoolExecutor(1, initializer=helper_thread if sys.argv[1] == "helper" else None)
pool.submit(lambda: torch.randn(4_000_000).sum()).result()  # a parallel op on the pool's thread
print(len(os.listdir("/proc/self/task")) - before)
"""


def _threads_started(probe: str, *args: str) -> int:
    """The OS threads a probe script reports it left behind (run in a fresh process, so no
    other test's threads are counted)."""
    import subprocess
    import sys

    if not os.path.isdir("/proc/self/task") or (os.cpu_count() or 1) < 2:
        pytest.skip("needs Linux's /proc and 2 CPUs")
    out = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, timeout=120,
                         cwd=os.getcwd())
    assert out.returncode == 0, out.stderr[-2000:]
    return int(out.stdout.split()[-1])


@pytest.mark.parametrize("initializer, new_threads", [("helper", 1), ("none", 2)])
def test_a_parallel_op_on_a_helper_thread_starts_no_openmp_team(initializer, new_threads):
    """The pool's thread and nothing else: without helper_thread its op starts an OpenMP team
    (a second OS thread), which throttles every team's barriers in the process for good."""
    assert _threads_started(_TEAM_PROBE, initializer) == new_threads


def test_on_passing_thread_gives_the_value_or_raises_on_the_callers_thread():
    from runtime.nn.kernels import on_passing_thread

    assert on_passing_thread(lambda a, b=0: a + b, 2, b=3) == 5
    with pytest.raises(ValueError, match="bad"):
        on_passing_thread(lambda: (_ for _ in ()).throw(ValueError("bad")))


_PASSING_PROBE = """
import os, time, torch
from runtime.nn.kernels import on_passing_thread
torch.set_num_threads(2)
before = len(os.listdir("/proc/self/task"))
on_passing_thread(lambda: torch.randn(4_000_000).sum())  # a parallel op: a team on that thread
deadline = time.monotonic() + 10  # the OS thread (and its team's worker) exit just after join()
while len(os.listdir("/proc/self/task")) > before and time.monotonic() < deadline:
    time.sleep(0.01)
print(len(os.listdir("/proc/self/task")) - before)
"""


def test_a_passing_threads_openmp_team_ends_with_it():
    """What a Ray replica's model load relies on: no thread (and no team) is left behind."""
    assert _threads_started(_PASSING_PROBE) == 0
