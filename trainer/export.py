"""Writing a trained adapter: a PEFT-format directory plus a short README.

    <dir>/adapter_config.json         PEFT config (peft_type, task_type CAUSAL_LM, method fields)
    <dir>/adapter_model.safetensors   PEFT on-disk keys, float32
    <dir>/README.md                   how it was trained (every TrainConfig field) and its losses

The files are what `PeftModel.from_pretrained(base, dir)` and `quiver adapters load` read
(runtime/adapters/peft_format.py writes them, atomically per file).
"""
from __future__ import annotations

import platform
import shlex
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path

from runtime.adapters.peft_format import write_adapter
from trainer.config import TrainConfig
from trainer.methods.base import AdapterMethod


@dataclass
class TrainSummary:
    """What the README reports about a run (also returned by the Python API)."""

    steps: int = 0
    total_steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    first_loss: float | None = None
    final_loss: float | None = None  # mean train loss over the last (up to 10) steps
    eval_loss: float | None = None
    eval_accuracy: float | None = None  # eval examples whose greedy completion is exact
    extra: dict = field(default_factory=dict)  # method-specific facts (AdaLoRA ranks)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def export_adapter(method: AdapterMethod, out_dir: str | Path, cfg: TrainConfig, summary: TrainSummary,
                   outside=None) -> Path:
    """Write the adapter directory. `outside(fn)` runs the file writes (default: here); the
    config, tensors and README are taken first, on the calling thread (trainer/loop.py's
    `pauses.outside`: a job in the server lets the engine run beside the writes)."""
    out = Path(out_dir)
    config, tensors, text = method.peft_config(), method.peft_tensors(), readme(method, cfg, summary)

    def write() -> None:
        write_adapter(out, config, tensors)
        (out / "README.md").write_text(text, encoding="utf-8")

    (outside or _now)(write)
    return out


def _now(fn):
    return fn()


def readme(method: AdapterMethod, cfg: TrainConfig, s: TrainSummary) -> str:
    def fmt(x: float | None) -> str:
        return "-" if x is None else f"{x:.4f}"

    lines = [
        f"# {method.peft_type} adapter trained by `quiver train`",
        "",
        f"Base model: `{method.model_name}` ({cfg.quantize}, {cfg.dtype or 'auto'} compute). "
        f"Written {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC on {platform.node() or 'unknown host'}.",
        "",
        "| | |", "|---|---|",
        f"| steps | {s.steps} / {s.total_steps} |",
        f"| train loss (first step) | {fmt(s.first_loss)} |",
        f"| train loss (last steps) | {fmt(s.final_loss)} |",
        f"| eval loss | {fmt(s.eval_loss)} |",
        f"| eval exact match (greedy) | {fmt(s.eval_accuracy)} |",
        f"| tokens | {s.tokens} ({s.tokens_per_second:.0f} tokens/s over {s.seconds:.0f} s) |",
    ]
    lines += [f"| {k} | {v} |" for k, v in s.extra.items()]
    lines += ["", "Load it with PEFT (`PeftModel.from_pretrained(base, this_dir)`) or hot-load it into a running "
              "server (`quiver adapters load ID --source this_dir --server HOST:PORT`).", "",
              "## Training command", "", "```", command_line(cfg), "```", ""]
    return "\n".join(lines)


def command_line(cfg: TrainConfig) -> str:
    """The `quiver train` command that reproduces this run (settings that differ from the defaults)."""
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    args = ["quiver train"]
    for key, value in cfg.to_dict().items():
        flag = "--" + key.replace("_", "-")
        if key in ("progress", "resume") or value is None or value is False or value == defaults[key]:
            continue
        args.append(flag if value is True else f"{flag} {shlex.quote(str(value))}")
    return " \\\n  ".join(args)
