"""A job's slices on the resident serving model: the gradients are the trainer's own (the fused
kernel's merged q/k/v and gate/up groups included), and serving sees nothing of them."""
from __future__ import annotations

import pytest
import torch

from runtime.models.base import load_base
from runtime.nn.attention import AttentionBatch
from runtime.training.slices import ResidentRun
from tests.training.conftest import jsonl, learn_rows
from trainer import TrainConfig
from trainer.batch import pack
from trainer.loop import Trainer, read_examples


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("rows") / "learn.jsonl"
    path.write_bytes(jsonl(learn_rows()))
    return path


def _config(data, tmp_path, **kw) -> TrainConfig:
    return TrainConfig(**{**dict(method="lora", data=str(data), output=str(tmp_path / "out"), rank=4, max_steps=4,
                                 batch_size=4, lr=1e-2, progress=False, seed=0), **kw})


def _grads(run_or_trainer, examples) -> dict[str, torch.Tensor]:
    """LoRA gradients of one packed batch, B drawn away from zero so every path carries gradient."""
    t = run_or_trainer.trainer if isinstance(run_or_trainer, ResidentRun) else run_or_trainer
    with torch.no_grad():
        for d in t.method.deltas:
            d.lora_B.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    batch = pack(examples[:4])

    def step():
        t.model.train()
        t._loss_sum(batch).backward()

    if isinstance(run_or_trainer, ResidentRun):
        with run_or_trainer._piece(), torch.enable_grad():  # the adapter attached, as for a piece
            step()
    else:
        step()
    return {n: p.grad.clone() for n, p in t.method.named_parameters()}


def test_gradients_on_the_merged_serving_base_are_the_trainers(chat_model_dir, data, tmp_path):
    serving = load_base(str(chat_model_dir), "nf4", None, "cpu")  # as quiver serve: fused, merged
    if "merged groups" not in serving.model.kernels:
        pytest.skip(f"no merged projection groups on this machine ({serving.model.kernels})")
    cfg = _config(data, tmp_path)
    run = ResidentRun(cfg, serving, read_examples(cfg, serving))
    run.setup()
    mine = _grads(run, run.trainer.train_examples)
    ref_base = load_base(str(chat_model_dir), "nf4", "float32", "cpu", training=True)  # standard kernel
    trainer = Trainer(cfg, ref_base)
    trainer.setup()
    theirs = _grads(trainer, trainer.train_examples)
    for name in theirs:  # fused vs standard NF4 differ in rounding only
        rel = (mine[name] - theirs[name]).norm() / theirs[name].norm()
        assert rel < 0.05, (name, float(rel))


def test_a_slice_never_shows_in_serving_and_gives_the_model_back(chat_model_dir, data, tmp_path):
    from tests.quiver_factory import QuiverStack  # noqa: F401 - the serving slots as the engine has them
    from runtime.adapters.registry import AdapterRegistry

    base = load_base(str(chat_model_dir), "nf4", None, "cpu")  # as quiver serve loads it
    AdapterRegistry(base.model, num_slots=2, max_rank=8)  # the serving slots
    linears = base.model.adapted_linears()
    before = {n: lin.lora for n, lin in linears.items()}
    with torch.no_grad():  # a serving adapter in slot 0 of every projection
        for lin in linears.values():
            g = torch.Generator().manual_seed(3)
            lin.lora.set_slot(0, torch.randn(4, lin.base.in_features, generator=g) * 0.1,
                              torch.randn(lin.base.out_features, 4, generator=g) * 0.1, 2.0)
    slots = {n: (lin.lora.A.detach().clone(), lin.lora.Bt.detach().clone()) for n, lin in linears.items()}
    ids = torch.tensor([5, 6, 7, 8])

    def served() -> torch.Tensor:
        with torch.no_grad():
            return base.model(ids, torch.arange(4), AttentionBatch.without_cache([4]))

    ref = served()
    rng = torch.get_rng_state()
    cfg = _config(data, tmp_path)
    run = ResidentRun(cfg, base, read_examples(cfg, base))
    run.setup()
    for _ in range(3):
        loss, tokens = run.advance()
        assert tokens > 0 and loss > 0
        assert torch.equal(torch.get_rng_state(), rng)  # serving's RNG stream untouched
        assert {n: lin.lora for n, lin in linears.items()} == before  # serving slots back in place
        assert not base.model.training
        assert torch.equal(served(), ref)
    for n, lin in linears.items():
        assert torch.equal(lin.lora.A, slots[n][0]) and torch.equal(lin.lora.Bt, slots[n][1])
    assert run.trainer.history[-1][1] < run.trainer.history[0][1]  # and it did train
    run.close()
