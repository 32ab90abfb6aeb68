"""Real servers with fine-tuning on (a --data-dir), on the tiny random chat model of tests/http,
and a small task it can learn in a second: each prompt's two-word answer, memorised.

    learn_rows      chat rows {"messages": [user "wA wB wC", assistant "wX wY"]}
    start           build_server(...).start() with a data dir, an adapter dir and the admin token
    openai_for      the official openai client on a server (admin token, no retries)
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from tests.fixtures import one_thread  # noqa: F401  (autouse: every test here)
from tests.http.conftest import ADMIN, BASE_ID, CHAT_TEMPLATE  # noqa: F401 - shared names
from tests.peft_factory import make_tiny_model, make_tiny_tokenizer
from tests.server.conftest import server_config

#: OpenAI's hyperparameters that make the tiny task learn (measured: 8 / 8 rows recalled; lr 1e-2;
#: at 3e-2 the tiny model's loss stalls) in ~0.4 s of training
FAST = dict(hyperparameters={"n_epochs": 40, "batch_size": 4, "learning_rate_multiplier": 1e-2 / 3e-3})


@pytest.fixture(scope="session")
def chat_model_dir(tmp_path_factory) -> Path:
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("tiny-chat-model")
    make_tiny_model("llama", seed=0).save_pretrained(str(d))
    make_tiny_tokenizer(d)
    tok = AutoTokenizer.from_pretrained(d)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(str(d))
    return d


def learn_rows(n: int = 8, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, x = rng.randrange(10, 60), rng.randrange(60, 120)
        rows.append({"messages": [{"role": "user", "content": f"w{a} w{a + 1} w{a + 2}"},
                                  {"role": "assistant", "content": f"w{x} w{x + 3}"}]})
    return rows


def jsonl(rows: list) -> bytes:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows).encode()


def start(model_dir: Path, data_dir: Path, adapter_dir: Path | None = None, **overrides):
    from runtime.server.app import build_server

    cfg = server_config(model_dir, http_port=0, served_model_name=BASE_ID, admin_token=ADMIN,
                        data_dir=str(data_dir), adapter_dir=str(adapter_dir) if adapter_dir else None,
                        max_lora_rank=8, **overrides)
    return build_server(cfg).start()


def openai_for(server, token: str = ADMIN):
    import openai

    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.http_port}/v1", api_key=token, max_retries=0,
                         timeout=60)


def wait_for(client, job_id: str, statuses=("succeeded", "failed", "cancelled"), timeout_s: float = 60):
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in statuses:
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} still {job.status} after {timeout_s} s")
