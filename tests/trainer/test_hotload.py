"""Train with `quiver train`, hot-load the result into a running server over gRPC, get the trained answer.

The whole user story on a tiny random Llama, through the real entry points only:

    quiver serve                       a QuiverServer on loopback (fp32, no quantization: exact)
    quiver train --method lora ...     while it serves: text rows, output inside its --adapter-dir
    quiver adapters load ID            LoadAdapter over gRPC
    quiver train --method prefix ...   chat rows, output under an --allow-adapter-root
    QuiverClient.load_adapter(ID, source=DIR)
    Generate / GenerateStream          greedy: exactly the trained answer, then EOS

Each adapter answers the same prompts differently (LoRA from text rows, prefix tuning from chat
rows) and the base answers neither, so one greedy reply says which weights produced it; the last
test holds the engine until base, LoRA and prefix requests are all queued, so they run in one batch.

The base is built with initializer_range 0.2 (HF's default 0.02 leaves a tiny model's logits so
flat that no adapter can push the loss much below ln(vocab); 0.2 lets a few dozen steps memorise
with wide greedy margins). Its EOS is w3, which is also the chat template's end-of-turn word, so
the trainer learns to end each answer and the server stops there by itself (STOP_REASON_EOS_TOKEN).
"""
from __future__ import annotations

import contextlib
import io
import json
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch

import runtime.server.stubs  # noqa: F401 - builds the gRPC stubs if missing or stale
from runtime.cli import main
from runtime.server.stubs import adapters_pb2 as apb
from runtime.server.stubs import generation_pb2 as gpb
from tests.peft_factory import make_tiny_model, make_tiny_tokenizer
from tests.server.conftest import server_config, wait_until
from tests.trainer.conftest import TINY_CHAT_TEMPLATE, write_jsonl

pytestmark = pytest.mark.slow  # a real server and two real training runs: 10-15 s on 2 busy cores

EOS = 3  # "w3": the tiny chat template's end-of-turn marker, made the tokenizer's and model's EOS
LORA_ID = "trained/lora-facts"  # inside the server's --adapter-dir
PREFIX_ID = "prefix-facts"  # under an --allow-adapter-root, loaded by explicit source
#: prompt -> (LoRA's answer, prefix tuning's answer): words the random base does not produce
ANSWERS = {
    "w10 w11 w12": ("w50 w61 w72 w83", "w100 w90 w80"),
    "w20 w21": ("w97 w13 w44 w5", "w7 w7 w8 w9 w6"),
    "w30 w31 w32 w33": ("w77 w66 w55 w44", "w123 w4 w121"),
    "w40": ("w8 w9 w120 w6", "w60 w61 w62 w63"),
}
#: flags shared by both runs: the server's base, exact fp32, no bar
COMMON = ["--quantize", "none", "--dtype", "float32", "--device", "cpu", "--batch-size", "4", "--no-progress"]
#: measured: LoRA train loss 6.3 -> 0.02 in 40 steps, prefix 6.5 -> 0.12 in 100 (~2 s each)
LORA_FLAGS = ["--method", "lora", "--rank", "4", "--max-steps", "40", "--lr", "1e-2"]
PREFIX_FLAGS = ["--method", "prefix", "--num-virtual-tokens", "8", "--max-steps", "100", "--lr", "1e-1"]


@dataclass
class Hot:
    base_dir: Path
    adapter_dir: Path
    elsewhere: Path  # an --allow-adapter-root outside the adapter dir
    data: Path
    server: object
    client: object


@pytest.fixture(scope="module")
def hot(tmp_path_factory):
    from runtime.server.app import build_server
    from runtime.server.client import QuiverClient

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the conftest's one_thread is per test; training here runs before it
    root = tmp_path_factory.mktemp("hotload")
    base_dir = _tiny_base(root / "base")
    adapter_dir, elsewhere, data = root / "adapters", root / "elsewhere", root / "data"
    for d in (adapter_dir, elsewhere, data):
        d.mkdir()
    cfg = server_config(base_dir, adapter_dir=str(adapter_dir), allow_adapter_roots=[str(elsewhere)],
                        max_batch_tokens=256)
    server = build_server(cfg).start()
    try:
        with QuiverClient(server.address, timeout=120) as client:
            yield Hot(base_dir, adapter_dir, elsewhere, data, server, client)
    finally:
        server.shutdown(grace_s=5)
        torch.set_num_threads(threads)


def _tiny_base(path: Path) -> Path:
    make_tiny_model("llama", seed=0, initializer_range=0.2, eos_token_id=EOS).save_pretrained(path)
    make_tiny_tokenizer(path)
    config_path = path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.update(chat_template=TINY_CHAT_TEMPLATE, eos_token=f"w{EOS}")
    config_path.write_text(json.dumps(config))
    return path


def _quiver_train(hot: Hot, flags: list[str], rows: list[dict], output: Path) -> Path:
    """`quiver train` through the real command line; returns the adapter directory it wrote."""
    data = write_jsonl(hot.data / f"{output.name}.jsonl", rows)
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(["train", *flags, "--data", str(data), "--output", str(output), "--model", str(hot.base_dir),
                     *COMMON])
    assert code == 0 and stdout.getvalue().strip() == str(output)  # it prints where it wrote
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in output.iterdir()}
    return output


@pytest.fixture(scope="module")
def lora_dir(hot) -> Path:
    """Trained while the server runs, into its adapter dir; nothing has asked for it, so it is not loaded."""
    rows = [{"prompt": p, "completion": lora} for p, (lora, _) in ANSWERS.items()]
    return _quiver_train(hot, LORA_FLAGS, rows, hot.adapter_dir / LORA_ID)


@pytest.fixture(scope="module")
def prefix_dir(hot) -> Path:
    rows = [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": prefix}]}
            for p, (_, prefix) in ANSWERS.items()]
    return _quiver_train(hot, PREFIX_FLAGS, rows, hot.elsewhere / PREFIX_ID)


def _ask(client, prompt: str, adapter_id: str = "", chat: bool = False, **kw):
    where = dict(messages=[("user", prompt)]) if chat else dict(text=prompt)
    return client.request(adapter_id=adapter_id, max_new_tokens=12, return_token_ids=True, **where, **kw)


def _ids(text: str) -> list[int]:
    return [int(w[1:]) for w in text.split()]


def _check_answer(resp: gpb.GenerateResponse, expected: str) -> None:
    """Exactly the trained words, then the trained EOS (which the text leaves out)."""
    assert ([t.id for t in resp.tokens], resp.text.strip()) == (_ids(expected) + [EOS], expected)
    assert resp.stop_reason == gpb.STOP_REASON_EOS_TOKEN


def _unary_and_stream(client, prompt: str, adapter_id: str, chat: bool = False) -> gpb.GenerateResponse:
    """The unary answer, after checking the stream says the same, token for token."""
    req = _ask(client, prompt, adapter_id, chat)
    unary = client.generation.Generate(req, timeout=120)
    chunks = list(client.generation.GenerateStream(req, timeout=120))
    assert [t.id for c in chunks for t in c.tokens] == [t.id for t in unary.tokens]
    assert "".join(c.text for c in chunks) == unary.text
    assert chunks[-1].stop_reason == unary.stop_reason
    return unary


def _base_answers(client) -> dict[str, tuple[list[int], list[int]]]:
    """prompt -> (greedy ids for the text prompt, for the chat prompt) from the base model."""
    answers = {}
    for prompt in ANSWERS:
        text, chat = (client.generation.Generate(_ask(client, prompt, chat=c), timeout=120) for c in (False, True))
        answers[prompt] = ([t.id for t in text.tokens], [t.id for t in chat.tokens])
    return answers


def _listed(client) -> dict[str, apb.AdapterInfo]:
    return {a.adapter_id: a for a in client.list_adapters()}


def test_lora_from_quiver_train_hot_loads_with_quiver_adapters_load(hot, lora_dir, capsys):
    client = hot.client
    before = _base_answers(client)
    for prompt, (lora, prefix) in ANSWERS.items():  # the base knows none of the answers
        assert before[prompt][0][:len(_ids(lora))] != _ids(lora)
        assert before[prompt][1][:len(_ids(prefix))] != _ids(prefix)
    assert LORA_ID not in _listed(client)

    capsys.readouterr()
    assert main(["adapters", "load", LORA_ID, "--server", hot.server.address, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["adapter_id"], info["type"], info["rank"]) == (LORA_ID, "ADAPTER_TYPE_LORA", 4)
    assert Path(info["source"]) == lora_dir.resolve()
    assert set(info["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                           "down_proj"}

    for prompt, (lora, _) in ANSWERS.items():
        _check_answer(_unary_and_stream(client, prompt, LORA_ID), lora)
    assert _listed(client)[LORA_ID].requests_served == 2 * len(ANSWERS)
    assert _base_answers(client) == before  # the base is served exactly as before


def test_prefix_from_quiver_train_hot_loads_from_an_allowed_root(hot, lora_dir, prefix_dir):
    client = hot.client
    with pytest.raises(grpc.RpcError) as unknown:  # not in the adapter dir: no lazy load can find it
        client.generation.Generate(_ask(client, "w40", PREFIX_ID, chat=True), timeout=120)
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND

    info = client.load_adapter(PREFIX_ID, source=str(prefix_dir))
    assert (info.type, info.num_virtual_tokens, info.rank) == (apb.ADAPTER_TYPE_PREFIX_TUNING, 8, 0)

    for prompt, (_, prefix) in ANSWERS.items():
        _check_answer(_unary_and_stream(client, prompt, PREFIX_ID, chat=True), prefix)
    # the LoRA loaded before still answers with its own training, beside the new adapter
    if LORA_ID not in _listed(client):
        client.load_adapter(LORA_ID)
    _check_answer(client.generation.Generate(_ask(client, "w20 w21", LORA_ID), timeout=120),
                  ANSWERS["w20 w21"][0])


def test_base_lora_and_prefix_answer_in_one_batch(hot, lora_dir, prefix_dir):
    client = hot.client
    listed = _listed(client)
    for adapter_id, source in ((LORA_ID, ""), (PREFIX_ID, str(prefix_dir))):
        if adapter_id not in listed:  # this test run alone
            client.load_adapter(adapter_id, source)
    base = _base_answers(client)

    jobs = [(prompt, adapter_id, chat) for prompt in ANSWERS
            for adapter_id, chat in (("", False), ("", True), (LORA_ID, False), (PREFIX_ID, True))]
    engine = hot.server.core.engine
    rows: list[int] = []  # requests in each engine step
    release = threading.Event()
    step = engine.step

    def gated_step():
        release.wait(30)
        stats = step()
        rows.append(stats.rows)
        return stats

    engine.step = gated_step  # the engine loop looks the method up on every step
    try:
        futures = [client.generation.Generate.future(_ask(client, p, a, c), timeout=120) for p, a, c in jobs]
        assert wait_until(lambda: engine.num_queued() == len(jobs), timeout=30)
        release.set()
        responses = [f.result() for f in futures]
    finally:
        release.set()
        del engine.step

    assert rows[0] == len(jobs)  # base, LoRA and prefix rows all in the first step
    for (prompt, adapter_id, chat), resp in zip(jobs, responses):
        if adapter_id == LORA_ID:
            _check_answer(resp, ANSWERS[prompt][0])
        elif adapter_id == PREFIX_ID:
            _check_answer(resp, ANSWERS[prompt][1])
        else:
            assert [t.id for t in resp.tokens] == base[prompt][chat]
