"""Paged optimizers (the QLoRA recipe's third part): bitsandbytes' PagedAdamW / PagedAdamW8bit
match AdamW over the first steps; `--optim paged_*` off CUDA trains exactly as the unpaged one,
with a warning."""
from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import load_file

from tests.trainer.conftest import tiny, tiny_config, tiny_data  # noqa: F401 - fixtures
from trainer import train
from trainer.loop import make_optimizer

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _trajectory(make, steps: int = 5, seed: int = 0) -> list[torch.Tensor]:
    """Parameters [128, 128] after each of `steps` AdamW-style steps on fixed random gradients."""
    g = torch.Generator().manual_seed(seed)
    p = torch.nn.Parameter(torch.randn(128, 128, generator=g).to(DEVICE))
    opt = make([p])
    out = []
    for _ in range(steps):
        p.grad = torch.randn(128, 128, generator=g).to(DEVICE)
        opt.step()
        out.append(p.detach().cpu().clone())
    return out


@pytest.mark.parametrize("kind", ["paged_adamw", "paged_adamw8bit"])
def test_paged_optimizers_match_adamw_over_the_first_steps(kind):
    import bitsandbytes as bnb

    cls = {"paged_adamw": bnb.optim.PagedAdamW, "paged_adamw8bit": bnb.optim.PagedAdamW8bit}[kind]
    start = _trajectory(lambda ps: torch.optim.SGD(ps, lr=0.0), steps=1)[0]
    ref = _trajectory(lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.0))
    got = _trajectory(lambda ps: cls(ps, lr=1e-2, weight_decay=0.0))
    for step, (r, p) in enumerate(zip(ref, got), start=1):
        if kind == "paged_adamw":  # 32-bit state: the same update up to float rounding
            assert (p - r).abs().max() <= 1e-5 * step, step
        else:  # 8-bit blockwise state: the same update up to its quantization error
            assert (p - r).norm() <= 0.03 * (r - start).norm(), step  # measured: 1% (SGD: 64%)
            cos = torch.nn.functional.cosine_similarity((p - start).flatten(), (r - start).flatten(), dim=0)
            assert cos > 0.999, step


@pytest.mark.parametrize("paged, unpaged", [("paged_adamw", "adamw"), ("paged_adamw8bit", "adamw8bit")])
def test_quiver_train_paged_off_cuda_falls_back_with_a_warning(paged, unpaged, tiny_config, tmp_path, caplog):
    if torch.cuda.is_available():
        pytest.skip("on CUDA the paged optimizer itself runs")
    with caplog.at_level(logging.WARNING, logger="trainer.loop"):
        a = train(tiny_config("lora", rank=4, max_steps=3, optim=paged, output=str(tmp_path / "paged")))
    assert any(f"--optim {paged}" in r.message and "falls back" in r.message for r in caplog.records)
    b = train(tiny_config("lora", rank=4, max_steps=3, optim=unpaged, output=str(tmp_path / "unpaged")))
    ta, tb = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


def test_make_optimizer_picks_the_paged_class_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    import bitsandbytes as bnb

    from trainer import TrainConfig

    p = [torch.nn.Parameter(torch.zeros(4, device="cuda"))]
    cfg = TrainConfig(method="lora", data="", output="", optim="paged_adamw8bit")
    assert isinstance(make_optimizer(cfg, p, torch.device("cuda")), bnb.optim.PagedAdamW8bit)
