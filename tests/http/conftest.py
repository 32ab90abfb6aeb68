"""A real Quiver server with its HTTP port on loopback, on a tiny random base with a chat
template, an adapter of every PEFT type, and the official `openai` client pointed at it.

    http_server     QuiverServer (gRPC + HTTP on free ports), fp32 unquantized: exact PEFT parity
    openai_client   openai.OpenAI on it (no retries: a 429 must surface, not be retried away)
    grpc_client     QuiverClient on the same server (the parity side)
    peft_ref        (adapter id, prompt ids, n) -> PEFT's greedy continuation

One server per session for the parity and protocol tests; tests that need other settings
(tokens, a tiny queue) build their own small one with `start_server`.
"""
from __future__ import annotations

import functools
from pathlib import Path

import pytest

import runtime.server.stubs  # noqa: F401 - builds the gRPC stubs if missing or stale
from tests.peft_factory import load_peft_model, make_tiny_model, make_tiny_tokenizer
from tests.quiver_factory import peft_greedy
from tests.server.conftest import ADAPTERS, EXTRA, _make_adapters, server_config

#: one adapter of every type Quiver serves (ids and PEFT options from tests/server)
TYPES = {"lora": "lora-qv", "dora": "dora-qv", "adalora": "adalora-a", "prompt_tuning": "prompt-4",
         "p_tuning": "ptuning-mlp", "prefix_tuning": "prefix-3", "nested_lora": "team-a/lora-all"}
HTTP_ADAPTERS = {a: ADAPTERS[a] for a in TYPES.values()}
ADMIN = "admin-secret-token"
#: a chat template the word-level tiny tokenizer can encode: role markers are words w1..w3
CHAT_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'system' %}w1 {% elif m['role'] == 'user' %}"
                 "w2 {% else %}w3 {% endif %}{{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}w3{% endif %}")
BASE_ID = "tiny-base"


@pytest.fixture(scope="session")
def http_hf():
    return make_tiny_model("llama", seed=0)


@pytest.fixture(scope="session")
def chat_model_dir(http_hf, tmp_path_factory) -> Path:
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("tiny-chat-model")
    http_hf.save_pretrained(str(d))
    make_tiny_tokenizer(d)
    tok = AutoTokenizer.from_pretrained(d)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(str(d))
    return d


@pytest.fixture(scope="session")
def http_adapter_dir(http_hf, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("http-adapters")
    _make_adapters(http_hf, root, HTTP_ADAPTERS, seed0=10)
    return root


@pytest.fixture(scope="session")
def http_extra_root(http_hf, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("http-extra")
    _make_adapters(http_hf, root, EXTRA, seed0=100)
    return root


def start_server(model_dir: Path, **overrides):
    from runtime.server.app import build_server

    cfg = server_config(model_dir, http_port=0, served_model_name=BASE_ID, **overrides)
    return build_server(cfg).start()


@pytest.fixture(scope="session")
def http_server(chat_model_dir, http_adapter_dir, http_extra_root):
    srv = start_server(chat_model_dir, adapter_dir=str(http_adapter_dir),
                       allow_adapter_roots=[str(http_extra_root)], admin_token=ADMIN,
                       preload=["lora-qv", "prompt-4"])
    yield srv
    srv.shutdown(grace_s=5)


def base_url(server) -> str:
    return f"http://127.0.0.1:{server.http_port}/v1"


@pytest.fixture(scope="session")
def openai_client(http_server):
    import openai

    with openai.OpenAI(base_url=base_url(http_server), api_key="unused", max_retries=0, timeout=60) as c:
        yield c


@pytest.fixture(scope="session")
def grpc_client(http_server):
    from runtime.server.client import QuiverClient

    with QuiverClient(http_server.address, timeout=60, token=ADMIN) as q:
        yield q


@pytest.fixture(scope="session")
def peft_ref(http_hf, http_adapter_dir):
    """(adapter id, prompt ids, n) -> PEFT's greedy token ids ("" = the plain HF base)."""

    @functools.lru_cache(maxsize=None)
    def model(adapter_id: str):
        return http_hf if not adapter_id else load_peft_model(http_hf, http_adapter_dir / adapter_id)

    @functools.lru_cache(maxsize=None)
    def ref(adapter_id: str, ids: tuple[int, ...], n: int) -> list[int]:
        return peft_greedy(model(adapter_id), list(ids), n)

    return ref
