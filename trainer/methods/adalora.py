"""AdaLoRA (Zhang et al. 2023): LoRA in SVD form whose rank budget moves to where it matters.

Each targeted projection learns `delta W = Q diag(Lambda) P` with P [r, in] (PEFT's `lora_A`),
Lambda [r, 1] (`lora_E`), Q [out, r] (`lora_B`), r = init_r, and
`y = W x + s Q (Lambda ⊙ P) x` with s = alpha / (init_r + 1e-5) (fixed: pruning zeroes Lambda
entries, it does not change s). In the runtime's slot form that is A = P ⊙ Lambda, B = Q.

Three parts make it AdaLoRA rather than LoRA (all as in PEFT 0.21's AdaLoraModel/RankAllocator):

1. Orthogonality regulariser, so P and Q stay near-orthogonal and Lambda acts as singular values:
   `R = mean over P and Q of ||P P^T - I||_F (resp. ||Q^T Q - I||_F)`, added as orth_reg_weight * R.
2. Importance of each triplet (P row i, Lambda_i, Q column i): per parameter entry the
   sensitivity I = |w * grad w|, smoothed  I_bar = beta1 I_bar + (1 - beta1) I, and its
   uncertainty U_bar = beta2 U_bar + (1 - beta2) |I - I_bar|; score = I_bar * U_bar, summed
   as score(Lambda_i) + mean_j score(P_ij) + mean_j score(Q_ji).
3. A cubic budget: total rank b(t) = init_bgt for t <= tinit, then
   b(t) = target_bgt + (init_bgt - target_bgt) (1 - (t - tinit) / (T - tfinal - tinit))^3,
   and target_bgt for the last tfinal steps (init_bgt = init_r * modules, target_bgt =
   target_r * modules). Every delta_t steps the lowest-scoring triplets over all modules are
   masked (Lambda_i = 0) down to b(t); at step T - tfinal the mask is final and re-applied
   after every later step.

Steps count from 1 (the number of optimizer steps done), so the final allocation at
T - tfinal always happens, even with tfinal = 0. The saved adapter keeps only the unmasked
triplets, and `rank_pattern` (`<module>.lora_E` -> init_r booleans) records which.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from runtime.adapters.matching import ADALORA_EPS
from trainer.methods.base import KEY_PREFIX
from runtime.nn.model import AdaptedLinear, DecoderModel
from trainer.config import TrainConfig, TrainConfigError
from trainer.methods.base import ParamModule
from trainer.methods.lora import LoraFamilyMethod

TRIPLET = ("lora_A", "lora_E", "lora_B")


class SvdDelta(ParamModule):
    """P [r, in], Lambda [r, 1], Q [out, r] of one projection (PEFT init: Lambda = 0, P, Q ~ N(0, 0.02))."""

    def __init__(self, in_features: int, out_features: int, rank: int, scale: float, device=None):
        super().__init__()
        self.scale = scale
        self.lora_A = nn.Parameter(torch.randn(rank, in_features, device=device) * 0.02)  # P
        self.lora_E = nn.Parameter(torch.zeros(rank, 1, device=device))  # Lambda
        self.lora_B = nn.Parameter(torch.randn(out_features, rank, device=device) * 0.02)  # Q

    def slot_A(self) -> torch.Tensor:
        return self.lora_A * self.lora_E  # [r, in]

    def slot_B(self) -> torch.Tensor:
        return self.lora_B

    def orthogonality(self) -> torch.Tensor:
        """||P P^T - I||_F + ||Q^T Q - I||_F."""
        eye = torch.eye(self.lora_E.shape[0], device=self.lora_E.device)
        return (torch.linalg.norm(self.lora_A @ self.lora_A.T - eye)
                + torch.linalg.norm(self.lora_B.T @ self.lora_B - eye))

    def peft_tensors(self, module: str, keep: list[bool] | None) -> dict[str, torch.Tensor]:
        idx = torch.tensor(keep if keep is not None else [True] * self.lora_E.shape[0])
        key = f"{KEY_PREFIX}{module}"
        return {f"{key}.lora_A": self.lora_A[idx], f"{key}.lora_E": self.lora_E[idx],
                f"{key}.lora_B": self.lora_B[:, idx]}


class RankAllocator:
    """Importance scores and the budget schedule (see the module docstring); PEFT's RankAllocator."""

    def __init__(self, names: list[str], deltas: list[SvdDelta], cfg: TrainConfig, total_steps: int):
        self.deltas = dict(zip(names, deltas))
        self.cfg, self.total = cfg, total_steps
        self.init_bgt = cfg.init_r * len(names)
        self.target_bgt = cfg.target_r * len(names)
        self.ipt: dict[str, torch.Tensor] = {}  # smoothed sensitivity, per parameter "module.lora_X"
        self.unc: dict[str, torch.Tensor] = {}  # smoothed uncertainty
        self.rank_pattern: dict[str, list[bool]] | None = None  # module -> kept triplets

    def budget(self, step: int) -> tuple[int, bool]:
        """(total rank budget, whether to re-mask) after optimizer step `step`."""
        c = self.cfg
        if step <= c.tinit:
            return self.init_bgt, False
        if step > self.total - c.tfinal:
            return self.target_bgt, True
        progress = 1 - (step - c.tinit) / (self.total - c.tfinal - c.tinit)
        budget = int((self.init_bgt - self.target_bgt) * progress ** 3 + self.target_bgt)
        return budget, step % c.delta_t == 0

    def update_and_allocate(self, step: int) -> None:
        """After optimizer step `step` (1-based), before the gradients are cleared."""
        final = self.total - self.cfg.tfinal
        if step < final:
            self._update_importance()
            budget, mask_now = self.budget(step)
            if mask_now:
                self._mask_to_budget(budget)
        elif step == final:
            self._mask_to_budget(self.target_bgt)
            self.ipt, self.unc = {}, {}
        elif self.rank_pattern is not None:
            self._apply_pattern()

    @torch.no_grad()
    def _update_importance(self) -> None:
        b1, b2 = self.cfg.beta1, self.cfg.beta2
        for name, delta in self.deltas.items():
            for leaf in TRIPLET:
                p = getattr(delta, leaf)
                key = f"{name}.{leaf}"
                grad = p.grad if p.grad is not None else torch.zeros_like(p)
                sensitivity = (p * grad).abs()
                ipt = self.ipt.get(key, torch.zeros_like(p))
                unc = self.unc.get(key, torch.zeros_like(p))
                self.ipt[key] = b1 * ipt + (1 - b1) * sensitivity
                self.unc[key] = b2 * unc + (1 - b2) * (sensitivity - self.ipt[key]).abs()

    def _triplet_scores(self) -> dict[str, torch.Tensor]:
        """Module -> [r] score of each (P row, Lambda, Q column) triplet."""
        scores = {}
        for name in self.deltas:
            s = {leaf: self._score(f"{name}.{leaf}") for leaf in TRIPLET}
            scores[name] = s["lora_E"].view(-1) + s["lora_A"].mean(dim=1) + s["lora_B"].mean(dim=0)
        return scores

    def _score(self, key: str) -> torch.Tensor:
        if key not in self.ipt:  # no importance yet (a mask right after tinit): all equal
            return torch.zeros_like(getattr(self.deltas[key.rsplit(".", 1)[0]], key.rsplit(".", 1)[1]))
        return self.ipt[key] * self.unc[key]

    @torch.no_grad()
    def _mask_to_budget(self, budget: int) -> None:
        scores = self._triplet_scores()
        k = self.init_bgt - budget
        if k <= 0:
            self.rank_pattern = {name: [True] * len(s) for name, s in scores.items()}
        else:
            threshold = torch.kthvalue(torch.cat(list(scores.values())), k).values.item()
            self.rank_pattern = {name: (s > threshold).tolist() for name, s in scores.items()}
        self._apply_pattern()

    @torch.no_grad()
    def _apply_pattern(self) -> None:
        for name, keep in self.rank_pattern.items():
            E = self.deltas[name].lora_E
            E.masked_fill_(~torch.tensor(keep, device=E.device)[:, None], 0.0)

    def state_dict(self) -> dict[str, Any]:
        return {"ipt": self.ipt, "unc": self.unc, "rank_pattern": self.rank_pattern}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        dev = next(iter(self.deltas.values())).lora_E.device
        self.ipt = {k: v.to(dev) for k, v in state["ipt"].items()}
        self.unc = {k: v.to(dev) for k, v in state["unc"].items()}
        self.rank_pattern = state["rank_pattern"]


class AdaLoraMethod(LoraFamilyMethod):
    peft_type = "ADALORA"

    def __init__(self, cfg: TrainConfig, model: DecoderModel, total_steps: int, pause=None):
        if cfg.tinit >= total_steps - cfg.tfinal:
            raise TrainConfigError(
                f"AdaLoRA needs a pruning phase: --tinit ({cfg.tinit}) must be below the total steps "
                f"({total_steps}) minus --tfinal ({cfg.tfinal})")
        super().__init__(cfg, model, pause)
        self.total_steps = total_steps
        self.allocator = RankAllocator(self.names, list(self.deltas), cfg, total_steps)

    @property
    def slot_rank(self) -> int:
        return self.cfg.init_r

    def module_scale(self) -> float:
        return self.cfg.alpha / (self.cfg.init_r + ADALORA_EPS)

    def make_delta(self, name: str, lin: AdaptedLinear) -> nn.Module:
        return SvdDelta(lin.base.in_features, lin.base.out_features, self.cfg.init_r,
                        self.module_scale(), self.device)

    def regularization(self) -> torch.Tensor | None:
        if self.cfg.orth_reg_weight == 0:
            return None
        penalty = sum(delta.orthogonality() for delta in self.deltas) / (2 * len(self.deltas))
        return self.cfg.orth_reg_weight * penalty

    def after_optimizer_step(self, step: int) -> None:
        self.allocator.update_and_allocate(step)

    def extra_state(self) -> dict[str, Any]:
        return {"allocator": self.allocator.state_dict()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.allocator.load_state_dict(state["allocator"])

    def ranks(self) -> dict[str, int]:
        """Module -> rank it keeps (init_r before the first allocation)."""
        pattern = self.allocator.rank_pattern or {}
        return {n: sum(pattern[n]) if n in pattern else self.cfg.init_r for n in self.names}

    def summary_facts(self) -> dict[str, str]:
        ranks = self.ranks()
        return {"AdaLoRA rank (total / budget)": f"{sum(ranks.values())} / {self.allocator.target_bgt} "
                f"over {len(ranks)} modules (init {self.allocator.init_bgt})"}

    @torch.no_grad()
    def peft_tensors(self) -> dict[str, torch.Tensor]:
        pattern = self.allocator.rank_pattern or {}
        out = {}
        for name, delta in zip(self.names, self.deltas):
            out.update(delta.peft_tensors(name, pattern.get(name)))
        return {k: v.detach().float().cpu().contiguous() for k, v in out.items()}

    def peft_config(self) -> dict[str, Any]:
        c = self.cfg
        pattern = self.allocator.rank_pattern
        return {**self._common_config(), **self._lora_config_fields(), "init_r": c.init_r,
                "target_r": c.target_r, "tinit": c.tinit, "tfinal": c.tfinal, "deltaT": c.delta_t,
                "beta1": c.beta1, "beta2": c.beta2, "orth_reg_weight": c.orth_reg_weight,
                "total_step": self.total_steps, "use_dora": False, "use_rslora": False,
                "rank_pattern": None if pattern is None else {f"{n}.lora_E": m for n, m in pattern.items()}}
