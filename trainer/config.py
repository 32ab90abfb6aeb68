"""`TrainConfig`: every setting of one `quiver train` run, as plain values.

No torch import: the CLI builds it, checkpoints store it (`asdict`), the README of a trained
adapter prints it, and a resumed run compares it with the one it continues. Defaults follow
PEFT where PEFT has one; fields derived from others are filled in `__post_init__`.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields
from typing import Any

METHODS = ("lora", "dora", "adalora", "prompt", "ptuning", "prefix")
LORA_METHODS = ("lora", "dora", "adalora")
OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw", "paged_adamw8bit")
LR_SCHEDULES = ("constant", "linear", "cosine")
ENCODERS = ("mlp", "lstm")

#: Learning rates that work for each method family when --lr is not given (the usual PEFT
#: recipes: low-rank deltas train at ~1e-4..1e-3, virtual tokens need ~1e-2..3e-2).
DEFAULT_LR = {"lora": 2e-4, "dora": 2e-4, "adalora": 2e-4, "prompt": 3e-2, "ptuning": 1e-2, "prefix": 1e-2}

#: Characters that make a --targets value a regular expression rather than a list of names.
_REGEX_CHARS = re.compile(r"[*+?()\[\]|\\^$]")

#: Fields a resumed run may change without changing the result (where and how often it reports).
RESUME_FREE_FIELDS = ("output", "resume", "save_every", "eval_every", "progress")


class TrainConfigError(ValueError):
    """A training setting that cannot work; the message names the flag."""


@dataclass
class TrainConfig:
    # ---- what to train, on what ----
    method: str  # lora | dora | adalora | prompt | ptuning | prefix
    data: str  # JSONL training file (rows: prompt/completion, messages, or text)
    output: str  # adapter directory to write (PEFT format); checkpoints go to <output>/checkpoints
    model: str | None = None  # local HF directory; None = the embedded SmolLM2-135M-Instruct
    quantize: str = "nf4"  # nf4 | fp4 | none: storage of the frozen base's projections (QLoRA)
    dtype: str | None = None  # compute dtype; None = bfloat16 where native, else float32
    device: str = "auto"
    threads: int | None = None  # torch compute threads; None = the cores torch sees

    # ---- LoRA / DoRA ----
    rank: int = 8  # r
    alpha: float | None = None  # lora_alpha; None = 2 * rank (AdaLoRA: 2 * init_r)
    #: "all-linear", comma-separated module names ("q_proj,v_proj"), or a regex matched with
    #: re.fullmatch against full module names (PEFT's target_modules rules)
    targets: str = "all-linear"
    rslora: bool = False  # scale alpha / sqrt(r) instead of alpha / r
    dropout: float = 0.0  # lora_dropout on the low-rank branch's input

    # ---- AdaLoRA (PEFT AdaLoraConfig names in brackets) ----
    init_r: int = 12  # starting rank of every module
    target_r: int = 8  # average rank after pruning: the budget is target_r * num_modules
    tinit: int = 0  # warm-up steps before pruning starts
    tfinal: int = 0  # final steps at the target budget
    delta_t: int = 1  # [deltaT] steps between budget re-allocations
    orth_reg_weight: float = 0.5
    beta1: float = 0.85  # EMA of the sensitivity
    beta2: float = 0.85  # EMA of the uncertainty

    # ---- prompt tuning / p-tuning / prefix tuning ----
    num_virtual_tokens: int = 20
    prompt_init_text: str | None = None  # prompt tuning: init from this text's embeddings (else random)
    encoder: str = "mlp"  # p-tuning prompt encoder: mlp | lstm
    encoder_hidden_size: int | None = None  # p-tuning / prefix projection; None = model hidden size
    prefix_projection: bool = False  # prefix tuning: train through an MLP, save its output

    # ---- training ----
    epochs: int = 1
    max_steps: int | None = None  # optimizer steps; overrides epochs when set
    lr: float | None = None  # None = DEFAULT_LR[method]
    batch_size: int = 8  # examples per micro-batch (packed rows, no padding)
    grad_accum: int = 1  # micro-batches per optimizer step
    max_seq_len: int = 512  # examples are cut to this many tokens
    eval_data: str | None = None
    eval_every: int = 0  # also evaluate every N steps (0: at the end only)
    seed: int = 0
    save_every: int = 0  # checkpoint every N optimizer steps (0: none)
    resume: str | None = None  # checkpoint directory, or "latest" (newest under <output>/checkpoints)
    gradient_checkpointing: bool = False  # recompute each decoder layer in backward
    #: adamw (torch) | adamw8bit | paged_adamw | paged_adamw8bit (bitsandbytes; paged: CUDA only,
    #: elsewhere the unpaged one with a warning)
    optim: str = "adamw"
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_schedule: str = "linear"  # constant | linear | cosine (after warm-up, to 0 at the last step)
    max_grad_norm: float = 1.0  # 0 disables clipping
    progress: bool = True  # tqdm bar

    def __post_init__(self) -> None:
        _choice("method", self.method, METHODS)
        _choice("optim", self.optim, OPTIMIZERS)
        _choice("lr-schedule", self.lr_schedule, LR_SCHEDULES)
        _choice("encoder", self.encoder, ENCODERS)
        if self.alpha is None:
            self.alpha = float(2 * (self.init_r if self.method == "adalora" else self.rank))
        if self.lr is None:
            self.lr = DEFAULT_LR[self.method]
        for name in ("rank", "init_r", "target_r", "delta_t", "num_virtual_tokens", "epochs",
                     "batch_size", "grad_accum", "max_seq_len"):
            _positive(name, getattr(self, name))
        for name in ("tinit", "tfinal", "save_every", "eval_every", "warmup_steps"):
            if getattr(self, name) < 0:
                raise TrainConfigError(f"--{_flag(name)} must be >= 0, not {getattr(self, name)}")
        if self.max_steps is not None:
            _positive("max_steps", self.max_steps)
        if self.encoder_hidden_size is not None:
            _positive("encoder_hidden_size", self.encoder_hidden_size)
        if not 0.0 <= self.dropout < 1.0:
            raise TrainConfigError(f"--dropout must be in [0, 1), not {self.dropout}")
        if self.target_r > self.init_r:
            raise TrainConfigError(f"--target-r ({self.target_r}) must not exceed --init-r ({self.init_r})")
        if not 0 < self.beta1 < 1 or not 0 < self.beta2 < 1:
            raise TrainConfigError("--beta1 and --beta2 must be in (0, 1)")
        if self.lr <= 0:
            raise TrainConfigError(f"--lr must be positive, not {self.lr}")

    # ---- derived views ---------------------------------------------------------------------
    @property
    def is_lora_family(self) -> bool:
        return self.method in LORA_METHODS

    @property
    def target_modules(self) -> str | list[str]:
        """--targets in PEFT's `target_modules` form: "all-linear", a regex string, or names."""
        spec = self.targets.strip()
        if spec.lower() == "all-linear" or _REGEX_CHARS.search(spec):
            return spec
        names = [name.strip() for name in spec.split(",") if name.strip()]
        if not names:
            raise TrainConfigError("--targets is empty: give all-linear, names or a regex")
        return names

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def resume_mismatches(self, saved: dict[str, Any]) -> list[str]:
        """Fields (other than RESUME_FREE_FIELDS) whose value differs from a checkpoint's config."""
        mine = self.to_dict()
        return [f"{k}: checkpoint {saved.get(k)!r}, now {v!r}" for k, v in mine.items()
                if k not in RESUME_FREE_FIELDS and saved.get(k) != v]


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise TrainConfigError(f"--{_flag(name)} must be one of {', '.join(choices)}, not {value!r}")


def _positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise TrainConfigError(f"--{_flag(name)} must be a positive integer, not {value!r}")
