"""Checks shared by the PEFT readers (peft_lora.py, peft_prompt.py): each raises AdapterFormatError
with a message that names the field, tensor or module and says what was expected."""
from __future__ import annotations

from typing import Any

import torch

from runtime.adapters.types import AdapterFormatError

#: Every LoRA / AdaLoRA tensor key starts with this, then the HF module path.
KEY_PREFIX = "base_model.model."
#: Shown at most this many names in a missing / unexpected key list.
MAX_LISTED = 8


def reject_fields(config: dict, unsupported: dict[str, Any]) -> None:
    """Raise on the first field set to something other than its "off" value (or null, [], {})."""
    for field, off in unsupported.items():
        value = config.get(field, off)
        if value != off and value not in (None, [], {}):
            raise AdapterFormatError(
                f"{config['peft_type']} adapter sets {field}={value!r}, which changes the model's "
                f"forward in a way Quiver does not support (supported: {field}={off!r})"
            )


def check_keys(tensors: dict[str, torch.Tensor], expected: set[str],
               optional: set[str] = frozenset()) -> None:
    """The file's keys are exactly `expected`, plus any of `optional`."""
    missing = sorted(expected - tensors.keys())
    unexpected = sorted(tensors.keys() - expected - optional)
    problems = []
    if missing:
        problems.append(f"missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listing(unexpected)}")
    if problems:
        raise AdapterFormatError(
            "adapter weights do not match its config (" + "; ".join(problems) + "). Was the config "
            "edited, or the weights saved for another adapter type or base model?"
        )


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:MAX_LISTED])
    return shown + (f" ... and {len(names) - MAX_LISTED} more" if len(names) > MAX_LISTED else "")


def shaped(tensors: dict[str, torch.Tensor], key: str, expected: tuple[int, ...], why: str) -> torch.Tensor:
    """tensors[key], after checking its shape against what the base model needs (why: the dims)."""
    t = tensors[key]
    if tuple(t.shape) != expected:
        raise AdapterFormatError(
            f"tensor {key} has shape {list(t.shape)}, expected {list(expected)} ({why}): "
            "was this adapter trained for a different base model?"
        )
    return t


def check_config_rank(tensors: dict, module: str, leaf: str, source: str, rank: int) -> None:
    """A rank disagreement says the config is wrong, not the base: say so before shape checks."""
    found = tensors[f"{KEY_PREFIX}{module}.{leaf}"].shape
    if len(found) == 2 and found[0] != rank:
        raise AdapterFormatError(
            f"{module}: {leaf} has rank {found[0]} but the config gives this module {source}: "
            "the config does not describe these weights"
        )


def check_max_rank(module: str, rank: int, max_rank: int) -> None:
    if rank > max_rank:
        raise AdapterFormatError(f"{module} has LoRA rank {rank}, above this server's max_rank={max_rank}")


def positive_int(config: dict, field: str, default: Any = None) -> int:
    value = config.get(field, default)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise AdapterFormatError(f"{field} must be a positive integer, not {value!r}")
    return value


def expect_base_value(config: dict, field: str, expected: int, what: str) -> None:
    """A config value PEFT fills from the base at creation: null (PEFT fills it on load) or equal."""
    found = config.get(field)
    if found is not None and found != expected:
        raise AdapterFormatError(
            f"{config['peft_type']} adapter has {field}={found!r}, but {what} is {expected}: "
            "the adapter was trained for a different base model"
        )
