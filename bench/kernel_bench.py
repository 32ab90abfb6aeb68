"""The 4-bit kernel crossover: fused NF4 kernel vs dequantize + dense bf16 matmul, by rows.

    .venv/bin/python -m bench.kernel_bench                      # SmolLM2's projection shapes, 1 thread
    .venv/bin/python -m bench.kernel_bench --threads 2 --rows 1 8 64 512

For each projection shape of the embedded model and each row count (decode batch or prefill
chunk), the median time of:
- fused:   bitsandbytes' fused CPU kernel over its packed layout (what Quiver runs, kernels.py)
- deq+mm:  dequantize the standard layout to bf16 (bitsandbytes' C kernel) + a dense bf16 matmul
           (the alternative for large chunks; it needs the standard layout resident as well)
- mm only: the dense bf16 matmul of an already dequantized weight (a lower bound no 4-bit
           layout reaches without keeping a dense copy)
The choice in runtime/nn/kernels.py (one layout, the fused kernel for every row count) rests on
these figures; rerun them on a new CPU before changing it.

    .venv/bin/python -m bench.kernel_bench --gemv --threads 2   # any CPU: the cpu-gemv kernel

--gemv times, in fp32 at decode row counts (default 1, 4, 8): Quiver's cpu-gemv over the
standard layout (csrc/nf4_gemv.cpp, the kernel of CPUs without AVX512-BF16), bitsandbytes'
standard path it replaces there (`bnb.matmul_4bit`: dequantize to fp32, then the matmul), and the
fp32 matmul of an already dequantized weight (what a dense fp32 copy, 8x the bytes, would cost).
"""
from __future__ import annotations

import argparse
import copy
import sys

import torch

from bench.common import machine_line, median_time, table, versions_line

#: (out_features, in_features) of SmolLM2-135M's projections: q|k|v merged, o, gate|up merged, down
SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]


def rows_for(shape: tuple[int, int], row_counts: list[int], reps: int) -> list[list[object]]:
    import bitsandbytes.functional as bnbf

    from runtime.config import QuantConfig
    from runtime.nn.quant import QuantLinear

    n, k = shape
    lin = QuantLinear.from_dense(torch.randn(n, k) * 0.05, None, QuantConfig())
    standard, state = lin.weight.clone(), copy.deepcopy(lin.quant_state)
    state.dtype = torch.bfloat16  # dequantize straight to bf16
    dense = bnbf.dequantize_4bit(standard, state)
    lin.use_kernel("cpu-fused")
    out = []
    for m in row_counts:
        x = torch.randn(m, k).to(torch.bfloat16)
        with torch.no_grad():
            fused = median_time(lambda: lin(x), reps)
            deq = median_time(lambda: torch.nn.functional.linear(x, bnbf.dequantize_4bit(standard, state)), reps)
            mm = median_time(lambda: torch.nn.functional.linear(x, dense), reps)
        out.append([f"{n}x{k}", m, fused * 1e3, deq * 1e3, mm * 1e3, deq / fused])
    return out


def gemv_rows_for(shape: tuple[int, int], row_counts: list[int], reps: int) -> list[list[object]]:
    import bitsandbytes as bnb

    from runtime.config import QuantConfig
    from runtime.nn.quant import QuantLinear

    n, k = shape
    lin = QuantLinear.from_dense(torch.randn(n, k) * 0.05, None, QuantConfig())
    dense = lin.dequantized_weight()
    lin.use_kernel("cpu-gemv")
    out = []
    for m in row_counts:
        x = torch.randn(m, k)
        with torch.no_grad():
            gemv = median_time(lambda: lin(x), reps)
            std = median_time(lambda: bnb.matmul_4bit(x, lin.weight, quant_state=lin.quant_state), reps)
            mm = median_time(lambda: torch.nn.functional.linear(x, dense), reps)
        out.append([f"{n}x{k}", m, gemv * 1e3, std * 1e3, mm * 1e3, std / gemv])
    return out


def main_gemv(args) -> int:
    from runtime.nn.kernels import gemv_available

    if not gemv_available():
        print("the native extension is not built (make setup): no cpu-gemv kernel to time")
        return 0
    rows = [r for shape in SHAPES for r in gemv_rows_for(shape, args.rows, args.reps)]
    print(f"\n{machine_line()}; {versions_line()}; {args.threads} thread(s)\n")
    print(table(["shape (out x in)", "rows", "cpu-gemv ms", "bnb standard ms", "fp32 mm only ms",
                 "standard / gemv"], rows))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, nargs="+", default=None,
                   help="row counts (default 1 4 16 64 128 256 512; --gemv: 1 4 8)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--gemv", action="store_true", help="time the cpu-gemv kernel (any CPU)")
    args = p.parse_args(argv)
    if args.gemv:
        args.rows = args.rows or [1, 4, 8]
        torch.set_num_threads(args.threads)
        return main_gemv(args)
    args.rows = args.rows or [1, 4, 16, 64, 128, 256, 512]
    from runtime.nn.kernels import cpu_has_fused_nf4

    if not cpu_has_fused_nf4():
        print("this CPU has no AVX512-BF16: bitsandbytes' fused kernel is absent, nothing to compare")
        return 0
    torch.set_num_threads(args.threads)
    rows = [r for shape in SHAPES for r in rows_for(shape, args.rows, args.reps)]
    print(f"\n{machine_line()}; {versions_line()}; {args.threads} thread(s)\n")
    print(table(["shape (out x in)", "rows", "fused ms", "deq+mm ms", "mm only ms",
                 "deq+mm / fused (< 1: dense faster)"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
