"""`quiver` command line: generate, info, serve, serve-ray, adapters, train.

Each subcommand's module adds its own parser (`add_parser(subparsers)`) and runs it
(`run(args) -> int`); heavy imports (torch, grpc) happen only inside the chosen command.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

#: subcommand -> module with add_parser(subparsers) and run(args)
COMMANDS = {
    "generate": "runtime.generate_cli",
    "info": "runtime.generate_cli",
    "serve": "runtime.server.serve_cli",
    "serve-ray": "runtime.distributed.cli",
    "adapters": "runtime.server.adapters_cli",
    "train": "trainer.cli",
}


def add_model_options(p: argparse.ArgumentParser, serving: bool = True) -> None:
    """--model / --quantize / --dtype / --device / --threads, shared by generate, info, serve and
    train; --nf4-kernel where the base serves (training always takes the kernel with a backward)."""
    p.add_argument("--model", default=None,
                   help="local Hugging Face model directory (Llama family); default: the embedded "
                        "SmolLM2-135M-Instruct")
    p.add_argument("--quantize", choices=("nf4", "fp4", "none"), default="nf4",
                   help="4-bit storage of the decoder projections (bitsandbytes, double quant, "
                        "blocksize 64); default nf4")
    p.add_argument("--dtype", choices=("bfloat16", "float32", "float16"), default=None,
                   help="compute dtype (default auto: on CPU float32 activations with bf16 4-bit "
                        "kernels and lm_head where the CPU has bf16; bfloat16 on CUDA). float32 "
                        "is the exact fp32 mode (no bf16 anywhere)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    if serving:
        p.add_argument("--nf4-kernel", choices=("auto", "cpu-fused", "cpu-gemv", "standard"), default="auto",
                       help="4-bit matmul kernel: cpu-fused (bitsandbytes' AVX512-BF16 kernel), "
                            "cpu-gemv (Quiver's fp32 kernel for decode rows, other CPUs), "
                            "standard (bnb.matmul_4bit; CUDA kernels on GPU); default auto: fused "
                            "on CPUs that have it, else cpu-gemv, unless --dtype float32")
    p.add_argument("--threads", type=int, default=None,
                   help="torch compute threads (default: the cores torch sees, capped by a "
                        "cgroup CPU limit such as a container's --cpus or a Kubernetes limit)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quiver", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="WARNING", help="DEBUG, INFO, WARNING (default)")
    sub = parser.add_subparsers(dest="command", required=True)
    seen = set()
    for module_name in COMMANDS.values():
        if module_name in seen:
            continue
        seen.add(module_name)
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name != module_name:
                raise
            continue  # a command not built yet in this checkout
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args) or 0
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        # errors a user can act on (bad model dir, unsupported architecture, bad adapter...)
        print(f"quiver {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
