"""The one place that decides how the frozen 4-bit base computes, per device and shape.

    kernel "cpu-fused"  CPU with AVX512-BF16: bitsandbytes' fused NF4/FP4 kernel over its packed
                        layout (`_convert_weight_packed_for_cpu`, once at load). bf16 inside,
                        no dense weight ever materialised; what transformers' `Linear4bit` runs
                        on such CPUs in eval mode, so Quiver computes what transformers computes.
    kernel "cpu-gemv"   other CPUs (AVX2): Quiver's own fp32 4-bit matmul over the standard
                        layout (csrc/nf4_gemv.cpp) for decode-sized inputs (<= 8 rows, no
                        gradient), each code turned into its value in registers; larger inputs
                        and training take "standard". Measured (bench.kernel_bench --gemv,
                        SmolLM2-135M shapes, 2 AVX2 threads): 2.5-4.3x faster than
                        bitsandbytes' dequantize + matmul at 1-8 rows; the same values up to
                        fp32 summation order (relative error ~3e-7).
    kernel "standard"   `bnb.matmul_4bit` on the standard layout: on CUDA bitsandbytes' own
                        kernels (its fused gemv for one row, dequantize + cuBLAS otherwise); on
                        other CPUs dequantize the whole weight, then a dense matmul. It carries
                        gradients (the trainer) and is the exact mode of `--dtype float32`.

Why the fused kernel serves prefill too (measured, 1 thread, bench/kernel_bench.py): it costs a
fixed time per 4 rows, so it beats dequantize + dense bf16 matmul up to ~128 rows and takes
~1.33x its time at 512-row prefill chunks (all four SmolLM2 shapes). The dense alternative needs
the standard layout resident next to the packed one (0.55 -> 1.05 B/param) or a per-step
re-layout that costs more than the matmul it saves (~1 ms for 576x1536 in torch); for ~6% of a
prefill-heavy load neither pays for itself against the memory promise, so one layout and one
kernel serve every batch size. See README "Kernels and precision".

Shapes the fused kernel cannot take (out_features % 32, in_features % blocksize) stay on the
standard layout: the choice is made per projection, never aborting.
"""
from __future__ import annotations

import ctypes
import functools
import logging
import os
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

KERNELS = ("auto", "cpu-fused", "cpu-gemv", "standard")

#: the fused CPU kernel's packing tiles out_features by this many rows
FUSED_BLOCK_N = 32


@functools.lru_cache(maxsize=1)
def cpu_has_fused_nf4() -> bool:
    """True on CPUs where bitsandbytes' fused 4-bit kernel runs (AVX512-BF16)."""
    quiet_bitsandbytes_import()
    import bitsandbytes.functional as bnbf

    return bool(bnbf.has_avx512bf16())


def native_bf16_cpu() -> bool:
    """The CPU computes bf16 matmuls natively (oneDNN says so: AVX512-BF16 / AMX)."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def resolve_kernel(requested: str, device: torch.device, exact_fp32: bool) -> str:
    """The kernel name for the whole model: `requested` unless it is "auto".

    auto on CPU, unless the exact fp32 mode was asked for (`--dtype float32`: bitsandbytes'
    own dequantize + matmul, bit for bit): the fused kernel on CPUs that have it (it computes in
    bf16), else the gemv where the native extension is built; "standard" everywhere else (CUDA
    included: bitsandbytes picks its own fused gemv there per call).
    """
    if requested not in KERNELS:
        raise ValueError(f"--nf4-kernel must be one of {', '.join(KERNELS)}, not {requested!r}")
    cpu = device.type == "cpu"
    if requested == "auto":
        if cpu and not exact_fp32 and cpu_has_fused_nf4():
            return "cpu-fused"
        return "cpu-gemv" if cpu and not exact_fp32 and gemv_available() else "standard"
    if requested == "cpu-fused" and (not cpu or not cpu_has_fused_nf4()):
        raise ValueError("--nf4-kernel cpu-fused needs a CPU with AVX512-BF16 (bitsandbytes' "
                         "fused kernel); this machine has none: use auto, cpu-gemv or standard")
    if requested == "cpu-gemv" and (not cpu or not gemv_available()):
        raise ValueError("--nf4-kernel cpu-gemv needs the CPU and Quiver's native extension "
                         "(built by `make setup`; a C++ compiler): use auto or standard")
    return requested


def gemv_available() -> bool:
    """Quiver's own 4-bit gemv (csrc/nf4_gemv.cpp) is built here."""
    from runtime.nn.native import nf4_gemv_kernel

    return nf4_gemv_kernel() is not None


def gemv_shape_ok(in_features: int, blocksize: int) -> bool:
    """Whether the gemv can take a weight (its blocks within rows, 16 codes a step)."""
    return blocksize % 16 == 0 and in_features % blocksize == 0


def fused_shape_ok(out_features: int, in_features: int, blocksize: int) -> bool:
    """Whether the fused CPU kernel can take a [out, in] weight (else: standard, per layer)."""
    return out_features % FUSED_BLOCK_N == 0 and in_features % blocksize == 0


def quiet_bitsandbytes_import() -> None:
    """Import bitsandbytes once with its CPU backend's hub probe silenced.

    On AVX512-BF16 CPUs bitsandbytes tries to fetch an optional kernel from a model hub at
    import and logs a warning when it cannot; Quiver never uses that kernel (offline by design),
    so the warning would only mislead an operator reading the start-up log.
    """
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        import bitsandbytes  # noqa: F401
    finally:
        logger.setLevel(level)


def set_threads(threads: int | None) -> int:
    """Set torch's intra-op threads; returns the count in force. None: the cores this process
    may use: torch's default (the CPUs of its affinity mask) capped by a cgroup CPU limit
    (`cpu_limit`). The engine step is the only heavy compute in the process: the gRPC and HTTP
    threads only convert messages, so they need no cores of their own."""
    if threads is None:
        limit = cpu_limit()
        if limit is not None and limit < torch.get_num_threads():
            log.info("%d threads: the cgroup CPU limit is %d CPUs (torch sees %d)", limit, limit,
                     torch.get_num_threads())
            threads = limit
    if threads is not None:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


#: the CPUs this process may run on, as it started (before any thread was pinned)
_AFFINITY: set[int] = set(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else set()


def bind_threads() -> list[int] | None:
    """Pin the calling thread's OpenMP team (torch's intra-op threads, which bitsandbytes' and
    the C++ layers' parallel regions use too) one thread per CPU of this process's affinity
    mask, the calling thread on the first; the CPUs bound, or None where it does not apply:
    then nothing changes. It applies where the team is exactly as large as the mask: with fewer
    threads the other CPUs are someone else's (Ray replicas of one CPU each on one machine would
    all land on the first), with more there is no CPU per thread; and it needs the extension
    and Linux.

    Why: a step's team meets at a barrier in each of its ~150 parallel regions, so it runs at
    the pace of its slowest thread. Unpinned, Linux sometimes leaves two of its threads on one
    core for milliseconds after another thread has run (a gRPC or HTTP thread; a fine-tuning
    job's piece, when pieces had a thread of their own), each spinning while the other waits:
    measured on 2 cores, 1-3% of the decode steps after such a piece took 3-5x their time
    (15-40 ms for a 5 ms step), none pinned.
    Threads the caller starts later inherit its CPU; `unpinned` gives a thread the whole mask
    back (every pool of the server does: `helper_thread`).
    A job's pieces run on the engine thread itself, with this team (runtime/training/pieces.py)."""
    from runtime.nn.native import bind_threads_kernel

    cpus = sorted(_AFFINITY)
    bind = bind_threads_kernel()
    if bind is None or not cpus or torch.get_num_threads() != len(cpus):
        return None
    bound = bind(cpus)
    return bound if all(c >= 0 for c in bound) else None


def unpinned() -> None:
    """The calling thread back on every CPU of the process's mask (helper threads started by a
    pinned one: `bind_threads`)."""
    if _AFFINITY:
        os.sched_setaffinity(0, _AFFINITY)


def helper_thread() -> None:
    """For every thread of the server but the engine's (the adapter loader's, the gRPC and HTTP
    workers', a job's publishing and file writes; their pools' initializer): its torch ops on one
    thread, on any CPU (`unpinned`).

    Why: libgomp counts the threads of every OpenMP team the process ever started, and once
    that count exceeds the CPUs, every team's barriers stop spinning and sleep at once, for
    good: the first parallel op on any other thread (a team of its own, kept with its thread)
    slows every later decode step. Measured on 2 cores: a parallel region of the engine's team
    14-28 us, 82-157 us once an idle pool thread had run one parallel op; `quiver serve`'s
    base stream 6.7-7.1 ms per token, 15.4-17.1 ms for the rest of the process after a rank-64
    LoRA's hot load (its B tensors above ATen's grain: a parallel copy on the loader thread).
    OpenMP's team size is per thread (omp_set_num_threads), so the engine keeps its own;
    torch.set_num_threads would also change the default of every thread started later."""
    unpinned()
    torch.get_num_threads()  # ATen's per-thread init first: it would set the team size back
    set_team = _omp_set_num_threads()
    if set_team is not None:
        set_team(1)


def on_passing_thread(fn, *args, **kwargs):
    """fn(*args, **kwargs) on a thread of its own that ends with it; its value (or what it raises).

    For the set-up of a server whose engine steps on a thread of its own (a Ray replica): the
    model load's parallel ops start an OpenMP team on the thread that runs them, kept as long as
    that thread lives, and with the engine's own team beside it libgomp throttles both
    (`helper_thread`). A thread that ends takes its team with it. Measured (embedded model,
    2 cores, `python -m bench.engine_thread`): the engine's decode step on its own thread
    14.7-15.0 ms with the model loaded on the caller's thread, 4.2-5.5 ms loaded on a passing one."""
    out: dict = {}

    def run():
        try:
            out["value"] = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - raised again on the caller's thread
            out["error"] = e

    t = threading.Thread(target=run, name="quiver-setup")
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


@functools.lru_cache(maxsize=1)
def _omp_set_num_threads():
    """libgomp's omp_set_num_threads as torch loaded it (None: another OpenMP runtime, or none)."""
    try:
        return ctypes.CDLL(None).omp_set_num_threads
    except (OSError, AttributeError):
        return None


def cpu_limit(proc_cgroup: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> int | None:
    """CPUs this process's cgroup may use per period (a container's `--cpus`, a Kubernetes CPU
    limit), rounded up; None where there is no limit or no cgroup to read.

    Why: torch sizes its OpenMP team by the CPUs it sees, which in a container are the node's.
    A step's team waits at every parallel region for its slowest thread, so a team larger than
    the quota is throttled mid-region, and each of a step's ~120 regions then waits out the
    throttled period: measured here, a 2-thread step on 2 oversubscribed cores ran 60x slower
    than on 1 thread. cgroup v2 (`cpu.max`: "quota period" or "max ...") and v1
    (`cpu.cfs_quota_us` / `cpu.cfs_period_us`, -1 = none) are both read.
    """
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        rel = path.lstrip("/")
        if controllers == "":  # v2 unified hierarchy
            quota_period = _read(Path(root, rel, "cpu.max"))
            if quota_period:
                quota, _, period = quota_period.partition(" ")
                return _cpus(quota, period)
        elif "cpu" in controllers.split(","):
            base = Path(root, controllers, rel)
            if not base.exists():
                base = Path(root, "cpu", rel)
            found = _cpus(_read(base / "cpu.cfs_quota_us"), _read(base / "cpu.cfs_period_us"))
            if found is not None:
                return found
    return None


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _cpus(quota: str | None, period: str | None) -> int | None:
    """ceil(quota / period) for a set quota; None for "max", -1 or anything unreadable."""
    try:
        q, p = int(quota), int(period)
    except (TypeError, ValueError):
        return None
    if q <= 0 or p <= 0:
        return None
    return max(1, -(-q // p))


def fused_matmul(x: torch.Tensor, packed: torch.Tensor, state) -> torch.Tensor:
    """x [.., in] @ W.T through the fused CPU kernel, over the packed layout -> [.., out] in x's
    dtype (bf16 inside: the input is rounded to bf16, as bitsandbytes' own op does).

    Calls bitsandbytes' C kernel directly: its torch op wrapper re-derives the quant type from
    the code table (a tensor compare + `.item()`) and re-checks dtypes on every call, ~10-20 us
    that a decode step pays ~120 times. ctypes releases the GIL for the call, so the server's
    other threads run meanwhile. Falls back to the op where the symbol is absent.
    """
    kernel = _fused_entry(state.quant_type)  # the packed state's absmax is contiguous bf16
    if kernel is None:
        import bitsandbytes.functional as bnbf

        return bnbf.gemv_4bit(x, packed, state=state)
    n, k = state.shape
    a = x.reshape(-1, k).to(torch.bfloat16).contiguous()  # [M, in]
    out = torch.empty(a.shape[0], n, dtype=torch.bfloat16, device=x.device)  # [M, out]
    kernel(a.shape[0], n, k, a.data_ptr(), packed.data_ptr(), state.absmax.data_ptr(),
           out.data_ptr(), state.blocksize, a.stride(0), out.stride(0))
    return out.to(x.dtype).view(*x.shape[:-1], n)


#: gemv_4bit_inference_cpu_{nf4,fp4}_bf16(M, N, K, A, B, absmax, out, blocksize, A_strideM,
#: out_strideM): bitsandbytes' C signature, typed once so calls take plain ints
_FUSED_PROTO = ctypes.CFUNCTYPE(None, *[ctypes.c_int64] * 3, *[ctypes.c_void_p] * 4,
                                *[ctypes.c_int64] * 3)


@functools.lru_cache(maxsize=4)
def _fused_entry(quant_type: str):
    """bitsandbytes' C entry point for `quant_type` (nf4 / fp4) with our own typed prototype
    (bitsandbytes' shared function object is left as it is), or None when absent."""
    import bitsandbytes.functional as bnbf

    fn = getattr(bnbf.lib, f"gemv_4bit_inference_cpu_{quant_type}_bf16", None)
    if fn is None:
        return None
    return _FUSED_PROTO(ctypes.cast(fn, ctypes.c_void_p).value)
