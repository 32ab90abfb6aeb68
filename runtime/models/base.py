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


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    """bfloat16 where the hardware computes it natively, else float32."""
    if dtype:
        if dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
        return DTYPES[dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    native_bf16 = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return torch.bfloat16 if native_bf16 else torch.float32


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


def load_base(model: str | None = None, quantize: str = "nf4", dtype: str | None = None,
              device: str = "auto") -> LoadedBase:
    """Load the base model (the embedded default when `model` is None) ready to serve."""
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    quant = QuantConfig(method=quantize)
    model_dir = resolve_model_dir(model)
    tokenizer = load_tokenizer(model_dir)
    # Stop on the tokenizer's end-of-sequence token too: it is what the trainer (and HF SFT
    # recipes) append to every completion, and bases whose config.json names another id exist.
    cfg = load_model_config(model_dir).with_stop_ids(tokenizer.eos_token_id)
    weights = {k: v.to(dev) for k, v in load_state_dict(model_dir).items()}
    decoder = DecoderModel(cfg, weights, quant, dt).to(dev).eval()
    log.info("loaded %s (%s, %s, %s)", cfg.name or model_dir, quant.method, dt, dev)
    return LoadedBase(decoder, tokenizer, cfg, str(model_dir), quant, dev, dt)
