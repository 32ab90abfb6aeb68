"""Checkpoints: a resumed run ends bit for bit where the uninterrupted run ends."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from trainer import TrainConfigError, train

#: method -> overrides: dropout (RNG), grad accumulation, AdaLoRA's importance state, an LSTM
CASES = {
    "lora": dict(rank=4, dropout=0.2, grad_accum=2),
    "adalora": dict(init_r=4, target_r=2, tinit=1, tfinal=1, lr=5e-2),
    "ptuning": dict(num_virtual_tokens=3, encoder="lstm", encoder_hidden_size=8),
}


def _tensors(out) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter_model.safetensors"))


@pytest.mark.parametrize("method", list(CASES))
def test_resume_equals_uninterrupted(method, tiny_config, tmp_path):
    options = dict(max_steps=6, batch_size=3, **CASES[method])
    straight = _tensors(train(tiny_config(method, output=str(tmp_path / "straight"), **options)))
    first = tiny_config(method, output=str(tmp_path / "first"), save_every=3, **options)
    train(first)
    checkpoint = tmp_path / "first" / "checkpoints" / "step-000003"
    resumed = _tensors(train(tiny_config(method, output=str(tmp_path / "resumed"), resume=str(checkpoint),
                                         **options)))
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    # each checkpoint also holds a servable adapter as of its step
    assert (checkpoint / "adapter" / "adapter_config.json").is_file()


def test_resume_latest_and_refusing_other_settings(tiny_config, tmp_path):
    out = str(tmp_path / "run")
    train(tiny_config("lora", output=out, max_steps=4, save_every=2))
    again = train(tiny_config("lora", output=out, max_steps=4, save_every=2, resume="latest"))
    assert (again / "adapter_model.safetensors").is_file()  # resumed at step 4: nothing left to do
    with pytest.raises(TrainConfigError, match="lr: checkpoint 0.01, now 0.02"):
        train(tiny_config("lora", output=out, max_steps=4, lr=2e-2, resume="latest"))
    with pytest.raises(TrainConfigError, match="no checkpoint"):
        train(tiny_config("lora", output=str(tmp_path / "empty"), resume="latest"))
