"""A tiny random Llama saved as an HF directory (with a word-level tokenizer and a chat template),
and a small learnable dataset over its vocabulary: what every fast trainer test trains on."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from tests.fixtures import one_thread  # noqa: F401  (autouse: every test here)
from tests.peft_factory import make_tiny_model, make_tiny_tokenizer
from trainer import TrainConfig

#: Roles as marker words, so a rendered conversation is plain w-tokens for the tiny tokenizer.
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ 'w1' if m['role'] == 'user' else 'w2' }} {{ m['content'] }} w3 "
    "{% endfor %}{% if add_generation_prompt %}w2 {% endif %}"
)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """(HF model, its directory) for a tiny random Llama with tokenizer and chat template."""
    root = tmp_path_factory.mktemp("tiny-llama")
    hf = make_tiny_model("llama", seed=0)
    hf.save_pretrained(root)
    make_tiny_tokenizer(root)
    config_path = root / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = TINY_CHAT_TEMPLATE
    config_path.write_text(json.dumps(config))
    return hf, root


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """Counting sequences: "w(a) w(a+1) w(a+2)" -> "w(a+3) w(a+4)"; learnable in a few steps."""
    rng = random.Random(0)
    rows = []
    for _ in range(32):
        a = rng.randrange(4, 100)
        rows.append({"prompt": f"w{a} w{a + 1} w{a + 2}", "completion": f"w{a + 3} w{a + 4}"})
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", rows)


@pytest.fixture
def tiny_config(tiny, tiny_data, tmp_path):
    """TrainConfig factory on the tiny base: unquantized fp32, short, no progress bar."""
    _, model_dir = tiny

    def make(method: str, **overrides) -> TrainConfig:
        options = dict(method=method, data=str(tiny_data), output=str(tmp_path / method), model=str(model_dir),
                       quantize="none", dtype="float32", device="cpu", max_steps=10, batch_size=4,
                       lr=1e-2, progress=False)
        return TrainConfig(**{**options, **overrides})

    return make
