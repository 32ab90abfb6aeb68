"""Adapters at runtime through the Adapters service and lazy loading: load / unload / list under
traffic, unloading with requests in flight, NOT_FOUND, INVALID_ARGUMENT for ids and sources that
leave the allowed roots, and malformed adapters that fail only their own requests."""
from __future__ import annotations

import os
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from runtime.server.stubs import adapters_pb2 as apb
from runtime.server.stubs import generation_pb2 as gpb
from tests.server.conftest import ADAPTERS, PRELOAD, wait_until, words

IDS = [5, 17, 99, 3, 42, 8]


def _tokens(resp) -> list[int]:
    return [t.id for t in resp.tokens]


def _gen(client, adapter_id, n=6, **kw):
    return client.generate(words(IDS), adapter_id, max_new_tokens=n, ignore_eos=True,
                           return_token_ids=True, **kw)


def _code(fn) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value.code()


def _listed(client) -> dict[str, apb.AdapterInfo]:
    return {a.adapter_id: a for a in client.list_adapters()}


def test_list_reports_what_is_loaded(client):
    infos = _listed(client)
    assert set(PRELOAD) <= set(infos)
    dora = infos["team-a/dora-all"]
    assert dora.type == apb.ADAPTER_TYPE_DORA and dora.peft_type == "LORA"
    assert dora.rank == 4 and set(dora.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj",
                                                           "gate_proj", "up_proj", "down_proj"}
    assert dora.bytes > 0 and dora.source.endswith("team-a/dora-all")
    assert dora.state in (apb.ADAPTER_STATE_HOST, apb.ADAPTER_STATE_DEVICE)
    prefix = infos["prefix-3"]
    assert prefix.type == apb.ADAPTER_TYPE_PREFIX_TUNING and prefix.num_virtual_tokens == 3
    assert prefix.rank == 0


def test_lazy_load_from_adapter_dir(client, peft_ref):
    lazy = [a for a in ADAPTERS if a not in PRELOAD]
    adapter_id = lazy[-1]
    if adapter_id in _listed(client):  # an earlier test's requests may have loaded it
        client.unload_adapter(adapter_id)
    assert adapter_id not in _listed(client)
    resp = _gen(client, adapter_id)
    assert _tokens(resp) == peft_ref(adapter_id, tuple(IDS), 6)
    info = _listed(client)[adapter_id]
    assert info.requests_served >= 1 and info.source.endswith(adapter_id)


def test_unknown_adapter_is_not_found(client):
    for adapter_id in ("nope", "team-a/nope", "team-a"):  # team-a is a directory, not an adapter
        code = _code(lambda: _gen(client, adapter_id))
        assert code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT), adapter_id
    assert _code(lambda: _gen(client, "nope")) == grpc.StatusCode.NOT_FOUND
    assert _code(lambda: client.unload_adapter("nope")) == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("adapter_id", ["../x", "team-a/../../x", "/etc", "/tmp/x", "a//b", "./a",
                                        "a b", "a\\b", "é"])
def test_ids_outside_the_adapter_dir_are_invalid_argument(client, adapter_id):
    assert _code(lambda: _gen(client, adapter_id)) == grpc.StatusCode.INVALID_ARGUMENT
    assert _code(lambda: client.load_adapter(adapter_id)) == grpc.StatusCode.INVALID_ARGUMENT


def test_symlink_out_of_the_adapter_dir_is_invalid_argument(client, adapter_dir, extra_root):
    link = adapter_dir / "sneaky"
    link.symlink_to(extra_root / "extra-lora", target_is_directory=True)
    try:
        with pytest.raises(grpc.RpcError) as e:
            _gen(client, "sneaky")
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "outside the adapter directory" in e.value.details()
    finally:
        link.unlink()


def test_load_source_outside_allowed_roots_is_invalid_argument(client, tmp_path, adapter_dir):
    outside = tmp_path / "elsewhere"
    shutil.copytree(adapter_dir / "lora-qv", outside)
    for source in (str(outside), "/etc", "../" * 12 + "etc", str(adapter_dir / ".." / "elsewhere")):
        with pytest.raises(grpc.RpcError) as e:
            client.load_adapter("elsewhere", source=source)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, source
        assert "outside the allowed adapter roots" in e.value.details()
    assert "elsewhere" not in _listed(client)


def test_load_list_unload_while_traffic_flows(client, extra_root, peft_ref):
    """Steady greedy traffic on the base and two adapters, while adapters from an allowed root
    are loaded, used, listed and unloaded; every traffic response stays exactly right."""
    steady = ["", "lora-qv", "team-a/dora-all"]
    expected = {a: peft_ref(a, tuple(IDS), 6) for a in steady}
    stop, failures, done = threading.Event(), [], []

    def traffic(adapter_id):
        while not stop.is_set():
            try:
                got = _tokens(_gen(client, adapter_id))
                (done if got == expected[adapter_id] else failures).append((adapter_id, got))
            except grpc.RpcError as e:
                failures.append((adapter_id, e.code(), e.details()))

    threads = [threading.Thread(target=traffic, args=(a,)) for a in steady for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for cycle in range(3):
            for name in ("extra-lora", "extra-prefix"):
                adapter_id = f"dyn/{name}-{cycle}"
                info = client.load_adapter(adapter_id, source=str(extra_root / name))
                assert info.adapter_id == adapter_id and info.source == str(extra_root / name)
                assert adapter_id in _listed(client)
                assert _tokens(_gen(client, adapter_id)) == peft_ref(name, tuple(IDS), 6)
                assert client.unload_adapter(adapter_id).unloaded or wait_until(
                    lambda: adapter_id not in _listed(client))
                assert adapter_id not in _listed(client)
                # not in the adapter dir: gone means NOT_FOUND
                assert _code(lambda: _gen(client, adapter_id)) == grpc.StatusCode.NOT_FOUND
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert failures == []
    assert len(done) >= 6


def test_unload_with_requests_in_flight_loses_none(client, server, extra_root, peft_ref):
    """Unload while one request runs and others wait behind it: all of them finish, correctly,
    with the adapter; new requests are refused; then it is gone."""
    n = 150
    client.load_adapter("dyn/busy", source=str(extra_root / "extra-lora"))
    solo = _gen(client, "dyn/busy", n=n)
    stream = client.generate_stream(words(IDS), "dyn/busy", max_new_tokens=n, ignore_eos=True,
                                     return_token_ids=True)
    first = next(stream)  # running now
    with ThreadPoolExecutor(4) as pool:
        queued = [pool.submit(_gen, client, "dyn/busy", n) for _ in range(4)]
        assert wait_until(lambda: _listed(client)["dyn/busy"].in_flight == 5)
        result = client.unload_adapter("dyn/busy")
        assert not result.unloaded and result.in_flight == 5
        assert _listed(client)["dyn/busy"].state == apb.ADAPTER_STATE_UNLOADING
        assert _code(lambda: _gen(client, "dyn/busy")) == grpc.StatusCode.NOT_FOUND
        assert _code(lambda: client.load_adapter("dyn/busy", source=str(extra_root / "extra-lora"))) \
            == grpc.StatusCode.FAILED_PRECONDITION
        rest = list(stream)
        results = [f.result() for f in queued]
    assert _tokens(first) + [t.id for c in rest for t in c.tokens] == _tokens(solo)
    assert rest[-1].stop_reason == gpb.STOP_REASON_MAX_TOKENS
    assert all(_tokens(r) == _tokens(solo) for r in results)
    assert wait_until(lambda: "dyn/busy" not in _listed(client))
    assert _tokens(solo)[:6] == peft_ref("extra-lora", tuple(IDS), 6)


def test_reload_replaces_an_idle_adapter(client, extra_root, peft_ref):
    client.load_adapter("dyn/swap", source=str(extra_root / "extra-lora"))
    assert _tokens(_gen(client, "dyn/swap")) == peft_ref("extra-lora", tuple(IDS), 6)
    client.load_adapter("dyn/swap", source=str(extra_root / "extra-prefix"))
    assert _tokens(_gen(client, "dyn/swap")) == peft_ref("extra-prefix", tuple(IDS), 6)
    assert _listed(client)["dyn/swap"].type == apb.ADAPTER_TYPE_PREFIX_TUNING
    client.unload_adapter("dyn/swap")


def _break(adapter_dir, name, how):
    d = adapter_dir / name
    shutil.copytree(adapter_dir / "lora-qv", d)
    if how == "config":
        (d / "adapter_config.json").write_text("{ not json")
    elif how == "truncated":
        f = d / "adapter_model.safetensors"
        f.write_bytes(f.read_bytes()[:100])
    elif how == "rank":
        (d / "adapter_config.json").write_text((d / "adapter_config.json").read_text()
                                               .replace('"r": 4', '"r": 64'))
    return d


def test_malformed_adapters_fail_only_their_own_requests(client, server, adapter_dir, peft_ref):
    broken = {f"broken/{how}": _break(adapter_dir, f"broken/{how}", how)
              for how in ("config", "truncated", "rank")}
    failures_before = _load_failures(server, "format")
    good = [("", IDS), ("lora-qv", IDS), ("prompt-4", IDS)] * 3
    with ThreadPoolExecutor(16) as pool:
        good_f = [pool.submit(_gen, client, a) for a, _ in good]
        bad_f = {name: pool.submit(_gen, client, name) for name in broken}
        for name, f in bad_f.items():
            with pytest.raises(grpc.RpcError) as e:
                f.result()
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
            assert e.value.details(), name
        for (a, _), f in zip(good, good_f):
            assert _tokens(f.result()) == peft_ref(a, tuple(IDS), 6)
    listed = _listed(client)
    assert not any(name in listed for name in broken)
    assert _load_failures(server, "format") >= failures_before + 3
    # fixing the files on disk makes the id loadable: nothing stuck in the registry
    shutil.rmtree(broken["broken/config"])
    shutil.copytree(adapter_dir / "lora-qv", broken["broken/config"])
    assert _tokens(_gen(client, "broken/config")) == peft_ref("lora-qv", tuple(IDS), 6)
    client.unload_adapter("broken/config")
    for d in broken.values():
        shutil.rmtree(d)
    os.rmdir(adapter_dir / "broken")


def _load_failures(server, reason: str) -> float:
    return server.core.metrics.registry.get_sample_value(
        "quiver_adapter_load_failures_total", {"reason": reason})
