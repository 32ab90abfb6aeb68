"""Every method: a short run lowers the loss, PEFT loads the output with exactly the keys and shapes
it would save itself, and PEFT's logits equal Quiver's serving logits (and the trainer's own)."""
from __future__ import annotations

import warnings

import pytest
import torch
from peft import get_peft_model_state_dict
from safetensors.torch import load_file

from tests.peft_factory import load_peft_model
from tests.quiver_factory import QuiverStack, peft_logits
from trainer import TrainConfig
from trainer.batch import pack
from trainer.data import Example
from trainer.loop import Trainer

IDS = torch.tensor([5, 17, 99, 3, 42, 8, 77, 12, 64, 31, 2, 90])

#: name -> (method, TrainConfig overrides)
CASES = {
    "lora": ("lora", dict(targets="q_proj,v_proj,down_proj", rank=4, dropout=0.1)),
    "lora-rslora-regex": ("lora", dict(targets=r".*layers\.1\.(self_attn\.k_proj|mlp\.up_proj)", rank=8, rslora=True)),
    "dora": ("dora", dict(rank=4)),
    "adalora": ("adalora", dict(init_r=4, target_r=2, tinit=2, tfinal=2, lr=1e-1)),
    "prompt": ("prompt", dict(num_virtual_tokens=4, lr=3e-1)),
    "prompt-text-init": ("prompt", dict(num_virtual_tokens=5, prompt_init_text="w7 w8", lr=1e-2)),
    "ptuning-mlp": ("ptuning", dict(num_virtual_tokens=4, encoder_hidden_size=32, lr=3e-2)),
    "ptuning-lstm": ("ptuning", dict(num_virtual_tokens=4, encoder="lstm", encoder_hidden_size=16, lr=3e-2)),
    "prefix": ("prefix", dict(num_virtual_tokens=3, lr=1e-1)),
    "prefix-projection": ("prefix", dict(num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=32,
                                         lr=3e-2)),
}


@pytest.fixture(scope="module")
def trained(tiny, tiny_data, tmp_path_factory):
    """name -> (Trainer after train(), output dir, train-set loss before); one run per case."""
    _, model_dir = tiny
    runs = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    for name, (method, overrides) in CASES.items():
        options = dict(method=method, data=str(tiny_data), output=str(tmp_path_factory.mktemp(name)),
                       model=str(model_dir), quantize="none", dtype="float32", device="cpu", max_steps=16,
                       batch_size=4, lr=1e-2, progress=False, eval_data=str(tiny_data))
        trainer = Trainer(TrainConfig(**{**options, **overrides}))
        trainer.setup()
        before, _ = trainer.evaluate()
        runs[name] = (trainer, trainer.train(), before)
    torch.set_num_threads(threads)
    return runs


@pytest.mark.parametrize("name", list(CASES))
def test_short_run_lowers_the_loss(name, trained):
    trainer, _, before = trained[name]
    assert trainer.summary.eval_loss < before - 0.03, (before, trainer.summary.eval_loss)


@pytest.mark.parametrize("name", list(CASES))
def test_peft_loads_exactly_the_saved_keys(name, tiny, trained):
    hf, _ = tiny
    _, out, _ = trained[name]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft = load_peft_model(hf, out)
    assert not [w for w in caught if "missing adapter keys" in str(w.message)]
    ours = load_file(str(out / "adapter_model.safetensors"))
    theirs = get_peft_model_state_dict(peft)  # what PEFT would save for the adapter it built
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    for key, tensor in ours.items():
        assert torch.equal(tensor, theirs[key].float()), key


@pytest.mark.parametrize("name", list(CASES))
def test_peft_logits_equal_quiver_logits(name, tiny, trained):
    hf, _ = tiny
    _, out, _ = trained[name]
    stack = QuiverStack.from_hf(hf, quant="none", slots=2)
    stack.load("trained", out)
    ours = stack.logits(IDS, "trained")
    ref = peft_logits(load_peft_model(hf, out), IDS)
    assert (ours - ref).abs().max() <= 1e-4
    assert (ours - stack.logits(IDS, "")).abs().max() > 1e-3, "training must have changed the model"


@pytest.mark.parametrize("name", list(CASES))
def test_what_is_trained_is_what_is_served(name, tiny, trained):
    """The trainer's own forward (no cache, trainable slot) equals the server's (KV cache, slot copy)."""
    hf, _ = tiny
    trainer, out, _ = trained[name]
    stack = QuiverStack.from_hf(hf, quant="none", slots=2)
    stack.load("trained", out)
    ids = tuple(IDS.tolist())
    batch = pack([Example(ids, (False,) + (True,) * (len(ids) - 1), 1)])
    trainer.model.eval()
    with torch.no_grad():
        mine = trainer.method(trainer.model, batch)  # logits at positions 0 .. L-2
    served = stack.logits(IDS, "trained")[:-1]
    assert (mine - served).abs().max() <= 1e-4


def test_adalora_prunes_to_the_budget_with_ranks_differing_across_modules(trained):
    trainer, out, _ = trained["adalora"]
    ranks = trainer.method.ranks()
    assert sum(ranks.values()) <= trainer.cfg.target_r * len(ranks)
    assert len(set(ranks.values())) > 1, ranks
    saved = load_file(str(out / "adapter_model.safetensors"))
    for name, rank in ranks.items():
        assert saved[f"base_model.model.{name}.lora_E"].shape == (rank, 1)
