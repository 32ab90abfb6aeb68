"""The loop's options: CLI contract, 8-bit AdamW, gradient checkpointing, the NF4 base, cleanup."""
from __future__ import annotations

import argparse

import pytest
import torch
from safetensors.torch import load_file

from runtime.cli import build_parser, main
from runtime.models.base import load_base
from runtime.nn.attention import AttentionBatch
from tests.quiver_factory import QuiverStack
from trainer import TrainConfig, TrainConfigError, train
from trainer.batch import pack
from trainer.cli import config_from_args
from trainer.data import Example
from trainer.loop import Trainer

#: The flags issue 6 names (a contract: scripts use them).
CONTRACT_FLAGS = """--method --data --output --model --quantize --dtype --rank --alpha --targets --rslora --dropout
--init-r --target-r --tinit --tfinal --delta-t --orth-reg-weight --num-virtual-tokens --prompt-init-text --encoder
--encoder-hidden-size --prefix-projection --epochs --max-steps --lr --batch-size --grad-accum --max-seq-len
--eval-data --seed --save-every --resume --gradient-checkpointing""".split()


def _train_parser() -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["train"]


def test_cli_has_the_contract_flags_and_each_maps_to_the_config():
    parser = _train_parser()
    flags = {s for a in parser._actions for s in a.option_strings}
    assert set(CONTRACT_FLAGS) <= flags
    args = parser.parse_args(["--method", "adalora", "--data", "d.jsonl", "--output", "o", "--init-r", "6",
                              "--target-r", "3", "--delta-t", "2", "--resume", "--targets", "q_proj,v_proj"])
    cfg = config_from_args(args)
    assert (cfg.init_r, cfg.target_r, cfg.delta_t, cfg.resume) == (6, 3, 2, "latest")
    assert cfg.target_modules == ["q_proj", "v_proj"] and cfg.alpha == 12.0
    dests = {a.dest for a in parser._actions} - {"help", "run", "device"}
    assert dests <= set(TrainConfig.__dataclass_fields__) | {"device"}


def test_quiver_train_command_writes_a_peft_directory(tiny, tiny_data, tmp_path, capsys):
    _, model_dir = tiny
    out = tmp_path / "cli"
    code = main(["train", "--method", "lora", "--data", str(tiny_data), "--output", str(out), "--model",
                 str(model_dir), "--quantize", "none", "--dtype", "float32", "--max-steps", "2", "--rank", "4",
                 "--no-progress"])
    assert code == 0
    assert {p.name for p in out.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors", "README.md"}
    assert "--rank 4" in (out / "README.md").read_text()


def test_cli_reports_bad_settings_and_bad_rows(tiny, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "w1", "completion": "w2"}\n{"prompt": 3}\n')
    base = ["train", "--data", str(bad), "--output", str(tmp_path / "o"), "--model", str(tiny[1]),
            "--quantize", "none", "--dtype", "float32", "--no-progress"]
    assert main(base + ["--method", "lora"]) == 2
    assert f"{bad}:2:" in capsys.readouterr().err
    assert main(base + ["--method", "adalora", "--init-r", "2", "--target-r", "4"]) == 2
    assert "--target-r (4) must not exceed --init-r (2)" in capsys.readouterr().err


def test_config_checks():
    with pytest.raises(TrainConfigError, match="--method"):
        TrainConfig(method="ia3", data="d", output="o")
    with pytest.raises(TrainConfigError, match="--rank"):
        TrainConfig(method="lora", data="d", output="o", rank=0)
    assert TrainConfig(method="prompt", data="d", output="o").lr == 3e-2
    assert TrainConfig(method="lora", data="d", output="o", targets=r".*\.q_proj").target_modules == r".*\.q_proj"


def test_adamw8bit_trains(tiny_config):
    trainer = Trainer(tiny_config("lora", optim="adamw8bit", rank=4, eval_data=tiny_config("lora").data))
    trainer.setup()
    before, _ = trainer.evaluate()
    trainer.train()
    assert trainer.summary.eval_loss < before - 0.05


def test_gradient_checkpointing_gives_the_same_adapter(tiny_config, tmp_path):
    plain = train(tiny_config("dora", rank=4, dropout=0.1, max_steps=3, output=str(tmp_path / "a")))
    ckpt = train(tiny_config("dora", rank=4, dropout=0.1, max_steps=3, output=str(tmp_path / "b"),
                             gradient_checkpointing=True))
    a, b = load_file(str(plain / "adapter_model.safetensors")), load_file(str(ckpt / "adapter_model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_nf4_base_trains_and_serves_the_same(tiny, tiny_config):
    """QLoRA: gradients flow through the frozen NF4 base; the served NF4 forward matches training."""
    hf, _ = tiny
    trainer = Trainer(tiny_config("lora", quantize="nf4", rank=4, max_steps=4))
    trainer.setup()
    out = trainer.train()
    ids = (5, 17, 99, 3, 42, 8)
    with torch.no_grad():
        trainer.model.eval()
        mine = trainer.method(trainer.model, pack([Example(ids, (False,) + (True,) * 5, 1)]))
    stack = QuiverStack.from_hf(hf, quant="nf4", slots=2)
    stack.load("a", out)
    assert (mine - stack.logits(torch.tensor(ids), "a")[:-1]).abs().max() <= 1e-4


def test_training_on_a_loaded_base_gives_it_back_unchanged(tiny, tiny_config):
    base = load_base(str(tiny[1]), "none", "float32", "cpu")
    ids = torch.tensor([5, 6, 7])

    def logits():
        with torch.no_grad():
            return base.model(ids, torch.arange(3), AttentionBatch.without_cache([3]))

    ref = logits()
    train(tiny_config("dora", rank=4, max_steps=2, gradient_checkpointing=True), base=base)
    assert all(lin.lora is None for lin in base.model.adapted_linears().values())
    assert (base.model.num_slots, base.model.max_rank) == (0, 0)
    assert not any("forward" in layer.__dict__ for layer in base.model.model.layers)
    assert torch.equal(logits(), ref)
