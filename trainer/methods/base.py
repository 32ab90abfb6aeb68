"""What every training method provides to the loop (trainer/loop.py).

A method owns the trainable parameters of one adapter and knows how its adapter enters the
frozen decoder: through the projections' LoRA slot 0 (LoRA, DoRA, AdaLoRA), as virtual-token
embeddings in front of every row (prompt tuning, p-tuning), or as per-layer KV in front of
every row's attention (prefix tuning). It also knows how to write itself in PEFT's format.
The loop only ever calls the methods below.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from runtime.nn.model import DecoderModel
from trainer.batch import PackedBatch
from trainer.config import TrainConfig

#: PEFT's on-disk key prefix for tensors of the wrapped model (`base_model.model.` + HF module path).
KEY_PREFIX = "base_model.model."
#: PEFT's `task_type` for decoder LMs: prompt-learning adapters without it do nothing in PEFT.
TASK_TYPE = "CAUSAL_LM"


class AdapterMethod(nn.Module):
    """One trainable adapter attached to a frozen DecoderModel."""

    peft_type: str = ""

    def __init__(self, cfg: TrainConfig, model: DecoderModel):
        super().__init__()
        self.cfg = cfg
        self.model_cfg = model.cfg
        self.model_name = model.cfg.name  # the base directory (saved as base_model_name_or_path)

    # ---- training ---------------------------------------------------------------------------
    def forward(self, model: DecoderModel, batch: PackedBatch) -> torch.Tensor:
        """Logits [n, vocab] at the batch's loss rows, with the adapter applied."""
        return exact_logits(model, self.hidden(model, batch))

    def hidden(self, model: DecoderModel, batch: PackedBatch) -> torch.Tensor:
        """Final (normed) hidden states [n, hidden] at the batch's loss rows, with the adapter
        applied: what the lm_head turns into logits. The loop takes its loss from these, through
        the lm_head a vocabulary slice at a time (trainer/loss.py)."""
        raise NotImplementedError

    def adapter_params(self) -> list[nn.Parameter]:
        """The parameters the optimizer trains, collected from the method's own modules."""
        params, seen = [], set()
        for module in self.modules():
            if isinstance(module, ParamModule):
                params += [p for p in module.adapter_params() if id(p) not in seen]
                seen.update(id(p) for p in params)
        return params

    def regularization(self) -> torch.Tensor | None:
        """An extra loss term per optimizer step (AdaLoRA's orthogonality penalty), or None."""
        return None

    def after_optimizer_step(self, step: int) -> None:
        """Called after optimizer step `step` (1-based), before the gradients are cleared."""

    def summary_facts(self) -> dict[str, str]:
        """Method-specific lines for the adapter's README (AdaLoRA: the ranks it kept)."""
        return {}

    def attach(self, model: DecoderModel) -> None:
        """Make the model's forward see this adapter (LoRA family: the method's own slots in
        place of the serving ones). Idempotent; prompt and prefix methods change nothing."""

    def detach(self, model: DecoderModel) -> None:
        """Undo `attach` (the trainer's `cleanup`, and the end of every in-server slice)."""

    # ---- checkpoints -----------------------------------------------------------------------
    def extra_state(self) -> dict[str, Any]:
        """State beyond parameters that a resumed run needs (AdaLoRA's importance EMAs)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    # ---- export -----------------------------------------------------------------------------
    def peft_config(self) -> dict[str, Any]:
        raise NotImplementedError

    @torch.no_grad()
    def peft_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors under PEFT's on-disk keys, float32 on the host."""
        raise NotImplementedError

    def _common_config(self) -> dict[str, Any]:
        return {"peft_type": self.peft_type, "task_type": TASK_TYPE, "inference_mode": True,
                "base_model_name_or_path": self.model_name, "revision": None}


class ParamModule(nn.Module):
    """A module whose trainable parameters are all of its own parameters."""

    def adapter_params(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]


def exact_logits(model: DecoderModel, hidden: torch.Tensor) -> torch.Tensor:
    """Logits [n, vocab] from the final hidden states [n, hidden] through the exact lm_head weight.

    The serving model may run its lm_head on an approximate copy (bf16 / int8, runtime/nn/
    lm_head.py), which has no gradient; training takes the loss on the exact product, which is
    what the head of a model loaded for training computes anyway.
    """
    return torch.nn.functional.linear(hidden, model.lm_head_weight)
