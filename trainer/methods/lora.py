"""LoRA and DoRA, trained in slot 0 of the runtime's own LoRA slots.

LoRA (Hu et al. 2021) learns a low-rank update of each frozen projection W [out, in]:

         x ──────────── W (frozen, NF4) ───────────┐
         │                                          + ──> y = W x + s · B (A x)
         └─ dropout ─ A [r, in] ─ B [out, r] ─ · s ─┘

A starts random (kaiming-uniform, as nn.Linear) and B at zero, so training starts exactly at
the base model and the first gradient step moves B. s = alpha / r (alpha / sqrt(r), rsLoRA).

DoRA (Liu et al. 2024) splits the adapted weight into a direction and a learned per-row
magnitude m [out], initialised to the rows' norms ||W||:

    y = (m / ||W + s B A||_row) ⊙ (W x + s B A x)

The norm is treated as a constant in backward (detached), as the paper and PEFT do. In the
runtime's slot form this is the factor f = m / ||W + s B A|| and
`y = W x + (f - 1) ⊙ W x + f ⊙ s B A x` (runtime/nn/lora.py). With --dropout, dropout hits the
low-rank branch's input only (PEFT's DoRA also feeds the dropped input to the (f - 1) W x term
while training); inference has no dropout, so the saved adapter means the same either way.

How slot 0 becomes trainable: each targeted projection's `LoraSlots` tensors A [2, r, in],
Bt [2, r, out] (and DoRA's f [2, out]) are parametrized (torch.nn.utils.parametrize) so that
slot 0 is computed from this module's parameters on every access and slot 1 stays the zero
slot. The served forward then runs unchanged, with autograd flowing into the parameters.

The one-slot `LoraSlots` are the method's own, never the model's serving slots: `attach` points
every projection at them (a projection the adapter does not target at None) and `detach` puts the
model's own back. `quiver train` attaches once for the whole run; a fine-tuning job inside the
server (runtime/training) attaches for each training slice between engine steps, so serving
steps only ever see the serving slots, and no half-trained weight is in any of them.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn
from torch.nn.utils import parametrize

from runtime.adapters.matching import EMBEDDING_NAME, lora_target_names
from trainer.methods.base import KEY_PREFIX
from runtime.adapters.types import AdapterFormatError
from runtime.nn.adapter_batch import AdapterBatch
from runtime.nn.attention import AttentionBatch
from runtime.nn.lora import LoraSlots
from runtime.nn.model import AdaptedLinear, DecoderModel
from trainer.batch import PackedBatch
from trainer.config import TrainConfig, TrainConfigError
from trainer.methods.base import AdapterMethod, ParamModule

SLOT = 0  # the trainable slot; slot 1 (= TRAIN_SLOTS) is the runtime's zero slot
TRAIN_SLOTS = 1


class SlotFromParams(nn.Module):
    """Parametrization of a [S+1, ...] slot tensor: slot 0 is `source()`, the others unchanged."""

    def __init__(self, source: Callable[[], torch.Tensor]):
        super().__init__()
        self.source = source  # a bound method of the owning delta module (not registered here)

    def forward(self, slots: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.source().to(slots.dtype)[None], slots[1:]])


class LoraDelta(ParamModule):
    """Trainable A [r, in], B [out, r] of one projection, initialised as PEFT does."""

    def __init__(self, in_features: int, out_features: int, rank: int, scale: float, device=None):
        super().__init__()
        self.scale = scale
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, device=device))  # [r, in]
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, device=device))  # [out, r]

    def slot_A(self) -> torch.Tensor:
        return self.lora_A

    def slot_B(self) -> torch.Tensor:
        return self.lora_B

    def peft_tensors(self, module: str) -> dict[str, torch.Tensor]:
        key = f"{KEY_PREFIX}{module}"
        return {f"{key}.lora_A.weight": self.lora_A, f"{key}.lora_B.weight": self.lora_B}


class DoraDelta(LoraDelta):
    """LoRA plus DoRA's magnitude m [out] = ||W||_row at init (B = 0)."""

    def __init__(self, in_features: int, out_features: int, rank: int, scale: float,
                 weight: Callable[[], torch.Tensor], device=None):
        super().__init__(in_features, out_features, rank, scale, device)
        self.weight = weight  # () -> dequantized base weight [out, in] (not a parameter)
        with torch.no_grad():
            norm = torch.linalg.norm(weight().float(), dim=1)
        self.lora_magnitude_vector = nn.Parameter(norm)  # [out]

    def slot_factor(self) -> torch.Tensor:
        """f = m / ||W + s B A||_row [out]; the norm carries no gradient (DoRA section 4.3)."""
        with torch.no_grad():
            W = self.weight().float()  # [out, in]
            norm = torch.linalg.norm(W + self.scale * (self.lora_B @ self.lora_A), dim=1)
        return self.lora_magnitude_vector / norm

    def peft_tensors(self, module: str) -> dict[str, torch.Tensor]:
        return {**super().peft_tensors(module),
                f"{KEY_PREFIX}{module}.lora_magnitude_vector": self.lora_magnitude_vector}


class LoraFamilyMethod(AdapterMethod):
    """Shared by LoRA, DoRA and AdaLoRA: one delta module per targeted projection in slot 0."""

    use_dora = False

    def __init__(self, cfg: TrainConfig, model: DecoderModel, pause: Callable[[], None] | None = None):
        """`pause()` runs before each projection's delta is built (build_method)."""
        super().__init__(cfg, model)
        self.names = resolve_targets(cfg, model)  # full HF module names, model order
        linears = model.adapted_linears()
        dev = self.device = model.model.norm.weight.device
        # per projection: the method's own one-slot tensors (+ the zero slot), not registered as
        # submodules, so the method's state_dict holds the trainable parameters only; its delta
        # (initial weights drawn from torch's RNG in model order), bound to the slots
        self._slots: dict[str, LoraSlots] = {}
        deltas = []
        for name in self.names:
            if pause is not None:
                pause()
            lin = linears[name]
            slots = LoraSlots(lin.base.in_features, lin.base.out_features, TRAIN_SLOTS, self.slot_rank,
                              model.dtype, dev)
            delta = self.make_delta(name, lin)
            self._bind(slots, delta)
            self._slots[name] = slots
            deltas.append(delta)
        self._saved_slots: dict[str, LoraSlots | None] | None = None
        self.deltas = nn.ModuleList(deltas)

    # ---- per-method hooks -------------------------------------------------------------------
    @property
    def slot_rank(self) -> int:
        return self.cfg.rank

    def module_scale(self) -> float:
        r, alpha = self.cfg.rank, self.cfg.alpha
        return alpha / math.sqrt(r) if self.cfg.rslora else alpha / r

    def make_delta(self, name: str, lin: AdaptedLinear) -> nn.Module:
        return LoraDelta(lin.base.in_features, lin.base.out_features, self.cfg.rank, self.module_scale(),
                         self.device)

    # ---- wiring into the runtime's slots ----------------------------------------------------
    def _bind(self, lora: LoraSlots, delta: nn.Module) -> None:
        lora.bind_slot(SLOT, self.slot_rank, delta.scale)
        parametrize.register_parametrization(lora, "A", SlotFromParams(delta.slot_A))
        parametrize.register_parametrization(lora, "Bt", SlotFromParams(lambda: delta.slot_B().T))
        if self.use_dora:
            parametrize.register_parametrization(lora, "dora", SlotFromParams(delta.slot_factor))
        if self.cfg.dropout > 0:
            lora.dropout = nn.Dropout(self.cfg.dropout)

    def attach(self, model: DecoderModel) -> None:
        if self._saved_slots is not None:
            return
        # untargeted projections get None (a serving slot 0 must not apply)
        self._saved_slots = {n: lin.swap_lora(self._slots.get(n)) for n, lin in model.adapted_linears().items()}

    def detach(self, model: DecoderModel) -> None:
        if self._saved_slots is None:
            return
        for name, lin in model.adapted_linears().items():
            lin.swap_lora(self._saved_slots[name])
        self._saved_slots = None

    def hidden(self, model: DecoderModel, batch: PackedBatch) -> torch.Tensor:
        rows = len(batch.row_lens)
        attn = AttentionBatch.without_cache(batch.row_lens)
        ab = AdapterBatch.build([SLOT] * rows, batch.row_lens, TRAIN_SLOTS, lora_slots={SLOT},
                                dora_slots={SLOT} if self.use_dora else frozenset(),
                                device=batch.tokens.device)
        return model(batch.tokens, batch.positions(), attn, ab, logits_rows=batch.loss_rows, return_hidden=True)

    # ---- export -----------------------------------------------------------------------------
    @torch.no_grad()
    def peft_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, delta in zip(self.names, self.deltas):
            out.update(delta.peft_tensors(name))
        return {k: v.detach().float().cpu() for k, v in out.items()}

    def _lora_config_fields(self) -> dict[str, Any]:
        return {"target_modules": peft_target_modules(self.cfg), "lora_alpha": _number(self.cfg.alpha),
                "lora_dropout": self.cfg.dropout, "bias": "none", "fan_in_fan_out": False,
                "modules_to_save": None, "init_lora_weights": True, "layers_to_transform": None,
                "layers_pattern": None, "exclude_modules": None, "alpha_pattern": {}}


class LoraMethod(LoraFamilyMethod):
    peft_type = "LORA"

    def peft_config(self) -> dict[str, Any]:
        return {**self._common_config(), **self._lora_config_fields(), "r": self.cfg.rank,
                "use_rslora": self.cfg.rslora, "use_dora": self.use_dora, "lora_bias": False,
                "rank_pattern": {}}


class DoraMethod(LoraMethod):
    use_dora = True

    def make_delta(self, name: str, lin: AdaptedLinear) -> nn.Module:
        return DoraDelta(lin.base.in_features, lin.base.out_features, self.cfg.rank,
                         self.module_scale(), lin.base.dequantized_weight, self.device)


def resolve_targets(cfg: TrainConfig, model: DecoderModel) -> list[str]:
    """--targets -> full module names, by PEFT's own matching rules (runtime/adapters/matching)."""
    try:
        names = lora_target_names({"target_modules": cfg.target_modules, "peft_type": "LORA"}, model.cfg)
    except AdapterFormatError as e:
        raise TrainConfigError(f"--targets {cfg.targets!r}: {e}") from None
    if EMBEDDING_NAME in names:
        raise TrainConfigError("--targets: quiver train adapts the decoder projections only, not embed_tokens")
    return names


def peft_target_modules(cfg: TrainConfig) -> str | list[str]:
    """`target_modules` as saved: all-linear expanded to leaf names, as PEFT itself saves it."""
    spec = cfg.target_modules
    if isinstance(spec, str) and spec.lower() == "all-linear":
        return ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    return spec


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value

