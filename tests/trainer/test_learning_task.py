"""A real learning task: invented facts the base model cannot know, asked in new phrasings.

tests/data/facts_train.jsonl holds 24 made-up facts (capitals of fictional countries, inventors of
fictional devices, home planets of fictional species), each asked three ways; facts_test.jsonl
asks each of them two other ways. QLoRA on the embedded SmolLM2-135M-Instruct (NF4 base,
chat template) must answer >= 80% of the held-out questions exactly, where the base answers none;
checked by the trainer's greedy-equivalent exact match, by the server's own engine, and over gRPC:
the adapter hot-loaded (LoadAdapter) into a real server on the same base, asked held-out questions.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from runtime.adapters.registry import AdapterRegistry
from runtime.config import ServerConfig
from runtime.models.embedded import embedded_model_dir
from tests.quiver_factory import QuiverStack
from trainer import TrainConfig
from trainer.loop import Trainer

DATA = Path(__file__).parents[1] / "data"

#: Held-out rows asked over gRPC come from these three groups: capitals, inventors, home planets.
GRPC_GROUPS = (range(0, 16), range(16, 32), range(32, 48))

#: Measured: held-out exact match 97.9% / 95.8% / 97.9% for seeds 0 / 1 / 2 (2 epochs: 60-65%;
#: batch 8 at lr 5e-3: 67-88%). 54 steps, ~3.5 s each on one busy core.
SETTINGS = dict(method="lora", rank=16, targets="all-linear", lr=3e-3, epochs=3, batch_size=4, seed=0)


@pytest.mark.slow
def test_lora_learns_invented_facts(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a shared 2-core machine, one thread beats two contended ones
    try:
        trainer = Trainer(TrainConfig(data=str(DATA / "facts_train.jsonl"), eval_data=str(DATA / "facts_test.jsonl"),
                                      output=str(tmp_path / "facts"), model=str(embedded_model_dir()),
                                      progress=False, **SETTINGS))
        trainer.setup()
        _, base_accuracy = trainer.evaluate()  # slot 0 starts as the base model (B = 0)
        out = trainer.train()
        trainer.cleanup()
        assert base_accuracy <= 0.05
        assert trainer.summary.eval_accuracy >= 0.8, trainer.eval_history
        accuracy, right = _served_accuracy(trainer.base, out)
        assert accuracy >= 0.8
        # Over gRPC, hot-loaded: the first question of each group that the in-process engine
        # answered right gets that right answer (which rows are right moves with the numerics
        # of training, so the rows are picked from the engine's own results).
        rows = _test_rows()
        questions = [rows[next(i for i in group if i in right)] for group in GRPC_GROUPS]
        assert _grpc_answers(trainer.base, out, [m[0]["content"] for m in questions]) == \
            [m[1]["content"] for m in questions]
    finally:
        torch.set_num_threads(threads)


def _served_accuracy(base, adapter_dir: Path) -> tuple[float, set[int]]:
    """Greedy answers of the serving engine (KV cache, adapter hot-loaded into a slot): the
    exact-match accuracy and the rows answered right."""
    stack = QuiverStack(base.model, AdapterRegistry(base.model, 2, 16), base.config)
    stack.load("facts", adapter_dir)
    tok = base.tokenizer
    rows = _test_rows()
    prompts = [(tok.apply_chat_template(m[:1], add_generation_prompt=True, tokenize=True, return_dict=False),
                "facts") for m in rows]
    outputs = stack.greedy(stack.engine(tok), prompts, n=8)
    answers = [tok.decode(ids).split("<|im_end|>")[0].strip() for ids in outputs]
    right = {i for i, (a, m) in enumerate(zip(answers, rows)) if a == m[1]["content"]}
    return len(right) / len(rows), right


def _test_rows() -> list[list[dict]]:
    return [json.loads(line)["messages"] for line in (DATA / "facts_test.jsonl").read_text().splitlines()]


def _grpc_answers(base, adapter_dir: Path, questions: list[str]) -> list[str]:
    """A real server on the already loaded base (no second NF4 load): LoadAdapter from the
    trainer's output dir, then the questions as chat messages, all in flight at once."""
    from runtime.server.app import build_server
    from runtime.server.client import QuiverClient

    # the slot shape _served_accuracy's registry allocated, so the model's slot tensors are reused
    cfg = ServerConfig(model=str(embedded_model_dir()), port=0, metrics_port=None, max_device_adapters=2,
                       max_lora_rank=16, kv_cache_tokens=4096, allow_adapter_roots=[str(adapter_dir.parent)])
    server = build_server(cfg, base=base).start()
    try:
        with QuiverClient(server.address, timeout=300) as q:
            q.load_adapter("facts", source=str(adapter_dir))
            futures = [q.generation.Generate.future(q.request(adapter_id="facts", messages=[("user", text)],
                                                              max_new_tokens=16)) for text in questions]
            return [f.result().text.strip() for f in futures]
    finally:
        server.shutdown(grace_s=5)
