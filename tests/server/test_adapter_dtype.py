"""`--adapter-dtype bfloat16`: LoRA slot weights stored in bf16 (half the bytes a decode step over
many adapters streams), math still fp32. For LoRA-family adapters saved in bf16 (PEFT's usual
`torch_dtype=bfloat16` runs) nothing is lost: the server's greedy output equals PEFT's on the
same files, through a real gRPC server, LoRA, rslora, LoRA bias and DoRA alike."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from runtime.cli import build_parser
from runtime.config import ServerConfig
from runtime.server.client import QuiverClient
from runtime.server.serve_cli import config_from_args
from tests.peft_factory import load_peft_model
from tests.quiver_factory import peft_greedy
from tests.server.conftest import words
from tests.server.hardening import running_server

#: LoRA-family adapters of the session's adapter dir (conftest.ADAPTERS) whose slot weights are
#: the file's own tensors (AdaLoRA's are a product, folded at load: rounded in bf16 slots)
BF16_EXACT = ["team-a/lora-all", "lora-rslora", "lora-bias", "team-a/dora-all", "dora-qv"]
IDS = [5, 17, 99, 3, 42, 8, 61]


@pytest.fixture(scope="module")
def bf16_adapter_dir(adapter_dir, tmp_path_factory) -> Path:
    """The same adapters, their weights saved in bf16 (rounded once, as a bf16 training run saves)."""
    root = tmp_path_factory.mktemp("bf16-adapters")
    for a in BF16_EXACT:
        dst = root / a
        shutil.copytree(adapter_dir / a, dst)
        f = dst / "adapter_model.safetensors"
        save_file({k: v.to(torch.bfloat16) for k, v in load_file(str(f)).items()}, str(f))
    return root


def test_bf16_slots_equal_peft_on_adapters_saved_in_bf16(tiny_model_dir, tiny_hf, bf16_adapter_dir):
    with running_server(tiny_model_dir, adapter_dir=str(bf16_adapter_dir), adapter_dtype="bfloat16") as srv:
        lora = srv.core.base.model.adapted_linears()["model.layers.0.self_attn.q_proj"].lora
        assert lora.A.dtype == lora.Bt.dtype == torch.bfloat16 and lora.bias.dtype == torch.float32
        assert srv.core.base.kernel_line().endswith("; LoRA slots bfloat16")  # the start-up line says so
        with QuiverClient(srv.address, timeout=120) as client:
            for a in BF16_EXACT:
                resp = client.generate(words(IDS), a, max_new_tokens=8, ignore_eos=True, return_token_ids=True)
                want = peft_greedy(load_peft_model(tiny_hf, bf16_adapter_dir / a), IDS, 8)
                assert [t.id for t in resp.tokens] == want, a


def test_the_flag_and_its_errors():
    def parse(*argv):
        return config_from_args(build_parser().parse_args(["serve", *argv]))

    assert parse().adapter_dtype is None
    assert parse("--adapter-dtype", "bfloat16").adapter_dtype == "bfloat16"
    with pytest.raises(SystemExit):
        parse("--adapter-dtype", "float16")
    with pytest.raises(ValueError, match="--adapter-dtype must be one of float32, bfloat16"):
        ServerConfig(adapter_dtype="int8")
