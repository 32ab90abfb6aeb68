"""AdaLoRA's rank allocator against PEFT's own RankAllocator, fed identical parameters and gradients."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from trainer import TrainConfig
from trainer.methods.adalora import RankAllocator, SvdDelta

NAMES = ["m0", "m1", "m2"]


def _peft_holder(deltas: list[SvdDelta]) -> nn.Module:
    """Clones of our parameters under PEFT's in-memory names (`m0.lora_A.default`, ...)."""
    holder = nn.Module()
    for name, d in zip(NAMES, deltas):
        sub = nn.Module()
        for leaf in ("lora_A", "lora_E", "lora_B"):
            setattr(sub, leaf, nn.ParameterDict({"default": nn.Parameter(getattr(d, leaf).detach().clone())}))
        holder.add_module(name, sub)
    return holder


def _peft_update_and_allocate(allocator, model, config, step: int) -> None:
    """AdaLoraModel.update_and_allocate (peft 0.21), which lives on the model class."""
    if step < config.total_step - config.tfinal:
        _, pattern = allocator.update_and_allocate(model, step)
        if pattern:
            config.rank_pattern = pattern
    elif step == config.total_step - config.tfinal:
        _, config.rank_pattern = allocator.update_and_allocate(model, step, force_mask=True)
        allocator.reset_ipt()
    elif step > config.total_step - config.tfinal:
        allocator.mask_using_rank_pattern(model, config.rank_pattern)


@pytest.mark.parametrize("tinit,tfinal,delta_t", [(1, 2, 2), (0, 0, 1), (2, 1, 3)])
def test_rank_allocation_matches_peft(tinit, tfinal, delta_t, tmp_path):
    from peft import AdaLoraConfig
    from peft.tuners.adalora.layer import RankAllocator as PeftRankAllocator

    torch.manual_seed(0)
    total = 10
    deltas = [SvdDelta(16, 12, 4, 1.0) for _ in NAMES]
    cfg = TrainConfig(method="adalora", data="-", output="-", init_r=4, target_r=2, tinit=tinit, tfinal=tfinal,
                      delta_t=delta_t, beta1=0.8, beta2=0.9)
    ours = RankAllocator(NAMES, deltas, cfg, total)
    holder = _peft_holder(deltas)
    peft_cfg = AdaLoraConfig(init_r=4, target_r=2, tinit=tinit, tfinal=tfinal, deltaT=delta_t, beta1=0.8,
                             beta2=0.9, total_step=total, target_modules=["m0"])
    theirs = PeftRankAllocator(holder, peft_cfg, "default")
    for step in range(1, total + 1):
        for d, name in zip(deltas, NAMES):
            for leaf in ("lora_A", "lora_E", "lora_B"):
                p, q = getattr(d, leaf), getattr(getattr(holder, name), leaf)["default"]
                update, grad = torch.randn_like(p) * 0.1, torch.randn_like(p)
                with torch.no_grad():  # the same "optimizer step" and gradient on both sides
                    p.add_(update)
                    q.add_(update)
                p.grad, q.grad = grad.clone(), grad.clone()
        ours.update_and_allocate(step)
        _peft_update_and_allocate(theirs, holder, peft_cfg, step)
        expected = {k.removesuffix(".lora_E.default"): v for k, v in (peft_cfg.rank_pattern or {}).items()}
        assert (ours.rank_pattern or {}) == expected, step
        for d, name in zip(deltas, NAMES):
            assert torch.equal(d.lora_E, getattr(holder, name).lora_E["default"]), (step, name)
    assert sum(map(sum, ours.rank_pattern.values())) <= 2 * len(NAMES)


def test_budget_schedule_is_cubic_between_tinit_and_tfinal():
    cfg = TrainConfig(method="adalora", data="-", output="-", init_r=12, target_r=4, tinit=2, tfinal=3, delta_t=2)
    alloc = RankAllocator(["a", "b"], [SvdDelta(4, 4, 12, 1.0)] * 2, cfg, total_steps=12)
    budgets = [alloc.budget(step) for step in range(1, 13)]
    assert budgets[:2] == [(24, False), (24, False)]  # warm-up: init budget, no masking
    assert budgets[2] == (int(16 * (6 / 7) ** 3 + 8), False)  # step 3: odd, no re-mask
    assert budgets[3] == (int(16 * (5 / 7) ** 3 + 8), True)
    assert budgets[8] == (8, False)  # step 9 = total - tfinal: the cubic reaches the target
    assert budgets[9:] == [(8, True)] * 3
