"""Building the serving decoder from a model directory: device, dtype, quantization.

    resolve_model_dir -> load_model_config + load_state_dict -> DecoderModel(quantized) -> device

Weights are quantized on the target device (bitsandbytes CUDA kernels on GPU, its CPU backend
otherwise), exactly as transformers' `BitsAndBytesConfig(load_in_4bit=True)` path does.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from runtime.config import ModelConfig, QuantConfig
from runtime.models.hf import load_model_config, load_state_dict, load_tokenizer, resolve_model_dir
from runtime.nn.model import DecoderModel

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but no CUDA device is visible")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"--device must be auto, cpu or cuda, not {device!r}")
    return torch.device(device)


@dataclass(frozen=True)
class Precision:
    """Dtypes per part of the step, and the 4-bit kernel (runtime/nn/kernels.py)."""

    dtype: torch.dtype  # activations, norms, attention, LoRA slots, KV cache
    approximate_head: bool  # lm_head in bf16 / int8 with the top candidates exact (lm_head.py)
    nf4_kernel: str  # "cpu-fused", "cpu-gemv" or "standard"


def resolve_precision(dtype: str | None, device: torch.device, nf4_kernel: str = "auto",
                      training: bool = False) -> Precision:
    """The dtypes and kernel of each part of the step, chosen by measurement (README).

    Serving on CPU, `dtype` None (auto): activations and elementwise work in float32 (a bf16
    step measured slower on CPU: every norm, rotary and softmax upcasts), the 4-bit projections
    on the fused bf16 kernel where the CPU has it (else the gemv at decode rows), and the lm_head
    approximate (int8 / bf16 where the CPU computes bf16 natively, 3-10x faster than fp32 there;
    int8 at decode rows elsewhere; each row's top candidates are then recomputed exactly,
    runtime/nn/lm_head.py). `--dtype float32` is the exact fp32 mode:
    no bf16 anywhere (the standard 4-bit path dequantizes to fp32). `--dtype bfloat16|float16`
    runs everything in that dtype. On CUDA, auto is bfloat16 (float16 without bf16 support).
    Training keeps the standard kernel (it has a backward) and one dtype for every part.
    """
    from runtime.nn.kernels import native_bf16_cpu, resolve_kernel

    if dtype and dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    if device.type == "cuda" and not dtype:
        dt = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    elif dtype:
        dt = DTYPES[dtype]
    elif training:
        dt = torch.bfloat16 if native_bf16_cpu() else torch.float32
    else:
        dt = torch.float32
    approximate = device.type == "cpu" and not dtype and not training
    if training and nf4_kernel == "auto":
        nf4_kernel = "standard"
    return Precision(dt, approximate, resolve_kernel(nf4_kernel, device, exact_fp32=dtype == "float32"))


@dataclass
class LoadedBase:
    model: DecoderModel
    tokenizer: object
    config: ModelConfig
    model_dir: str
    quant: QuantConfig
    device: torch.device
    dtype: torch.dtype

    def describe(self) -> dict:
        return {"model": self.config.name, "quantize": self.quant.method,
                "dtype": str(self.dtype).removeprefix("torch."), "device": str(self.device)}

    def kernel_line(self) -> str:
        """What computes what, for the start-up line and `quiver info`."""
        kernels = ", ".join(f"{n} x{c}" for n, c in sorted(self.model.kernels.items())) or "none"
        decode = "C++ layers" if self.model.native is not None else "Python modules"
        slots = ""
        if self.model.num_slots:  # once a registry has allocated them (--adapter-dtype)
            slots = f"; LoRA slots {str(self.model.lora_weight_dtype).removeprefix('torch.')}"
        return (f"projections: {kernels}; activations {str(self.dtype).removeprefix('torch.')}; "
                f"lm_head {self.model.head_kernel}; decode steps: {decode}{slots}")


def load_base(model: str | None = None, quantize: str = "nf4", dtype: str | None = None,
              device: str = "auto", nf4_kernel: str = "auto", training: bool = False) -> LoadedBase:
    """Load the base model (the embedded default when `model` is None) ready to serve
    (or, `training=True`, ready to train through: one dtype, a kernel with a backward)."""
    dev = resolve_device(device)
    prec = resolve_precision(dtype, dev, nf4_kernel, training)
    dt = prec.dtype
    quant = QuantConfig(method=quantize)
    model_dir = resolve_model_dir(model)
    tokenizer = load_tokenizer(model_dir)
    # Stop on the tokenizer's end-of-sequence token too: it is what the trainer (and HF SFT
    # recipes) append to every completion, and bases whose config.json names another id exist.
    cfg = load_model_config(model_dir).with_stop_ids(tokenizer.eos_token_id)
    weights = {k: v.to(dev) for k, v in load_state_dict(model_dir).items()}
    decoder = DecoderModel(cfg, weights, quant, dt).to(dev).eval()
    decoder.use_kernels(prec.nf4_kernel, prec.approximate_head)
    loaded = LoadedBase(decoder, tokenizer, cfg, str(model_dir), quant, dev, dt)
    log.info("loaded %s (%s, %s; %s)", cfg.name or model_dir, quant.method, dev, loaded.kernel_line())
    return loaded
