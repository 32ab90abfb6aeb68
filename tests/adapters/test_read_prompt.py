"""read_adapter on prompt tuning, p-tuning and prefix tuning adapters made by PEFT.

Oracle: PEFT's `get_prompt(batch_size=1)`, both on the model that made the adapter (which runs the
p-tuning encoder / prefix projection) and on PEFT's reload of the saved directory.
"""
from __future__ import annotations

import pytest
import torch

from runtime.adapters.peft_format import read_adapter
from runtime.adapters.types import AdapterKind
from tests.peft_factory import (
    load_peft_model,
    make_peft_model,
    make_tiny_tokenizer,
    model_config,
    save_peft_model,
)

PROMPT_CASES = {
    "prompt_random": ("llama", "prompt_tuning", dict(num_virtual_tokens=5)),
    "p_tuning_mlp": ("llama", "p_tuning", dict(encoder_reparameterization_type="MLP")),
    "p_tuning_lstm": ("qwen2", "p_tuning", dict(encoder_reparameterization_type="LSTM", num_virtual_tokens=3)),
}
PREFIX_CASES = {
    "prefix": ("llama", dict(num_virtual_tokens=3)),
    "prefix_projection": ("llama", dict(prefix_projection=True, encoder_hidden_size=32)),
    "prefix_head_dim_32": ("llama_hd32", dict(num_virtual_tokens=2)),
    "prefix_qwen2_projection": ("qwen2", dict(prefix_projection=True, encoder_hidden_size=16)),
}


@pytest.mark.parametrize("case", PROMPT_CASES)
def test_prompt_embeddings_equal_peft(bases, tmp_path, case):
    base_name, kind, options = PROMPT_CASES[case]
    base = bases(base_name)
    peft_model = make_peft_model(base, kind, **options)
    path = save_peft_model(peft_model, tmp_path / kind)
    adapter = read_adapter(path, model_config(base))

    assert adapter.kind is AdapterKind.PROMPT and adapter.prefix is None and not adapter.lora
    assert adapter.peft_type == {"prompt_tuning": "PROMPT_TUNING", "p_tuning": "P_TUNING"}[kind]
    n = peft_model.peft_config["default"].num_virtual_tokens
    assert adapter.prompt.shape == (n, base.config.hidden_size) and adapter.num_virtual_tokens == n
    with torch.no_grad():
        made = peft_model.get_prompt(batch_size=1)[0]  # runs the p-tuning encoder
        reloaded = load_peft_model(base, path).get_prompt(batch_size=1)[0]
    torch.testing.assert_close(adapter.prompt, made, atol=1e-6, rtol=0)
    torch.testing.assert_close(adapter.prompt, reloaded, atol=0, rtol=0)


def test_prompt_tuning_text_init_is_the_texts_embeddings(bases, tmp_path):
    base = bases("llama")
    tokenizer = make_tiny_tokenizer(tmp_path / "tokenizer", vocab_size=base.config.vocab_size)
    options = dict(
        num_virtual_tokens=5,
        prompt_tuning_init="TEXT",
        prompt_tuning_init_text="w5 w17 w99",
        tokenizer_name_or_path=str(tokenizer),
    )
    peft_model = make_peft_model(base, "prompt_tuning", perturb=False, **options)
    adapter = read_adapter(save_peft_model(peft_model, tmp_path / "text"), model_config(base))
    ids = torch.tensor([5, 17, 99, 5, 17])  # the text's ids, tiled to num_virtual_tokens
    torch.testing.assert_close(adapter.prompt, base.model.embed_tokens.weight[ids].detach(), atol=0, rtol=0)


@pytest.mark.parametrize("case", PREFIX_CASES)
def test_prefix_kv_equals_peft_cache(bases, tmp_path, case):
    base_name, options = PREFIX_CASES[case]
    base = bases(base_name)
    mc = model_config(base)
    peft_model = make_peft_model(base, "prefix_tuning", **options)
    path = save_peft_model(peft_model, tmp_path / "prefix")
    adapter = read_adapter(path, mc)

    n = peft_model.peft_config["default"].num_virtual_tokens
    assert adapter.kind is AdapterKind.PREFIX and adapter.prompt is None
    assert adapter.prefix.shape == (mc.num_layers, 2, mc.num_kv_heads, n, mc.head_dim)
    assert adapter.num_virtual_tokens == n
    with torch.no_grad():
        made = peft_model.get_prompt(batch_size=1)  # runs the projection MLP if any
        reloaded = load_peft_model(base, path).get_prompt(batch_size=1)
    for layer in (0, mc.num_layers - 1):
        for cache, atol in ((made, 1e-6), (reloaded, 0)):
            keys, values = cache.layers[layer].keys[0], cache.layers[layer].values[0]  # [H_kv, N, hd]
            torch.testing.assert_close(adapter.prefix[layer, 0], keys, atol=atol, rtol=0)
            torch.testing.assert_close(adapter.prefix[layer, 1], values, atol=atol, rtol=0)


def test_max_virtual_tokens_default_leaves_room_for_a_token(bases, tmp_path):
    base = bases("llama")
    path = save_peft_model(make_peft_model(base, "prompt_tuning", num_virtual_tokens=6), tmp_path / "p")
    mc = model_config(base)
    assert read_adapter(path, mc, max_virtual_tokens=6).num_virtual_tokens == 6
    mc.max_position_embeddings = 7
    assert read_adapter(path, mc).num_virtual_tokens == 6
