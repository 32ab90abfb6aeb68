"""Tiny random HF models and adapters made by PEFT itself: the oracle for adapter tests.

    base = make_tiny_model("llama", seed=0)                    # fp32, eval mode, seconds to build
    path = make_peft_adapter(base, "lora", tmp_path, target_modules="all-linear", use_dora=True)
    adapter = read_adapter(path, model_config(base))

    peft_model = make_peft_model(base, "prefix_tuning", num_virtual_tokens=3)  # base is not touched
    path = save_peft_model(peft_model, tmp_path / "prefix")

Adapter weights are perturbed after PEFT's init (PEFT starts LoRA's B and DoRA's effect at zero,
which would hide mistakes); AdaLoRA is trained a few steps with `update_and_allocate` so that its
ranks are really pruned.
"""
from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
from peft import (
    AdaLoraConfig,
    LoraConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    get_peft_model,
)
from peft.tuners.lora import LoraLayer
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from runtime.config import ModelConfig

#: GQA everywhere (4 query heads, 2 KV heads), two layers, a 128-token vocabulary.
TINY_SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=256,
)
ARCHS = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
}
PEFT_CONFIGS = {
    "lora": LoraConfig,
    "adalora": AdaLoraConfig,
    "prompt_tuning": PromptTuningConfig,
    "p_tuning": PromptEncoderConfig,
    "prefix_tuning": PrefixTuningConfig,
}
#: Small defaults per kind; any PEFT config field passed to make_peft_model overrides them.
KIND_DEFAULTS: dict[str, dict[str, Any]] = {
    "lora": dict(r=4, lora_alpha=8),
    "adalora": dict(init_r=4, target_r=2, total_step=8, tinit=1, tfinal=1, deltaT=1, lora_alpha=8),
    "prompt_tuning": dict(num_virtual_tokens=4),
    "p_tuning": dict(num_virtual_tokens=4, encoder_hidden_size=32),
    "prefix_tuning": dict(num_virtual_tokens=4),
}


def make_tiny_model(arch: str = "llama", seed: int = 0, **overrides: Any) -> PreTrainedModel:
    """A randomly initialised `*ForCausalLM` (fp32, eval mode); overrides go to the HF config."""
    config_cls, model_cls = ARCHS[arch]
    torch.manual_seed(seed)
    config = config_cls(**{**TINY_SHAPE, **overrides})
    return model_cls(config).eval()


def model_config(hf_model: PreTrainedModel) -> ModelConfig:
    """Quiver's view of an HF model's shape."""
    return ModelConfig.from_hf_dict(hf_model.config.to_dict(), name=f"tiny-{hf_model.config.model_type}")


def make_peft_model(
    base: PreTrainedModel,
    kind: str,
    *,
    seed: int = 0,
    perturb: bool = True,
    perturb_scale: float = 0.1,
    train_steps: int = 8,
    prune_to_zero: Sequence[str] = (),
    **options: Any,
) -> PeftModel:
    """Wrap a deep copy of `base` with a fresh adapter of this kind; `base` stays unchanged.

    kind: lora | adalora | prompt_tuning | p_tuning | prefix_tuning. options: PEFT config fields.
    perturb: replace PEFT's initial adapter weights by N(0, perturb_scale) draws (so B != 0 and
    DoRA acts; use a small scale on a real model so its outputs stay meaningful).
    train_steps / prune_to_zero: AdaLoRA only: SGD steps with `update_and_allocate` (ranks get
    pruned), then force these module names (e.g. "model.layers.0.self_attn.v_proj") to rank 0.
    """
    config = PEFT_CONFIGS[kind](task_type="CAUSAL_LM", **{**KIND_DEFAULTS[kind], **options})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(copy.deepcopy(base), config)
    if perturb:
        _perturb(peft_model, seed, perturb_scale)
    if kind == "adalora":
        _train_adalora(peft_model, train_steps, seed)
        _prune_to_zero(peft_model, prune_to_zero)
    return peft_model.eval()


def save_peft_model(peft_model: PeftModel, path: Path, **save_kwargs: Any) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model.save_pretrained(str(path), **save_kwargs)
    return Path(path)


def make_peft_adapter(base: PreTrainedModel, kind: str, tmp_path: Path, **options: Any) -> Path:
    """make_peft_model + save_pretrained into `tmp_path / kind`; returns the adapter directory."""
    return save_peft_model(make_peft_model(base, kind, **options), Path(tmp_path) / kind)


def load_peft_model(base: PreTrainedModel, path: Path) -> PeftModel:
    """PEFT's own loader on a deep copy of `base` (what a PEFT user would serve)."""
    return PeftModel.from_pretrained(copy.deepcopy(base), str(path)).eval()


def peft_lora_layers(peft_model: PeftModel) -> dict[str, LoraLayer]:
    """Full HF module name (`model.layers.0.self_attn.q_proj`) -> the LoRA / AdaLoRA layer PEFT made."""
    prefix = "base_model.model."
    return {
        name.removeprefix(prefix): module
        for name, module in peft_model.named_modules()
        if isinstance(module, LoraLayer)
    }


def make_tiny_tokenizer(path: Path, vocab_size: int = 128) -> Path:
    """A word-level tokenizer over words w0..w{n}, saved as an HF tokenizer directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, vocab_size)}}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]").save_pretrained(str(path))
    return Path(path)


def _perturb(peft_model: PeftModel, seed: int, scale: float = 0.1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(peft_model.named_parameters()):
            if not param.requires_grad:
                continue
            noise = torch.randn(param.shape, generator=generator) * scale
            if "lora_magnitude_vector" in name:
                param.mul_(1 + noise)  # DoRA magnitudes are row norms: keep them near their init
            else:
                param.copy_(noise)


def _train_adalora(peft_model: PeftModel, steps: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    vocab = peft_model.config.vocab_size
    optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.1)
    peft_model.train()
    # One thread: on a busy 2-core machine, multi-threaded backward on these tiny tensors spins
    # (measured 30 s vs 0.5 s for 8 steps).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for step in range(steps):
            ids = torch.randint(0, vocab, (2, 8), generator=generator)
            peft_model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            peft_model.base_model.update_and_allocate(step)
            optimizer.zero_grad()
    finally:
        torch.set_num_threads(threads)


def _prune_to_zero(peft_model: PeftModel, names: Sequence[str]) -> None:
    """Set these modules' AdaLoRA rank_pattern to all-False (save_pretrained keeps no rank)."""
    config = peft_model.peft_config["default"]
    layers = peft_lora_layers(peft_model)
    pattern = dict(config.rank_pattern or {})
    for name in names:
        # in memory the keys carry the adapter name (`<module>.lora_E.default`); saving drops it
        key = next((k for k in pattern if k.startswith(f"{name}.lora_E")), f"{name}.lora_E.default")
        pattern[key] = [False] * config.init_r
        with torch.no_grad():
            layers[name].lora_E["default"].zero_()
    config.rank_pattern = pattern
