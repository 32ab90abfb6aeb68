"""`quiver train`: the command line over trainer.TrainConfig (flag names are a contract).

    quiver train --method lora --data facts.jsonl --output adapters/facts --rank 16 --lr 1e-3

Every flag maps to the TrainConfig field of the same name (dashes for underscores).
"""
from __future__ import annotations

import argparse
import sys

from trainer.config import ENCODERS, LR_SCHEDULES, METHODS, OPTIMIZERS, TrainConfig


def add_parser(sub) -> None:
    from runtime.cli import add_model_options

    p = sub.add_parser("train", help="train an adapter (LoRA, DoRA, AdaLoRA, prompt, p-tuning, prefix) "
                                     "on the NF4 base; writes a PEFT-format directory")
    add_model_options(p, serving=False)
    p.add_argument("--method", choices=METHODS, required=True)
    p.add_argument("--data", required=True, metavar="FILE.jsonl",
                   help='rows {"prompt","completion"}, {"messages":[...]} or {"text"}')
    p.add_argument("--output", required=True, metavar="DIR", help="adapter directory to write")
    _lora_options(p.add_argument_group("LoRA / DoRA / AdaLoRA"))
    _adalora_options(p.add_argument_group("AdaLoRA"))
    _prompt_options(p.add_argument_group("prompt tuning / p-tuning / prefix tuning"))
    _training_options(p.add_argument_group("training"))
    p.set_defaults(run=run)


def _lora_options(g) -> None:
    g.add_argument("--rank", type=int, default=8, help="LoRA rank r (default 8)")
    g.add_argument("--alpha", type=float, default=None, help="lora_alpha (default 2 * rank; AdaLoRA 2 * init-r)")
    g.add_argument("--targets", default="all-linear",
                   help="all-linear (default), module names (q_proj,v_proj) or a regex on full names")
    g.add_argument("--rslora", action="store_true", help="scale alpha / sqrt(r)")
    g.add_argument("--dropout", type=float, default=0.0, help="lora_dropout (default 0)")


def _adalora_options(g) -> None:
    g.add_argument("--init-r", type=int, default=12)
    g.add_argument("--target-r", type=int, default=8, help="average rank after pruning")
    g.add_argument("--tinit", type=int, default=0, help="warm-up steps before pruning")
    g.add_argument("--tfinal", type=int, default=0, help="final steps at the target budget")
    g.add_argument("--delta-t", type=int, default=1, help="steps between rank re-allocations")
    g.add_argument("--orth-reg-weight", type=float, default=0.5)
    g.add_argument("--beta1", type=float, default=0.85, help="EMA of the sensitivity")
    g.add_argument("--beta2", type=float, default=0.85, help="EMA of the uncertainty")


def _prompt_options(g) -> None:
    g.add_argument("--num-virtual-tokens", type=int, default=20)
    g.add_argument("--prompt-init-text", default=None, help="prompt tuning: init from this text")
    g.add_argument("--encoder", choices=ENCODERS, default="mlp", help="p-tuning prompt encoder")
    g.add_argument("--encoder-hidden-size", type=int, default=None,
                   help="p-tuning encoder / prefix projection width (default: the model's hidden size)")
    g.add_argument("--prefix-projection", action="store_true", help="prefix tuning through an MLP")


def _training_options(g) -> None:
    g.add_argument("--epochs", type=int, default=1)
    g.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    g.add_argument("--lr", type=float, default=None, help="default: 2e-4 for LoRA-like, 1e-2..3e-2 for prompts")
    g.add_argument("--batch-size", type=int, default=8, help="examples per micro-batch (packed)")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--max-seq-len", type=int, default=512)
    g.add_argument("--eval-data", default=None, metavar="FILE.jsonl")
    g.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (default: at the end)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (default: never)")
    g.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                   help="continue from a checkpoint directory (no value: the newest under --output)")
    g.add_argument("--gradient-checkpointing", action="store_true")
    g.add_argument("--optim", choices=OPTIMIZERS, default="adamw",
                   help="adamw (default), adamw8bit, paged_adamw, paged_adamw8bit (bitsandbytes; paged "
                        "needs CUDA, elsewhere the unpaged one is used with a warning)")
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--warmup-steps", type=int, default=0)
    g.add_argument("--lr-schedule", choices=LR_SCHEDULES, default="linear")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="0 disables clipping")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    fields = TrainConfig.__dataclass_fields__
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in fields})


def run(args: argparse.Namespace) -> int:
    from trainer import train

    config = config_from_args(args)
    out = train(config)
    print(f"quiver train: wrote {config.method} adapter to {out}", file=sys.stderr)
    print(out)
    return 0
