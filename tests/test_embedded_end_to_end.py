"""The embedded SmolLM2-135M-Instruct, end to end, against transformers and PEFT.

Slow (a real 135M model on CPU), kept in the suite: the tiny random models elsewhere cannot show
that a real chat model answers correctly through Quiver's own decoder, NF4 path and adapters.
"""
from __future__ import annotations

import json
import subprocess
import sys
import warnings

import pytest
import torch

from runtime.config import ModelConfig, QuantConfig
from runtime.models.embedded import embedded_model_dir
from runtime.models.hf import load_model_config, load_state_dict, load_tokenizer

pytestmark = pytest.mark.slow

PROMPTS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "Write one sentence about the ocean.",
    "What is 2 + 2?",
    "Give me a synonym for happy.",
]
N_TOKENS = 20


@pytest.fixture(scope="module")
def model_dir():
    return embedded_model_dir()


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return load_tokenizer(model_dir)


@pytest.fixture(scope="module")
def chat_ids(tokenizer):
    from runtime.generate_cli import chat_prompt_ids

    return [chat_prompt_ids(tokenizer, p, chat=True) for p in PROMPTS]


def quiver_greedy(model_dir, tokenizer, quant: str, prompts, adapters=None,
                  n_tokens: int = N_TOKENS, kernel: str | None = None,
                  approximate_head: bool = False) -> list[list[int]]:
    """Quiver's engine, all prompts in one continuous batch; adapters: {id: dir} per prompt.
    kernel: the 4-bit kernel; default: the one transformers takes on this machine.
    approximate_head: Quiver's fast lm_head (default off: fp32, as transformers computes it)."""
    from tests.quiver_factory import bnb_reference_kernel

    from runtime.adapters.peft_format import read_adapter
    from runtime.adapters.registry import AdapterRegistry
    from runtime.engine.engine import Engine
    from runtime.engine.params import StoppingParams
    from runtime.engine.request import GenerationRequest
    from runtime.nn.model import DecoderModel

    cfg = load_model_config(model_dir)
    model = DecoderModel(cfg, load_state_dict(model_dir), QuantConfig(quant))
    model.use_kernels(kernel or bnb_reference_kernel(), approximate_head)
    registry = AdapterRegistry(model, num_slots=4, max_rank=16)
    for adapter_id, path in (adapters or {}).items():
        registry.add(adapter_id, read_adapter(path, cfg))
    engine = Engine(model, tokenizer, registry)
    stopping = StoppingParams(max_new_tokens=n_tokens, ignore_eos=True)
    reqs = [GenerationRequest(ids, adapter_id=a, stopping=stopping) for ids, a in prompts]
    return [c.token_ids for c in engine.generate(reqs)]


def hf_model(model_dir, quant: str):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kw = {}
    if quant == "nf4":
        kw = dict(quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32), device_map="cpu")
    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, **kw).eval()


def hf_greedy(model, ids: list[int]) -> list[int]:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model.generate(torch.tensor([ids]), max_new_tokens=N_TOKENS, min_new_tokens=N_TOKENS,
                             do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_greedy_chat_continuations_equal_transformers(quant, model_dir, tokenizer, chat_ids):
    """fp32: all prompts in one continuous batch. nf4: each prompt alone, as transformers runs
    it, on the 4-bit kernel transformers takes here; then on Quiver's serving defaults
    (`resolve_precision`: int8 / bf16 lm_head where the CPU has bf16). On the fused kernel a prompt's
    greedy text may depend on its batch neighbours: the kernel rounds its input to bf16, which
    turns the fp32 last-bit differences of batched attention into bf16 steps (fp32 batches are
    tested to equal solo runs in tests/nn and tests/adapters)."""
    from runtime.models.base import resolve_precision
    from tests.quiver_factory import bnb_reference_kernel

    hf = hf_model(model_dir, quant)
    expected = [hf_greedy(hf, ids) for ids in chat_ids]
    if quant == "none":
        assert quiver_greedy(model_dir, tokenizer, quant, [(ids, "") for ids in chat_ids]) == expected
        return
    got = [quiver_greedy(model_dir, tokenizer, quant, [(ids, "")])[0] for ids in chat_ids]
    assert got == expected
    served = resolve_precision(None, torch.device("cpu"))
    if (served.nf4_kernel, served.approximate_head) == (bnb_reference_kernel(), False):
        return  # the serving defaults are the reference run's own here (a CPU without bf16)
    got = [quiver_greedy(model_dir, tokenizer, quant, [(ids, "")], kernel=served.nf4_kernel,
                         approximate_head=served.approximate_head)[0] for ids in chat_ids]
    assert got == expected, served


def test_cli_answers_paris(model_dir):
    out = subprocess.run(
        [sys.executable, "-m", "runtime.cli", "generate", "--chat", "--json", "--max-new-tokens", "24",
         "What is the capital of France?"],
        capture_output=True, text=True, timeout=600, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert "Paris" in result["text"]
    assert result["stop_reason"] in ("EOS_TOKEN", "MAX_TOKENS") and result["tokens"]


ADAPTERS = {
    "lora": ("lora", dict(target_modules="all-linear", r=8, lora_alpha=16)),
    "dora": ("lora", dict(target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True)),
    "prompt": ("prompt_tuning", dict(num_virtual_tokens=8)),
    "prefix": ("prefix_tuning", dict(num_virtual_tokens=6)),
}


SHORT = ["The weather today is", "My favourite food is", "Once upon a time", "The capital of Italy is"]


def test_adapters_on_embedded_equal_peft(model_dir, tokenizer, tmp_path):
    """PEFT-made adapters of four types in one mixed batch (with a base row), each row equal to
    PEFT computing that adapter alone (fp32, greedy, 12 tokens; PEFT without cache is slow)."""
    from tests.peft_factory import load_peft_model, make_peft_adapter
    from tests.quiver_factory import peft_greedy

    base = hf_model(model_dir, "none")
    paths = {name: make_peft_adapter(base, kind, tmp_path / name, seed=i, perturb_scale=0.02, **opts)
             for i, (name, (kind, opts)) in enumerate(ADAPTERS.items())}
    ids = [tokenizer(t)["input_ids"] for t in SHORT]
    prompts = [(ids[i], name) for i, name in enumerate(ADAPTERS)] + [(ids[0], "")]
    got = quiver_greedy(model_dir, tokenizer, "none", prompts, paths, n_tokens=12)
    for (prompt, name), tokens in zip(prompts[:-1], got):
        peft = load_peft_model(base, paths[name])
        # PEFT's cached generate is right for LoRA; prompt learning needs the slow uncached loop
        expected = hf_greedy(peft, prompt)[:12] if name in ("lora", "dora") else peft_greedy(peft, prompt, 12)
        assert tokens == expected, name
    assert got[-1] == hf_greedy(base, ids[0])[:12]


def test_lora_on_embedded_nf4_equals_peft_bitsandbytes(model_dir, tokenizer, chat_ids, tmp_path):
    """NF4 on both sides: Quiver's LoRA rows equal PEFT over transformers-bitsandbytes
    (PEFT's own cached generate is right for LoRA)."""
    from peft import PeftModel

    from tests.peft_factory import make_peft_adapter

    path = make_peft_adapter(hf_model(model_dir, "none"), "lora", tmp_path, seed=5, perturb_scale=0.02,
                             target_modules="all-linear", use_rslora=True)
    peft = PeftModel.from_pretrained(hf_model(model_dir, "nf4"), str(path)).eval()
    got = quiver_greedy(model_dir, tokenizer, "nf4", [(chat_ids[1], "lora")], {"lora": path})
    assert got[0] == hf_greedy(peft, chat_ids[1])


def test_generate_cli_applies_adapter(model_dir, tmp_path):
    """`quiver generate --adapter DIR` changes the output exactly as the adapter does in PEFT."""
    from peft import PeftModel

    from tests.peft_factory import make_peft_adapter
    from tests.quiver_factory import peft_greedy

    base = hf_model(model_dir, "none")
    path = make_peft_adapter(base, "lora", tmp_path, seed=3, perturb_scale=0.02,
                             target_modules="all-linear")
    out = subprocess.run(
        [sys.executable, "-m", "runtime.cli", "generate", "--quantize", "none", "--json",
         "--max-new-tokens", "12", "--adapter", str(path), "The weather today is"],
        capture_output=True, text=True, timeout=600, check=True)
    tokens = json.loads(out.stdout.strip().splitlines()[-1])["tokens"]
    ids = load_tokenizer(model_dir)("The weather today is")["input_ids"]
    peft = PeftModel.from_pretrained(base, str(path)).eval()
    expected = peft_greedy(peft, ids, 12)
    eos = set(load_model_config(model_dir).eos_token_ids)
    cut = next((i + 1 for i, t in enumerate(expected) if t in eos), len(expected))
    assert tokens == expected[:cut]
