"""`quiver train`: adapters trained on the NF4 base with the runtime's own layers, saved in PEFT format.

Python API (what the server can call):

    from trainer import TrainConfig, train
    out_dir = train(TrainConfig(method="lora", data="facts.jsonl", output="adapters/facts"))

`Trainer` (trainer/loop.py) exposes the four verbs (setup, train, save_checkpoint, cleanup) for
callers that need more control, e.g. to train on an already loaded base.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from trainer.config import TrainConfig, TrainConfigError

if TYPE_CHECKING:
    from runtime.models.base import LoadedBase

__all__ = ["TrainConfig", "TrainConfigError", "train"]


def train(config: TrainConfig, base: "LoadedBase | None" = None) -> Path:
    """Train one adapter as `config` says and return the PEFT adapter directory it wrote.

    `base`: a loaded base model to reuse (detached again afterwards); by default the trainer
    loads `config.model` itself.
    """
    from trainer.loop import Trainer  # torch and the runtime load only when training

    trainer = Trainer(config, base)
    try:
        trainer.setup()
        return trainer.train()
    finally:
        trainer.cleanup()
