"""The Ray Serve application end to end on a real local Ray cluster (tests/ray/conftest.py): 2
Quiver replicas behind the ingress, 6 adapters in a real S3 server, the official openai client.

Order matters: the kill test follows those on the fixture's app; the last two run the app that
app_builder makes (`serve run`) in its place."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.http.conftest import BASE_ID
from tests.ray.conftest import (ADAPTERS, BUCKET, PREFIX, held, openai_at, replicas, wait_for_replicas)

pytestmark = pytest.mark.slow
GREEDY = dict(max_tokens=8, temperature=0, extra_body={"ignore_eos": True})


def ask(client, adapter_id: str, prompt: str = "w7 w8 w9", **kw) -> tuple[str, str, str | None]:
    """(text, the replica that answered, "1"/"0": it held the adapter before) through the ingress."""
    raw = client.completions.with_raw_response.create(model=adapter_id, prompt=prompt, **{**GREEDY, **kw})
    return (raw.parse().choices[0].text, raw.headers.get("x-quiver-replica"),
            raw.headers.get("x-quiver-adapter-resident"))


def test_adapters_spread_over_replicas_stick_to_holders_and_answer_as_one_quiver(quiver_app, single):
    app, one = openai_at(quiver_app), openai_at(single)
    first = {}
    for adapter_id in ADAPTERS:  # one at a time: each replica reports what it loaded (0.1 s)
        first[adapter_id] = ask(app, adapter_id)
        time.sleep(0.3)
    live = replicas(quiver_app)
    holders = {r["replica_id"]: held(r) for r in live}
    assert len(live) == 2 and all(holders.values()), f"the adapters did not spread: {holders}"
    assert any(sum(a in h for h in holders.values()) == 1 for a in ADAPTERS), \
        f"every replica loaded every adapter: routing ignored who held what ({holders})"

    later = {a: [ask(app, a, prompt) for prompt in ("w7 w8 w9", "w20 w21")] for a in ADAPTERS}
    for adapter_id, answers in later.items():
        for _, replica, resident in answers:
            assert adapter_id in holders[replica], f"{adapter_id} went to {replica}, which did not hold it"
            assert resident == "1"
    for adapter_id in ADAPTERS:
        reference = [ask(one, adapter_id, prompt)[0] for prompt in ("w7 w8 w9", "w20 w21")]
        assert [t for t, _, _ in later[adapter_id]] == reference
        assert first[adapter_id][0] == reference[0] and first[adapter_id][2] == "0"  # loaded by it
    assert ask(app, BASE_ID)[0] == ask(one, BASE_ID)[0]
    assert len({ask(app, BASE_ID)[0], *(first[a][0] for a in ADAPTERS)}) > 2, "adapters changed nothing"


def test_streaming_through_the_ingress(quiver_app, single):
    app = openai_at(quiver_app)
    stream = app.chat.completions.create(model=ADAPTERS[0], messages=[{"role": "user", "content": "w3 w4"}],
                                         stream=True, max_tokens=12, temperature=0,
                                         extra_body={"ignore_eos": True}, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[-1].usage.completion_tokens == 12
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    whole = openai_at(single).chat.completions.create(model=ADAPTERS[0], messages=[{"role": "user", "content": "w3 w4"}],
                                                      max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    assert text == whole.choices[0].message.content


def test_errors_come_from_the_routes_and_unreplicated_routes_say_so(quiver_app):
    import openai

    app = openai_at(quiver_app)
    with pytest.raises(openai.NotFoundError) as info:
        ask(app, "tenant-9/absent")
    assert info.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        ask(app, ADAPTERS[0], max_tokens=0)
    with pytest.raises(openai.APIStatusError) as info:
        app.files.list()
    assert info.value.status_code == 501
    assert BASE_ID in {m.id for m in app.models.list()}


def test_an_adapter_published_by_one_replica_is_served_by_the_other(quiver_app, adapter_sources, s3_endpoint):
    import httpx

    from runtime.server.client import QuiverClient
    from tests.s3_factory import s3_client

    r = httpx.post(f"{quiver_app}/v1/load_lora_adapter", timeout=60,
                   json={"lora_name": "fresh/lora", "lora_path": str(adapter_sources["fresh"])})
    assert r.status_code == 200, r.text
    writer = r.headers["x-quiver-replica"]
    keys = {o["Key"] for o in s3_client(s3_endpoint).list_objects_v2(Bucket=BUCKET, Prefix=f"{PREFIX}fresh/lora/")["Contents"]}
    assert keys == {f"{PREFIX}fresh/lora/adapter_config.json", f"{PREFIX}fresh/lora/adapter_model.safetensors"}
    # Each replica on its own gRPC port, not through the ingress: which replica the router picks
    # right after the load depends on when the writer's report of its models reaches it.
    live = {x["replica_id"]: x for x in replicas(quiver_app)}
    other = next(x for rid, x in live.items() if rid != writer)
    assert "fresh/lora" in held(live[writer]) and "fresh/lora" not in held(other)

    def answer(replica: dict) -> str:
        with QuiverClient(replica["grpc"], timeout=60) as q:
            return q.generate(text="w7 w8 w9", adapter_id="fresh/lora", max_new_tokens=8, ignore_eos=True).text

    assert answer(other) == answer(live[writer])  # the other fetched it from the store
    assert "fresh/lora" in held(other)


def test_loading_a_held_adapter_again_replaces_it_on_every_replica_that_holds_it(quiver_app, adapter_sources):
    """vLLM's load route through the ingress for an id that replicas hold already: the writer
    loads the new weights and publishes them, every other holder reloads them from the store
    (the directory's generation), and all answer with the new weights; requests running on the
    holders meanwhile finish on the old weights."""
    import httpx

    from runtime.server.client import QuiverClient
    from tests.peft_factory import make_peft_adapter, make_tiny_model

    adapter_id, app = ADAPTERS[2], openai_at(quiver_app)
    live = replicas(quiver_app)

    def answers() -> list[str]:
        out = []
        for r in live:  # each replica on its own gRPC port: it loads the adapter if it lacks it
            with QuiverClient(r["grpc"], timeout=60) as q:
                out.append(q.generate(text="w7 w8 w9", adapter_id=adapter_id, max_new_tokens=8, ignore_eos=True).text)
        return out

    def long_stream(replica: dict, begun: threading.Barrier) -> str:
        with QuiverClient(replica["grpc"], timeout=60) as q:
            parts = q.generate_stream(text="w7 w8", adapter_id=adapter_id, max_new_tokens=160, ignore_eos=True)
            text = next(parts).text
            begun.wait(30)
            for part in parts:
                text += part.text
            return text

    before = answers()
    assert len(set(before)) == 1 and all(adapter_id in held(r) for r in live)
    with QuiverClient(live[0]["grpc"], timeout=60) as q:  # what the old weights say at length
        old_long = q.generate(text="w7 w8", adapter_id=adapter_id, max_new_tokens=160, ignore_eos=True).text
    v2 = make_peft_adapter(make_tiny_model("llama", seed=0), "lora", adapter_sources["fresh"].parent / "v2", seed=99)
    begun = threading.Barrier(len(live) + 1)
    with ThreadPoolExecutor(len(live)) as pool:  # a request running on each holder meanwhile
        running = [pool.submit(long_stream, r, begun) for r in live]
        begun.wait(30)
        r = httpx.post(f"{quiver_app}/v1/load_lora_adapter", timeout=60,
                       json={"lora_name": adapter_id, "lora_path": str(v2)})
        assert r.status_code == 200, r.text
        assert [f.result() for f in running] == [old_long] * len(live), \
            "a request running during the replacement failed or saw the new weights"
    new = ask(app, adapter_id)[0]
    assert new != before[0], "the load route did not replace the adapter on the replica that took it"
    deadline = time.monotonic() + 15
    while answers() != [new] * len(live):
        assert time.monotonic() < deadline, f"a holder kept the old weights: {answers()} vs {new!r}"
        time.sleep(0.5)


def test_models_lists_every_adapter_in_the_store(quiver_app, adapter_sources, s3_endpoint):
    """Not only what one replica has fetched: an adapter only the bucket has is listed too."""
    from tests.s3_factory import s3_client, upload_adapter

    upload_adapter(s3_client(s3_endpoint), BUCKET, PREFIX, "only-in-store/lora", adapter_sources[ADAPTERS[5]])
    models = {m.id: m for m in openai_at(quiver_app).models.list()}
    assert next(iter(models)) == BASE_ID
    assert set(ADAPTERS) | {"fresh/lora", "only-in-store/lora"} <= set(models)
    assert models["only-in-store/lora"].root == f"s3://{BUCKET}/{PREFIX}only-in-store/lora/"


def test_a_killed_replica_loses_only_its_requests_and_ray_restarts_it(quiver_app):
    """Streams show where each request runs (the header comes first); the victim is killed once
    every stream has begun. Its streams end with a retryable error event, its unary requests are
    503 + Retry-After; the other replica's requests all finish; new requests are answered; Serve
    starts a replacement, which registers under a new id."""
    import openai
    import ray

    app = openai_at(quiver_app)
    started, outcomes, lock = threading.Barrier(7), [], threading.Lock()

    def stream(adapter_id: str) -> None:
        try:
            with app.completions.with_streaming_response.create(
                    model=adapter_id, prompt="w7 w8", stream=True, max_tokens=240, temperature=0,
                    stream_options={"include_usage": True}, extra_body={"ignore_eos": True}) as raw:
                replica = raw.headers["x-quiver-replica"]
                started.wait(60)
                try:
                    tokens = [c.usage.completion_tokens for c in raw.parse() if c.usage][-1]
                    result = ("stream", replica, tokens)
                except openai.APIError as e:
                    result = ("stream", replica, (e.body or {}).get("code"))
        except Exception as e:  # noqa: BLE001 - reported below
            result = ("stream", None, repr(e))
        with lock:
            outcomes.append(result)

    def unary(adapter_id: str) -> None:
        try:
            result = ("unary", *ask(app, adapter_id, max_tokens=200))
        except openai.APIStatusError as e:
            result = ("unary", e.status_code, e.response.headers.get("retry-after"))
        with lock:
            outcomes.append(result)

    victim = replicas(quiver_app)[0]
    with ThreadPoolExecutor(10) as pool:
        futures = [pool.submit(stream, ADAPTERS[i]) for i in range(6)]
        started.wait(60)  # every stream has its first bytes: each replica has requests running
        futures += [pool.submit(unary, a) for a in ADAPTERS[:4]]
        time.sleep(0.3)
        ray.kill(ray.get_actor(victim["actor_name"], namespace="serve"), no_restart=True)
        for f in futures:
            f.result()
    streams = [o for o in outcomes if o[0] == "stream"]
    on_victim = [o for o in streams if o[1] == victim["replica_id"]]
    assert on_victim and len(on_victim) < len(streams), f"streams were not on both replicas: {streams}"
    assert all(o[2] == "replica_unavailable" for o in on_victim), on_victim
    assert all(o[2] == 240 for o in streams if o not in on_victim), f"the other replica lost requests: {streams}"
    for o in (o for o in outcomes if o[0] == "unary"):
        assert o[1:] == (503, "1") or (isinstance(o[1], str) and o[2] != victim["replica_id"]), o

    retrying = openai_at(quiver_app, retries=3)  # as a client would: 503 is retried
    assert all(answer[0] for answer in (ask(retrying, a) for a in ADAPTERS))
    restarted = wait_for_replicas(quiver_app, 2, exclude={victim["replica_id"]})
    assert victim["replica_id"] not in {r["replica_id"] for r in restarted}


BUILDER_ARGS = {"quantize": "none", "dtype": "float32", "device": "cpu", "threads": "1", "kv_cache_tokens": "8192",
                "max_lora_rank": "8", "max_device_adapters": "4", "served_model_name": BASE_ID,
                "adapter_store": f"s3://{BUCKET}/{PREFIX}", "grace_period_s": "5", "num_replicas": "1",
                "replica_cpus": "0", "max_ongoing_requests": "16", "app_name": "builder",
                "route_by_adapter": "true", "adapter_check_s": "1.0"}


@pytest.fixture(scope="module")
def builder(quiver_app, chat_model_dir, s3_endpoint, tmp_path_factory):
    """What `serve run runtime.distributed.app:app_builder key=value ...` builds (every value a
    string, as Serve passes them: BUILDER_ARGS), run in place of the fixture's app (after the
    kill test): (its arguments, its one replica)."""
    from ray import serve

    from runtime.distributed.app import app_builder

    serve.delete("quiver")  # the fixture's app is done with: its 2 replicas hold the 2 CPUs
    args = {**BUILDER_ARGS, "model": str(chat_model_dir), "s3_endpoint_url": s3_endpoint,
            "adapter_cache_dir": str(tmp_path_factory.mktemp("builder-cache"))}
    serve.run(app_builder(args), name="builder", route_prefix="/")
    (replica,) = wait_for_replicas(quiver_app, 1, timeout_s=60)
    assert replica["max_device_adapters"] == 4
    yield args, replica
    serve.delete("builder")


def test_an_adapter_replaced_in_the_bucket_is_reloaded_by_the_replica_holding_it(builder, quiver_app, adapter_sources,
                                                                                 s3_endpoint):
    """An upload straight to the bucket (not through the app): the holder's version check
    (adapter_check_s, 1 s here) sees new ETags and reloads; it answers as the new weights do."""
    from tests.s3_factory import s3_client, upload_adapter

    app, client = openai_at(quiver_app), s3_client(s3_endpoint)
    upload_adapter(client, BUCKET, PREFIX, "swap/lora", adapter_sources[ADAPTERS[0]])
    before, expected = ask(app, "swap/lora")[0], ask(app, ADAPTERS[4])[0]  # ADAPTERS[4]: the new weights
    assert before != expected
    upload_adapter(client, BUCKET, PREFIX, "swap/lora", adapter_sources[ADAPTERS[4]])
    deadline = time.monotonic() + 20
    while (now := ask(app, "swap/lora"))[0] != expected:
        assert time.monotonic() < deadline, f"the holder kept the replaced weights: {now} vs {expected!r}"
        assert now[2] == "1"  # held all along: not evicted and fetched again
        time.sleep(0.5)


def test_a_rolling_update_finishes_the_old_replicas_streams(builder, quiver_app):
    """A new version of the replica deployment (a changed setting) while streams run on the old
    replica: Serve's graceful shutdown lets them finish every token, and the new replica answers
    after."""
    from ray import serve

    from runtime.distributed.app import app_builder

    args, old = builder
    app = openai_at(quiver_app)
    assert ask(app, ADAPTERS[1])[1] == old["replica_id"]

    began, lock, ends = threading.Event(), threading.Lock(), []

    def stream() -> None:
        with app.completions.with_streaming_response.create(
                model=ADAPTERS[1], prompt="w7 w8", stream=True, max_tokens=240, temperature=0,
                stream_options={"include_usage": True}, extra_body={"ignore_eos": True}) as raw:
            tokens = []
            for chunk in raw.parse():
                began.set()
                tokens.extend([chunk.usage.completion_tokens] if chunk.usage else [])
            with lock:
                ends.append((raw.headers["x-quiver-replica"], tokens, time.monotonic()))

    readers = [threading.Thread(target=stream) for _ in range(4)]  # 4 in one batch: longer steps
    for reader in readers:
        reader.start()
    assert began.wait(60), "the streams did not start"  # the old replica is generating
    updater = threading.Thread(target=serve.run, args=(app_builder({**args, "max_queue": "64"}),),
                               kwargs={"name": "builder", "route_prefix": "/"})
    updater.start()
    stopping = None
    while stopping is None and any(r.is_alive() for r in readers):
        states = serve.status().applications["builder"].deployments["QuiverReplica"].replica_states
        stopping = time.monotonic() if states.get("STOPPING") else None
        time.sleep(0.05)
    for reader in readers:
        reader.join(60)
    assert [(replica, tokens) for replica, tokens, _ in ends] == [(old["replica_id"], [240])] * 4, \
        "the rolling update cut a stream of the old replica"
    assert stopping is not None and max(end for _, _, end in ends) > stopping, \
        "the streams ended before Serve began to stop the old replica"
    updater.join(90)
    assert not updater.is_alive()
    (new,) = wait_for_replicas(quiver_app, 1, timeout_s=60, exclude={old["replica_id"]})
    assert ask(app, ADAPTERS[1])[1] == new["replica_id"]
