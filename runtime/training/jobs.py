"""A fine-tuning job request -> the TrainConfig it runs, and a job row -> OpenAI's job object.

OpenAI's fields: `model` (the server's base id), `training_file`, `validation_file`,
`hyperparameters` / `method.supervised.hyperparameters` (`n_epochs`, `batch_size`,
`learning_rate_multiplier`, each an integer / number or "auto"), `suffix`, `seed`. Quiver's
extension rides in the same body as `quiver` (the openai client's `extra_body`): `method`
(lora, dora, adalora, prompt, ptuning, prefix) and any other `quiver train` option by its
TrainConfig name (`rank`, `targets`, `num_virtual_tokens`, `save_every`, `optim`, ...), except
what the server decides (where data and output live, the base, its precision and threads).

"auto", chosen so that a few hundred supervised rows learn (tests/data's facts task, measured in
tests/trainer/test_learning_task.py: ~96% held-out exact match): LoRA of rank 16 on every
linear projection, n_epochs 3, batch_size 4, learning rate 3e-3 for the LoRA family (the
trainer's per-method default for prompt / prefix methods); `learning_rate_multiplier` scales
that base rate. Checkpoints: once per epoch unless `quiver.save_every` says otherwise.

The name of the result (`fine_tuned_model`): OpenAI writes `ft:<base>:<org>:<suffix>:<id>`.
Adapter ids allow [A-Za-z0-9._/-] only, so the colons become path separators and the org, which
a single server does not have, goes: `ft/<base>/<suffix>/<job>` (`ft/<base>/<job>` without a
suffix). It is a nested adapter id like any other: a directory of the adapter store, listed
by GET /v1/models, served by its name over HTTP and gRPC.
"""
from __future__ import annotations

import math
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.engine.params import InvalidParams
from trainer.config import LORA_METHODS, METHODS, TrainConfig, TrainConfigError

AUTO = "auto"
AUTO_EPOCHS = 3
AUTO_BATCH_SIZE = 4
AUTO_LORA_LR = 3e-3
AUTO_RANK = 16
#: TrainConfig fields a job may not set through `quiver`: the server decides them, or they are
#: OpenAI hyperparameters with their own names
SERVER_FIELDS = frozenset({"data", "output", "model", "quantize", "dtype", "device", "threads",
                           "resume", "progress", "eval_data", "epochs", "batch_size", "lr", "seed"})
SUFFIX_RE = re.compile(r"[A-Za-z0-9._-]{1,40}")
#: the fields of a job request (anything else is refused, as the chat routes refuse unknown ones)
REQUEST_FIELDS = frozenset({"model", "training_file", "validation_file", "hyperparameters", "method",
                            "suffix", "seed", "integrations", "metadata", "quiver"})


@dataclass(frozen=True)
class JobLimits:
    max_epochs: int = 50
    max_batch_size: int = 256
    max_seq_len: int = 2048
    max_rank: int = 16  # the server's --max-lora-rank: a larger adapter could not be served


@dataclass(frozen=True)
class JobPlan:
    """A validated request: what the job row stores."""

    model: str
    training_file: str
    validation_file: str | None
    hyperparameters: dict[str, Any]  # resolved: numbers, no "auto"
    suffix: str | None
    seed: int
    quiver: dict[str, Any]  # the extension as given (method included)

    def spec(self) -> dict[str, Any]:
        return {"hyperparameters": self.hyperparameters, "suffix": self.suffix, "seed": self.seed,
                "quiver": self.quiver}


def new_job_id() -> str:
    return f"ftjob-{secrets.token_hex(12)}"


def plan_job(body: dict[str, Any], base_id: str, limits: JobLimits) -> JobPlan:
    """Check a POST /v1/fine_tuning/jobs body (files and model are resolved by the caller)."""
    unknown = sorted(set(body) - REQUEST_FIELDS)
    if unknown:
        raise InvalidParams(unknown[0], "is not a field of a fine-tuning job request")
    for name in ("model", "training_file"):
        if not isinstance(body.get(name), str) or not body[name]:
            raise InvalidParams(name, "is required (a string)")
    hyper = _hyperparameters(body)
    quiver = body.get("quiver") or {}
    if not isinstance(quiver, dict):
        raise InvalidParams("quiver", "must be an object of quiver train options")
    method = quiver.get("method", "lora")
    if method not in METHODS:
        raise InvalidParams("quiver.method", f"must be one of {', '.join(METHODS)}, not {method!r}")
    suffix = body.get("suffix")
    if suffix is not None and (not isinstance(suffix, str) or not SUFFIX_RE.fullmatch(suffix)):
        raise InvalidParams("suffix", "must be 1..40 characters of [A-Za-z0-9._-]")
    seed = body.get("seed")
    if seed is None:
        seed = secrets.randbelow(2**31)
    elif isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**31:
        raise InvalidParams("seed", "must be an integer in [0, 2^31)")
    validation = body.get("validation_file")
    if validation is not None and not isinstance(validation, str):
        raise InvalidParams("validation_file", "must be a file id")
    resolved = {
        "n_epochs": _int_or_auto(hyper, "n_epochs", AUTO_EPOCHS, limits.max_epochs),
        "batch_size": _int_or_auto(hyper, "batch_size", AUTO_BATCH_SIZE, limits.max_batch_size),
        "learning_rate_multiplier": _multiplier(hyper),
    }
    return JobPlan(body["model"], body["training_file"], validation, resolved, suffix, seed,
                   {**quiver, "method": method})


def _hyperparameters(body: dict[str, Any]) -> dict[str, Any]:
    """The hyperparameters, from `method.supervised` or the (older) top-level field."""
    method = body.get("method")
    hyper = body.get("hyperparameters")
    if method is not None:
        if not isinstance(method, dict) or method.get("type") != "supervised":
            raise InvalidParams("method.type", "must be \"supervised\" (the only method this server trains)")
        inner = (method.get("supervised") or {}).get("hyperparameters")
        if inner is not None and hyper is not None:
            raise InvalidParams("hyperparameters", "give them in method.supervised.hyperparameters or "
                                                   "at the top level, not both")
        hyper = inner if inner is not None else hyper
    hyper = hyper or {}
    if not isinstance(hyper, dict):
        raise InvalidParams("hyperparameters", "must be an object")
    unknown = sorted(set(hyper) - {"n_epochs", "batch_size", "learning_rate_multiplier"})
    if unknown:
        raise InvalidParams(f"hyperparameters.{unknown[0]}", "is not a supervised hyperparameter "
                            "(n_epochs, batch_size, learning_rate_multiplier)")
    return hyper


def _int_or_auto(hyper: dict, name: str, auto: int, most: int) -> int:
    value = hyper.get(name, AUTO)
    if value == AUTO or value is None:
        return auto
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
        raise InvalidParams(f"hyperparameters.{name}", f"must be \"auto\" or an integer in [1, {most}], "
                                                       f"not {value!r}")
    return value


def _multiplier(hyper: dict) -> float:
    value = hyper.get("learning_rate_multiplier", AUTO)
    if value == AUTO or value is None:
        return 1.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 100:
        raise InvalidParams("hyperparameters.learning_rate_multiplier",
                            f"must be \"auto\" or a number in (0, 100], not {value!r}")
    return float(value)


def train_config(plan: JobPlan, data: Path, eval_data: Path | None, output: Path, rows: int,
                 limits: JobLimits) -> TrainConfig:
    """The TrainConfig of a planned job; InvalidParams names the `quiver` option at fault."""
    options = {k: v for k, v in plan.quiver.items() if k != "method"}
    refused = sorted(set(options) & SERVER_FIELDS)
    if refused:
        raise InvalidParams(f"quiver.{refused[0]}", "is decided by the server or is a hyperparameter "
                                                    "(n_epochs, batch_size, learning_rate_multiplier, seed)")
    known = set(TrainConfig.__dataclass_fields__)
    unknown = sorted(set(options) - known)
    if unknown:
        raise InvalidParams(f"quiver.{unknown[0]}", "is not a quiver train option")
    method = plan.quiver["method"]
    h = plan.hyperparameters
    base_lr = AUTO_LORA_LR if method in LORA_METHODS else TrainConfig(method=method, data="", output="").lr
    values = {"rank": min(AUTO_RANK, limits.max_rank)} if method in LORA_METHODS else {}
    values.update(options)
    steps_per_epoch = max(1, math.ceil(rows / (h["batch_size"] * values.get("grad_accum", 1))))
    values.setdefault("save_every", steps_per_epoch)
    try:
        cfg = TrainConfig(method=method, data=str(data), output=str(output),
                          eval_data=str(eval_data) if eval_data else None, epochs=h["n_epochs"],
                          batch_size=h["batch_size"], lr=base_lr * h["learning_rate_multiplier"],
                          seed=plan.seed, progress=False, **values)
    except TrainConfigError as e:
        raise InvalidParams("quiver", str(e).replace("--", "")) from None
    except TypeError as e:
        raise InvalidParams("quiver", f"an option has the wrong type: {e}") from None
    if cfg.max_seq_len > limits.max_seq_len:
        raise InvalidParams("quiver.max_seq_len", f"must be at most {limits.max_seq_len} on this server")
    if cfg.is_lora_family and max(cfg.rank, cfg.init_r if method == "adalora" else 0) > limits.max_rank:
        raise InvalidParams("quiver.rank", f"must be at most {limits.max_rank} (--max-lora-rank): a "
                                           "larger adapter could not be served here")
    if cfg.max_steps is not None and cfg.max_steps > limits.max_epochs * steps_per_epoch:
        raise InvalidParams("quiver.max_steps", f"must be at most {limits.max_epochs} epochs of steps")
    return cfg


def fine_tuned_model_id(base_id: str, suffix: str | None, job_id: str) -> str:
    """`ft/<base>/<suffix>/<job>` (module docstring); every part a valid adapter-id part."""
    base = re.sub(r"[^A-Za-z0-9._-]+", "-", base_id).strip(".-") or "base"
    short = job_id.removeprefix("ftjob-")
    return "/".join(["ft", base, *([suffix] if suffix else []), short])


def job_object(job: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's fine_tuning.job object (plus `quiver`: the method and its options)."""
    spec = job["spec"]
    hyper = spec["hyperparameters"]
    return {
        "object": "fine_tuning.job", "id": job["id"], "created_at": job["created_at"],
        "model": job["model"], "training_file": job["training_file"],
        "validation_file": job["validation_file"], "status": job["status"],
        "fine_tuned_model": job["fine_tuned_model"], "trained_tokens": job["trained_tokens"],
        "error": job["error"], "finished_at": job["finished_at"], "estimated_finish": None,
        "hyperparameters": hyper, "seed": spec["seed"], "suffix": spec["suffix"],
        "user_provided_suffix": spec["suffix"], "organization_id": "quiver", "result_files": [],
        "integrations": None, "metadata": None,
        "method": {"type": "supervised", "supervised": {"hyperparameters": hyper}},
        "quiver": spec["quiver"],
    }
