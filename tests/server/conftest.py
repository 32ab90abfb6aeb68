"""A real Quiver server on loopback, built in-process on a tiny random base, with PEFT-made
adapters of every type in its adapter directory, and the PEFT references for them.

    tiny_model_dir   tiny Llama + word-level tokenizer saved as an HF directory (load_base reads it)
    adapter_dir      16 adapters (LoRA, DoRA, AdaLoRA, prompt, p-tuning, prefix), ids nested or flat
    server           QuiverServer on 127.0.0.1:<free port>, quantize none / float32 (exact parity
                     with PEFT's fp32), 8 device slots for 16 adapters (eviction in play),
                     small max_batch_tokens (chunked prefill in play)
    client           QuiverClient on it
    peft_ref         (adapter id, prompt ids, n) -> PEFT's greedy continuation
"""
from __future__ import annotations

import functools
import time
from pathlib import Path

import pytest

import runtime.server.stubs  # noqa: F401 - builds the gRPC stubs if missing or stale
from runtime.config import ServerConfig
from tests.peft_factory import load_peft_model, make_peft_adapter, make_tiny_model, make_tiny_tokenizer
from tests.quiver_factory import peft_greedy

#: adapter id -> (PEFT kind, options). Ids with a "/" live in a subdirectory of the adapter dir.
ADAPTERS = {
    "lora-qv": ("lora", {}),
    "team-a/lora-all": ("lora", dict(target_modules="all-linear", r=8, lora_alpha=16)),
    "lora-rslora": ("lora", dict(target_modules=["q_proj", "up_proj"], use_rslora=True, r=8)),
    "lora-bias": ("lora", dict(target_modules=["q_proj", "down_proj"], lora_bias=True)),
    "lora-embedding": ("lora", dict(target_modules=["embed_tokens", "q_proj"])),
    "lora-layer1": ("lora", dict(target_modules=["q_proj", "v_proj", "down_proj"], layers_to_transform=[1],
                                 layers_pattern="layers")),
    "team-a/dora-all": ("lora", dict(target_modules="all-linear", use_dora=True)),
    "dora-qv": ("lora", dict(use_dora=True)),
    "adalora-a": ("adalora", dict(target_modules=["q_proj", "v_proj", "gate_proj"])),
    "team-b/adalora-b": ("adalora", {}),
    "prompt-4": ("prompt_tuning", dict(num_virtual_tokens=4)),
    "team-b/prompt-6": ("prompt_tuning", dict(num_virtual_tokens=6)),
    "ptuning-mlp": ("p_tuning", dict(encoder_reparameterization_type="MLP")),
    "ptuning-lstm": ("p_tuning", dict(encoder_reparameterization_type="LSTM")),
    "prefix-3": ("prefix_tuning", dict(num_virtual_tokens=3)),
    "team-c/prefix-proj": ("prefix_tuning", dict(prefix_projection=True, encoder_hidden_size=32)),
}
#: preloaded at start-up; the others are loaded lazily by the first request that names them
PRELOAD = [a for i, a in enumerate(ADAPTERS) if i % 2 == 0]
#: adapters made outside the adapter dir, under an --allow-adapter-root (LoadAdapter sources)
EXTRA = {"extra-lora": ("lora", dict(target_modules=["q_proj", "o_proj"])),
         "extra-prefix": ("prefix_tuning", {})}


def words(ids) -> str:
    """The tiny tokenizer's text for token ids (word-level: w1 ... w127)."""
    return " ".join(f"w{i}" for i in ids)


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


@pytest.fixture(scope="session")
def tiny_hf():
    return make_tiny_model("llama", seed=0)


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_hf, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tiny-model")
    tiny_hf.save_pretrained(str(d))
    make_tiny_tokenizer(d)
    return d


def _make_adapters(base, root: Path, specs: dict, seed0: int) -> dict[str, Path]:
    paths = {}
    for i, (adapter_id, (kind, opts)) in enumerate(specs.items()):
        made = make_peft_adapter(base, kind, root / f".build-{i}", seed=seed0 + i, **opts)
        target = root / adapter_id
        target.parent.mkdir(parents=True, exist_ok=True)
        made.rename(target)
        paths[adapter_id] = target
    return paths


@pytest.fixture(scope="session")
def adapter_dir(tiny_hf, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("adapters")
    _make_adapters(tiny_hf, root, ADAPTERS, seed0=10)
    return root


@pytest.fixture(scope="session")
def extra_root(tiny_hf, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("extra-root")
    _make_adapters(tiny_hf, root, EXTRA, seed0=100)
    return root


@pytest.fixture(scope="session")
def peft_ref(tiny_hf, adapter_dir, extra_root):
    """(adapter id, prompt ids, n) -> PEFT's greedy token ids ("" = the plain HF base)."""

    @functools.lru_cache(maxsize=None)
    def model(adapter_id: str):
        if not adapter_id:
            return tiny_hf
        path = adapter_dir / adapter_id if adapter_id in ADAPTERS else extra_root / adapter_id
        return load_peft_model(tiny_hf, path)

    @functools.lru_cache(maxsize=None)
    def ref(adapter_id: str, ids: tuple[int, ...], n: int) -> list[int]:
        return peft_greedy(model(adapter_id), list(ids), n)

    return ref


def server_config(model_dir: Path, **overrides) -> ServerConfig:
    base = dict(model=str(model_dir), quantize="none", dtype="float32", device="cpu", port=0,
                metrics_port=0, max_device_adapters=8, max_lora_rank=8, max_batch_tokens=32,
                kv_cache_tokens=8192, grace_period_s=10, grpc_workers=64)
    return ServerConfig(**{**base, **overrides})


@pytest.fixture(scope="session")
def server(tiny_model_dir, adapter_dir, extra_root):
    from runtime.server.app import build_server

    cfg = server_config(tiny_model_dir, adapter_dir=str(adapter_dir),
                        allow_adapter_roots=[str(extra_root)], preload=PRELOAD)
    srv = build_server(cfg).start()
    yield srv
    srv.shutdown(grace_s=5)


@pytest.fixture
def client(server):
    from runtime.server.client import QuiverClient

    with QuiverClient(server.address, timeout=120) as q:
        yield q
