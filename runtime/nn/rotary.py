"""Rotary position embeddings, with the scaling types HF config.json files carry.

Frequencies are fixed at load time for every supported type (default, linear, llama3, yarn), so
the table is computed once and a position's cos/sin is a lookup. Keys are stored in the KV cache
*after* rotation; prefix-tuning keys are stored as they come (PEFT gives them no rotary).
The math follows transformers' `modeling_rope_utils` (the tests compare against it).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from runtime.config import ModelConfig
from runtime.nn.native import rotate_kernel


def _default_inv_freq(theta: float, dim: int) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))  # [dim/2]


def _llama3_inv_freq(inv_freq: torch.Tensor, p: dict) -> torch.Tensor:
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old_ctx = p["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn_inv_freq(cfg: ModelConfig, p: dict) -> tuple[torch.Tensor, float]:
    dim, base, factor = cfg.head_dim, cfg.rope_theta, p["factor"]
    old_ctx = p.get("original_max_position_embeddings") or cfg.max_position_embeddings
    beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def get_mscale(scale: float, mscale: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    if p.get("mscale") and p.get("mscale_all_dim"):
        attention_factor = get_mscale(factor, p["mscale"]) / get_mscale(factor, p["mscale_all_dim"])
    else:
        attention_factor = p.get("attention_factor") or get_mscale(factor)

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(old_ctx / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation = _default_inv_freq(base, dim)
    interpolation = extrapolation / factor
    extrapolation_factor = 1 - ramp
    inv_freq = interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor
    return inv_freq, float(attention_factor)


def rope_frequencies(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """(inv_freq [head_dim/2], attention scaling applied to cos/sin) for the config's rope type."""
    p = cfg.rope_scaling
    kind = p.get("rope_type", "default")
    inv_freq = _default_inv_freq(cfg.rope_theta, cfg.head_dim)
    if kind == "default":
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / p["factor"], 1.0
    if kind == "llama3":
        return _llama3_inv_freq(inv_freq, p), 1.0
    if kind == "yarn":
        return _yarn_inv_freq(cfg, p)
    raise ValueError(f"unsupported rope type {kind!r}")  # ModelConfig already refuses these


#: positions whose cos / sin are tabled at load (more are added when a step reaches them)
TABLE_POSITIONS = 8192


class Rotary(nn.Module):
    """cos/sin lookup by absolute position, and the rotation itself (HF's rotate_half layout)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        inv_freq, self.attention_scaling = rope_frequencies(cfg)
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # [hd/2]
        # cos / sin of every position of the context up to TABLE_POSITIONS (the whole context
        # of many models; 4 MB for SmolLM2's 8192 x 64), grown on demand past it
        self.register_buffer("cos_table", None, persistent=False)  # [P, hd]
        self.register_buffer("sin_table", None, persistent=False)  # [P, hd], first half negated
        self._grow(min(cfg.max_position_embeddings, TABLE_POSITIONS))

    def _grow(self, n: int) -> None:
        positions = torch.arange(n, device=self.inv_freq.device)
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [P, hd/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos_table = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        sin[:, : sin.shape[1] // 2].neg_()
        self.sin_table = sin

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [T] -> cos, sin: [T, 1, hd], once per step for every layer: two lookups
        (the nine ops that compute them cost ~40 us of a ~3 ms batch-1 decode step).

        `sin` has its first half negated: then HF's `x * cos + rotate_half(x) * sin` is
        `x * cos + roll(x, hd/2) * sin` (rotate_half(x) = [-x2, x1], roll(x) = [x2, x1]), which
        `rotate` computes in three ops instead of seven, 60 times a step.
        """
        top = int(positions.max()) + 1 if positions.numel() else 0
        if top > self.cos_table.shape[0]:  # past the context (a direct call may go there)
            self._grow(max(top, 2 * self.cos_table.shape[0]))
        positions = positions.to(self.cos_table.device)
        cos, sin = self.cos_table[positions], self.sin_table[positions]  # [T, hd]
        return cos.to(dtype)[:, None, :], sin.to(dtype)[:, None, :]


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, H, hd], cos/sin: [T, 1, hd] from `Rotary.cos_sin` -> rotated x, same shape.

    On CPU in fp32 without autograd: one C++ pass (csrc/elementwise.cpp, what the C++ decode
    layers run, so both paths give the same bits); else three ATen ops."""
    if x.dtype == torch.float32 and x.device.type == "cpu" and x.stride(-1) == 1 and \
            not (torch.is_grad_enabled() and x.requires_grad):
        kernel = rotate_kernel()
        if kernel is not None:
            return kernel(x, cos, sin)
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin)


def rotate_reference(x: torch.Tensor, positions: torch.Tensor, rotary: Rotary) -> torch.Tensor:
    """HF's formulation, for tests: x * cos + rotate_half(x) * sin with unsigned sin."""
    freqs = positions.float()[:, None] * rotary.inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos() * rotary.attention_scaling, emb.sin() * rotary.attention_scaling
    half = x.shape[-1] // 2
    rotated_half = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :].to(x.dtype) + rotated_half * sin[:, None, :].to(x.dtype)
