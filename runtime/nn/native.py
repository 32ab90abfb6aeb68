"""The pure-decode step's layers in C++ (csrc/decode_stack.cpp): the same ATen ops, without Python.

    DecoderModel.forward, any step against the KV cache (LoRA and DoRA rows included):
        logits = DecodeStack.step_logits(tokens, positions, ...)   (C++, the whole step:)
            x = embed(tokens); cos, sin = rotary(positions)
            x = every layer of DecodeStack.forward(x, cos, sin, KV pool, ...)
            logits = lm_head(norm(x[logits_rows]))
    Steps with embedding-LoRA rows or given embeddings run the embedding in Python and then
    `DecodeStack.forward` for the layers alone (`NativeDecode.__call__`); the norm and the head
    follow in Python there.

Why: at decode sizes every op of a layer costs more in Python dispatch than in compute
(measured on SmolLM2-135M, batch 1, 2 threads: 8.1 ms a step through the modules, 4.8 ms with
the same ops issued from C++, against 3.6 ms for the matmuls alone; and the ops around the layers
run cold after the weights' stream, ~50-100 us each, so the embedding, the final norm and the
head went in too). The C++ layer issues the
modules' ATen ops in the same order (model.py, attention.py, rotary.py, kernels.py), so both
paths give the same bits; tests/nn/test_native.py holds them to it, and the Python modules stay
the reference and the path of every other step (training, the prompt-tuning KV precompute,
the gather LoRA path, CUDA).

The stack exists only where all of it applies: every projection on the fused CPU kernel with
q/k/v and gate/up merged (runtime/nn/groups.py), fp32 activations and cache. It is built once,
at `make setup` (`python -m runtime.nn.native`), into the environment (`<venv>/quiver-native`);
a process that finds it missing or stale builds it then (~40-110 s on 2 cores, one process at a
time: `_build_lock`).
Without a compiler, or with QUIVER_NATIVE_DECODE=0, the Python modules run every step: same
output, slower.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCES = [Path(__file__).with_name("csrc") / f for f in ("decode_stack.cpp", "paged_attention.cpp",
                                                              "elementwise.cpp", "lora_rows.cpp",
                                                              "lm_head.cpp", "threads.cpp", "nf4_gemv.cpp")]
#: built where it runs, so for this CPU. -fopenmp: ATen's `at::parallel_for` is a header template
#: whose OpenMP region is compiled into the caller, so without it every loop here ran on one
#: thread; the library it links is torch's own (libgomp.so.1, already loaded by torch).
CFLAGS = ("-O3", "-march=native", "-fopenmp")
LDFLAGS = ("-fopenmp",)
#: a layer's projections in the C++ stack's order (its `Member` enum)
MEMBERS = (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"),
           ("self_attn", "o_proj"), ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj"))
#: LoRA paths the C++ layers run (adapter_batch.py); "gather" stays in Python
LORA_PATHS = {"runs": 1}
_NO_LORA = (0, None, False, None)
#: set to 0 to run every step through the Python modules (same output; for comparison)
ENV_SWITCH = "QUIVER_NATIVE_DECODE"
#: a load that took longer than this compiled: said in the log (a server's first load, stale sources)
BUILD_NOTICE_S = 5.0


def build_directory() -> Path:
    """Where the extension is built: inside the Python environment, so a fresh venv builds its own
    against its own torch."""
    return Path(sys.prefix) / "quiver-native"


@functools.lru_cache(maxsize=1)
def extension():
    """The compiled module, building it if missing or stale; None (with the reason logged once)
    where it cannot be built or is switched off."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return None
    try:
        from torch.utils.cpp_extension import load

        _ninja_on_path()
        out = build_directory()
        out.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        with _build_lock(out):
            # fresh lists: the loader appends torch's own flags to the ones it is given, and a
            # second load in a process (tests) with other flags than the first is a rebuild as
            # `quiver_native_v1`, then another in the next process that loads the first name
            ext = load("quiver_native", [str(s) for s in SOURCES], extra_cflags=list(CFLAGS),
                       extra_ldflags=list(LDFLAGS), build_directory=str(out), verbose=False)
        took = time.monotonic() - t0
        if took > BUILD_NOTICE_S:
            log.info("native decode path built in %.0f s (missing or stale in %s)", took, out)
        return ext
    except Exception as e:  # no compiler, no ninja, headers missing: the Python path serves
        log.warning("native decode path unavailable (%s: %s); decode steps run the Python modules",
                    type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        return None


@contextlib.contextmanager
def _build_lock(out: Path):
    """Held around torch's loader, by one process at a time. The loader guards its build with a
    lock *file* (torch.utils.file_baton) that every other process polls until it is gone: a
    process killed inside the loader (SIGKILL, OOM) leaves it behind, and every later one then
    waits for ever in its first model load. An flock is released by the kernel when its holder
    dies, so under it no live process is inside the loader, and a lock file found there is such a
    leftover: it is removed."""
    import fcntl

    with open(out / "quiver-build.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            left = out / "lock"
            if left.exists():
                log.warning("removing %s, left by a process killed while it built the native decode path", left)
                left.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _ninja_on_path() -> None:
    """torch's loader runs `ninja` from PATH; the pip package puts it beside this interpreter,
    which a process started as `.venv/bin/quiver` (or by a service manager) may not have on
    PATH."""
    here = Path(sys.executable).parent
    if shutil.which("ninja") is None and (here / "ninja").exists():
        os.environ["PATH"] = f"{here}{os.pathsep}{os.environ.get('PATH', '')}"


class NativeDecode:
    """The C++ stack over one model's layers, and the rule for which steps it may take."""

    def __init__(self, stack):
        self.stack = stack
        self.head_ready = False  # `attach_head` handed the stack the embedding and the head

    @classmethod
    def for_model(cls, model) -> "NativeDecode | None":
        """The stack over `model`'s layers, or None where any layer is outside what it computes."""
        if not applicable(model):
            return None
        ext = extension()
        if ext is None:
            return None
        from runtime.nn.kernels import _fused_entry

        first = model.model.layers[0]
        state = first.self_attn.qkv._state
        kernel = _fused_entry(state.quant_type)
        if kernel is None:
            return None
        c = model.cfg
        stack = ext.DecodeStack(c.num_heads, c.num_kv_heads, c.head_dim, first.mlp.gate_up.sizes[0],
                                c.rms_norm_eps, state.blocksize, ctypes.cast(kernel, ctypes.c_void_p).value)
        for layer in model.model.layers:
            a, m = layer.self_attn, layer.mlp
            o, d = a.o_proj.base, m.down_proj.base
            stack.add_layer(layer.input_layernorm.weight, layer.post_attention_layernorm.weight,
                            a.qkv.weight, a.qkv._state.absmax, a.qkv.bias,
                            o.weight, o._fused_state.absmax, o.bias,
                            m.gate_up.weight, m.gate_up._state.absmax, m.gate_up.bias,
                            d.weight, d._fused_state.absmax, d.bias)
        native = cls(stack)
        native.attach_lora(model)
        native.attach_head(model)
        return native

    def attach_head(self, model) -> None:
        """Hand the stack the embedding, the final norm and the lm_head's tensors for
        `logits` (after LmHead.use picked them). Not where the head's exact pass would be
        torch's (LmHead._fused_refine None with approximate copies): then `logits` says so and
        the modules run the head."""
        from runtime.nn.lm_head import EXACT_TOP, INT8_MAX_ROWS

        head, norm, emb = model.head, model.model.norm, model.model.embed_tokens.weight
        self.head_ready = False
        if head.weight.dtype != torch.float32 or not head.weight.is_contiguous() or \
                not emb.is_contiguous() or (head.bf16 is not None and head._fused_refine is None):
            return
        self.stack.set_embedding(emb)
        self.stack.set_head(norm.weight, norm.eps, head.weight, head.int8, head.int8_scale, head.bf16,
                            INT8_MAX_ROWS, EXACT_TOP)
        self.head_ready = True

    def logits(self, tokens: torch.Tensor, positions: torch.Tensor, rotary, attn, adapters,
               logits_rows: torch.Tensor | None) -> torch.Tensor | None:
        """The whole step in one call (`DecodeStack.step_logits`): logits, or None where the
        step is not one for it (no head handed over, a position past the rotary tables) and
        nothing was computed or written; then the modules' path runs it."""
        if not self.head_ready:
            return None
        return self.stack.step_logits(tokens, positions, rotary.cos_table, rotary.sin_table, logits_rows,
                                      attn.cache.pool, attn.write_index, *_attention_args(attn),
                                      *_lora_args(adapters))

    def attach_lora(self, model) -> None:
        """Point the stack at every projection's LoRA slots (after `allocate_lora_slots`): it
        keeps the tensors by reference, so adapters loaded later are seen without a call."""
        for i, layer in enumerate(model.model.layers):
            for j, (part, name) in enumerate(MEMBERS):
                slots = getattr(getattr(layer, part), name).lora
                if slots is not None:
                    base = getattr(getattr(layer, part), name).base
                    self.stack.set_lora(i, j, slots.A, slots.Bt, slots.scale, slots.bias, slots.slot_meta,
                                        slots.dora, base.bias)

    @staticmethod
    def takes(attn, adapters) -> bool:
        """A step against the KV cache (decode rows, prefill chunks or both) on a CPU fp32 pool
        (the paged decode kernel), whose LoRA rows (if any, DoRA included) take the runs path.
        Embedding LoRA is applied before the layers and prompt / prefix tuning live in the
        cache: both are fine. Not the prompt-tuning KV precompute (`capture`)."""
        if attn.capture is not None or attn.paged is None:  # set by attn.prepare (cache-only)
            return False
        if adapters is None or not adapters.has_lora:
            return True
        return adapters.path in LORA_PATHS

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn,
                 adapters=None) -> torch.Tensor:
        # x [T, hidden] -> [T, hidden] after the last layer (the cache written as the modules do)
        return self.stack.forward(x, cos, sin, attn.cache.pool, attn.write_index,
                                  *_attention_args(attn), *_lora_args(adapters))


def _attention_args(attn) -> tuple:
    """The step's AttentionBatch as the stack's arguments: the decode group (paged kernel) and
    each looped row's block table and causal mask, made once per step (attention.py makes
    them per layer; the same values)."""
    from runtime.nn.attention import causal_mask

    rows = attn.looped_rows
    dev = attn.cache.device
    tables = [torch.tensor([r.seq.blocks], device=dev) for r in rows]
    masks = [causal_mask(r.q_len, r.kv_len, attn.sliding_window, dev) for r in rows]
    decode_tokens = None if attn.all_decode else attn.decode_tokens
    return (decode_tokens, attn.decode_table, attn.decode_lens, attn.decode_los,
            [r.q_start for r in rows], [r.q_len for r in rows], [r.kv_len for r in rows], tables, masks)


def _lora_args(ab) -> tuple:
    """The step's AdapterBatch as the stack's LoRA arguments (see decode_stack.cpp forward)."""
    if ab is None or not ab.has_lora:
        return _NO_LORA
    return (LORA_PATHS[ab.path], torch.tensor(ab.runs, dtype=torch.long), ab.any_dora,
            ab.token_slots if ab.any_dora else None)


def op(name: str):
    """The extension's function `name`, or None without the extension (the callers then run
    their torch form)."""
    ext = extension()
    return None if ext is None else getattr(ext, name)


def paged_attention(cache):
    """csrc/paged_attention.cpp's kernel for decode rows over `cache`, or None where it does not
    apply (not a CPU fp32 pool, or no extension): then SDPA over gathered keys (attention.py)."""
    if cache is None or cache.device.type != "cpu" or cache.dtype != torch.float32:
        return None
    return op("paged_decode_attention")


def rms_norm_kernel():
    """csrc/elementwise.cpp's one-pass fp32 RMSNorm (CPU), or None."""
    return op("rms_norm")


def rotate_kernel():
    """csrc/elementwise.cpp's one-pass rotary (CPU fp32), or None."""
    return op("rotate")


def silu_mul_kernel():
    """csrc/elementwise.cpp's one-pass fp32 silu(g) * u (CPU), or None."""
    return op("silu_mul")


def argmax_kernel():
    """csrc/elementwise.cpp's x.argmax(-1) over fp32 rows (CPU), or None."""
    return op("argmax_rows")


def lora_rows_kernel():
    """csrc/lora_rows.cpp's lora_rows (y + the delta of a few rows of one adapter), or None."""
    return op("lora_rows")


def lora_runs_kernel():
    """csrc/lora_rows.cpp's lora_runs_ (every short run of a step, in place), or None."""
    return op("lora_runs_")


def lm_head_refine_kernel():
    """csrc/lm_head.cpp's one-pass exact top-k over bf16 logits (CPU), or None."""
    return op("lm_head_refine")


def lm_head_int8_kernel():
    """csrc/lm_head.cpp's int8 weight-only head matmul (fp32 rows in, bf16 logits out), or None."""
    return op("lm_head_int8")


def nf4_gemv_kernel():
    """csrc/nf4_gemv.cpp's 4-bit matmul on a few rows over the standard layout (CPU), or None."""
    return op("nf4_gemv")


def bind_threads_kernel():
    """csrc/threads.cpp's bind_threads (the calling thread's OpenMP team pinned to CPUs), or None."""
    return op("bind_threads")


def applicable(model) -> bool:
    """Every layer merged on the fused kernel, fp32 activations, norms as plain weights."""
    if model.dtype != torch.float32 or model.model.norm.weight.device.type != "cpu":
        return False
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        if not (a.qkv.merged and m.gate_up.merged):
            return False
        if a.o_proj.base.kernel != "cpu-fused" or m.down_proj.base.kernel != "cpu-fused":
            return False
    return True


if __name__ == "__main__":  # `make setup`: build now rather than in the first server
    logging.basicConfig(level=logging.INFO)
    built = extension() is not None
    print(f"quiver: native decode path {'built' if built else 'NOT built (the Python path serves)'}"
          f" in {build_directory()}")
