"""Errors as the openai client's own exceptions, bad bodies, the model listing and vLLM's
adapter routes under the admin token, on the shared HTTP server."""
from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.http.conftest import ADMIN, BASE_ID, TYPES

pytestmark = pytest.mark.slow
USER = [{"role": "user", "content": "w5 w6"}]


def root(server) -> str:
    return f"http://127.0.0.1:{server.http_port}"


def still_serving(server, client) -> None:
    assert httpx.get(root(server) + "/health").status_code == 200
    r = client.completions.create(model=BASE_ID, prompt="w3", max_tokens=2, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length")


def test_unknown_model_is_not_found(openai_client):
    with pytest.raises(openai.NotFoundError) as e:
        openai_client.chat.completions.create(model="no-such-adapter", messages=USER)
    assert e.value.code == "model_not_found" and e.value.param == "model"
    assert "no-such-adapter" in e.value.message


@pytest.mark.parametrize("extra,param", [
    (dict(tools=[{"type": "function", "function": {"name": "f"}}]), "tools"),
    (dict(response_format={"type": "json_object"}), "response_format"),
    (dict(logit_bias={"5": 10}), "logit_bias"),
    (dict(audio={"voice": "alloy", "format": "mp3"}), "audio"),
    (dict(max_tokens="5"), "max_tokens"),
    (dict(temperature=-1), "temperature"),
    (dict(top_p=0), "top_p"),
    (dict(n=17), "n"),
    (dict(top_logprobs=3), "top_logprobs"),
    (dict(presence_penalty=3), "presence_penalty"),
    (dict(max_tokens=10**6), "max_tokens"),
    (dict(stop=["x"] * 17), "stop"),
    (dict(extra_body={"best_of": 3}), "best_of"),
    (dict(extra_body={"temprature": 0.5}), "temprature"),
    (dict(extra_body={"min_tokens": 9, "max_tokens": 3}), "min_tokens"),
])
def test_bad_parameters_are_bad_requests_naming_the_field(openai_client, extra, param):
    with pytest.raises(openai.BadRequestError) as e:
        openai_client.chat.completions.create(**{"model": BASE_ID, "messages": USER, **extra})
    assert e.value.param == param, e.value.message
    assert e.value.status_code == 400


@pytest.mark.parametrize("messages,param", [
    ([{"role": "tool", "content": "w5", "tool_call_id": "x"}], "messages[0].tool_call_id"),
    ([{"role": "tool", "content": "w5"}], "messages[0].role"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "messages[0].content[0].type"),
    ([], "messages"),
])
def test_unsupported_messages(openai_client, messages, param):
    with pytest.raises(openai.BadRequestError) as e:
        openai_client.chat.completions.create(model=BASE_ID, messages=messages)
    assert e.value.param == param, e.value.message


def test_neutral_values_of_unsupported_fields_are_accepted(openai_client):
    r = openai_client.chat.completions.create(model=BASE_ID, messages=USER, max_tokens=2,
                                              response_format={"type": "text"}, user="u-1",
                                              tools=[], store=False, temperature=0)
    assert r.choices[0].message.content is not None


@pytest.mark.parametrize("raw,status", [
    (b"{not json", 400), (b"[1, 2]", 400), (b"", 400), (b"\xff\xfe", 400), (b'{"model": 5}', 400),
    (b'{"model": "tiny-base", "prompt": {"a": 1}}', 400),
    (b'{"model": "tiny-base", "prompt": "w1", "max_tokens": 1e400}', 400),
    (b'{"model": "tiny-base", "prompt": [[[1]]]}', 400),
    (b"[" * 50000 + b"]" * 50000, 400),
    (b'{"model": "tiny-base", "prompt": "' + b"w1 " * 2_000_000 + b'"}', 413),
])
def test_bad_bodies_never_take_the_server_down(http_server, openai_client, raw, status):
    r = httpx.post(root(http_server) + "/v1/completions", content=raw, timeout=60,
                   headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    still_serving(http_server, openai_client)


def test_prompt_over_max_input_chars_is_400(openai_client, http_server):
    chars = http_server.cfg.max_input_chars
    with pytest.raises(openai.BadRequestError) as e:
        openai_client.completions.create(model=BASE_ID, prompt="w1 " * (chars // 3 + 1), max_tokens=1)
    assert "max-input-chars" in e.value.message


def test_unknown_route_and_method_are_openai_errors(http_server):
    r = httpx.get(root(http_server) + "/v1/nope")
    assert r.status_code == 404 and "error" in r.json()
    assert httpx.get(root(http_server) + "/v1/completions").status_code == 405


def test_models_lists_base_then_loaded_and_loadable_adapters(openai_client, http_server):
    cards = openai_client.models.list().data
    assert cards[0].id == BASE_ID and cards[0].parent is None
    ids = [c.id for c in cards]
    assert set(TYPES.values()) <= set(ids)  # preloaded and merely loadable ones alike
    for c in cards[1:]:
        assert c.parent == BASE_ID and c.owned_by == "quiver" and c.created > 0
        assert c.model_extra["root"]
    assert len(ids) == len(set(ids))


def admin_post(server, route: str, body: dict, token: str | None = ADMIN) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.post(root(server) + route, json=body, headers=headers, timeout=60)


def test_adapter_routes_need_the_admin_token(http_server):
    body = {"lora_name": "x", "lora_path": "x"}
    for token in (None, "wrong"):
        r = admin_post(http_server, "/v1/load_lora_adapter", body, token)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert admin_post(http_server, "/v1/unload_lora_adapter", {"lora_name": "x"}, None).status_code == 401


@pytest.mark.parametrize("name", ["extra-lora", "extra-prefix"])
def test_load_serve_unload_through_vllm_routes(http_server, http_extra_root, openai_client, grpc_client, name):
    path = str(http_extra_root / name)
    r = admin_post(http_server, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})
    assert r.status_code == 200 and name in r.text
    assert admin_post(http_server, "/v1/load_lora_adapter",
                      {"lora_name": name, "lora_path": path}).status_code == 400  # duplicate
    got = openai_client.completions.create(model=name, prompt="w4 w5", max_tokens=4, temperature=0)
    want = grpc_client.generate("w4 w5", name, max_new_tokens=4)
    assert got.choices[0].text == want.text
    assert name in [c.id for c in openai_client.models.list().data]
    assert admin_post(http_server, "/v1/unload_lora_adapter", {"lora_name": name}).status_code == 200
    assert admin_post(http_server, "/v1/unload_lora_adapter", {"lora_name": name}).status_code == 404
    with pytest.raises(openai.NotFoundError):
        openai_client.completions.create(model=name, prompt="w4", max_tokens=1)


def test_load_is_confined_to_the_allowed_roots(http_server, tmp_path):
    for path in ("/etc", str(tmp_path), "../../etc"):
        r = admin_post(http_server, "/v1/load_lora_adapter", {"lora_name": "evil", "lora_path": path})
        assert r.status_code == 400, r.text
        assert "outside the allowed adapter roots" in r.json()["error"]["message"]
    r = admin_post(http_server, "/v1/load_lora_adapter", {"lora_name": "../x", "lora_path": "lora-qv"})
    assert r.status_code == 400
    assert admin_post(http_server, "/v1/load_lora_adapter", {"lora_name": "y"}).status_code == 400


def test_streaming_wire_format(http_server):
    body = {"model": TYPES["p_tuning"], "messages": USER, "max_tokens": 3, "stream": True,
            "temperature": 0, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", root(http_server) + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = "".join(r.iter_text())
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1])
    assert payloads[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(p["object"] == "chat.completion.chunk" and p["usage"] is None for p in payloads[:-1])
    assert payloads[-1]["usage"]["completion_tokens"] >= 1 and payloads[-1]["choices"] == []


def test_health_and_metrics_are_open(http_server):
    assert httpx.get(root(http_server) + "/health").json() == {"status": "ok"}
    text = httpx.get(root(http_server) + "/metrics").text
    for name in ("quiver_requests_total", "vllm:num_requests_waiting", "vllm:num_requests_running",
                 "vllm:kv_cache_usage_perc", "vllm:lora_requests_info"):
        assert name in text
