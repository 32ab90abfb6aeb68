"""Training methods, one module each: lora (LoRA, DoRA), adalora, prompt, ptuning, prefix.

`build_method` attaches the chosen method's trainable adapter to a frozen DecoderModel.
"""
from __future__ import annotations

from runtime.nn.model import DecoderModel
from trainer.config import TrainConfig
from trainer.methods.adalora import AdaLoraMethod
from trainer.methods.base import AdapterMethod
from trainer.methods.lora import DoraMethod, LoraMethod
from trainer.methods.prefix import PrefixTuningMethod
from trainer.methods.prompt import PromptTuningMethod
from trainer.methods.ptuning import PTuningMethod

__all__ = ["AdapterMethod", "build_method"]


def build_method(cfg: TrainConfig, model: DecoderModel, tokenizer, total_steps: int,
                 pause=None) -> AdapterMethod:
    """The method of `cfg.method`, attached to `model` (parameters drawn from torch's global RNG).

    `pause()`: called between the projections a LoRA-family method builds (the trainer's pause
    point: a job in the server builds its ~200 deltas in pieces between serving steps, not in
    one 0.1-0.7 s stall of every stream). The other methods build a module or two."""
    if cfg.method == "lora":
        return LoraMethod(cfg, model, pause)
    if cfg.method == "dora":
        return DoraMethod(cfg, model, pause)
    if cfg.method == "adalora":
        return AdaLoraMethod(cfg, model, total_steps, pause)
    if cfg.method == "prompt":
        return PromptTuningMethod(cfg, model, tokenizer)
    if cfg.method == "ptuning":
        return PTuningMethod(cfg, model)
    return PrefixTuningMethod(cfg, model)
