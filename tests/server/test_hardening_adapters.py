"""Faulty adapters on disk (hardening issue, part 2): truncated or corrupt weights, a config that
disagrees with its tensors, NaN weights, a different base model, a pickle that would run code,
and directories deleted or replaced while they are being loaded, or after. Each fails only its
own requests, with a status and a message; the registry and every other adapter are untouched;
`quiver_adapter_load_failures_total{reason}` (scraped over HTTP) counts it.

What can be provoked deterministically: a swap *during* a load is made by hooking
`peft_format.read_tensors`, which runs after the config was read and the path checked, the
window a racing `mv` would hit. Files rewritten in place *after* a load used to reach the served
weights through safetensors' mmap (and a truncation then killed the process with SIGBUS when an
evicted slot was refilled); the truncation case runs in a subprocess so that a regression fails
one test instead of the whole run.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch
from safetensors.torch import load_file, save_file

from runtime.adapters import peft_format
from tests.server.conftest import words
from tests.server.hardening import assert_still_serving, expect_status, load_failures, running_server

IDS = [5, 17, 99, 3, 42, 8]
INVALID = grpc.StatusCode.INVALID_ARGUMENT
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


@pytest.fixture(scope="module")
def dirs(adapter_dir, extra_root, tmp_path_factory):
    """(this module's adapter dir with good adapters, an allowed root, a directory outside)."""
    own = tmp_path_factory.mktemp("faulty-adapters")
    allowed = tmp_path_factory.mktemp("faulty-allowed")
    outside = tmp_path_factory.mktemp("faulty-outside")
    for name in ("lora-qv", "prompt-4", "prefix-3", "dora-qv"):
        shutil.copytree(adapter_dir / name, own / name)
    shutil.copytree(extra_root / "extra-lora", allowed / "extra-lora")
    shutil.copytree(extra_root / "extra-lora", outside / "extra-lora")
    return own, allowed, outside


@pytest.fixture(scope="module")
def server(tiny_model_dir, dirs):
    own, allowed, _ = dirs
    with running_server(tiny_model_dir, adapter_dir=str(own), allow_adapter_roots=[str(allowed)],
                        max_device_adapters=2) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    from runtime.server.client import QuiverClient

    with QuiverClient(server.address, timeout=60) as q:
        yield q


def _tokens(client, adapter_id, n=6) -> list[int]:
    r = client.generate(words(IDS), adapter_id, max_new_tokens=n, ignore_eos=True, return_token_ids=True)
    return [t.id for t in r.tokens]


def _registry(client) -> dict[str, tuple]:
    """What ListAdapters says, without the counters that traffic moves."""
    return {a.adapter_id: (a.type, a.rank, a.bytes, a.source) for a in client.list_adapters()}


# ---- ways to break a copy of lora-qv ----------------------------------------------------------
def _rewrite_weights(d, change) -> None:
    tensors = load_file(str(d / WEIGHTS))
    change(tensors)
    save_file(tensors, str(d / WEIGHTS), metadata={"format": "pt"})


def _edit_config(d, **fields) -> None:
    config = json.loads((d / CONFIG).read_text())
    (d / CONFIG).write_text(json.dumps({**config, **fields}))


def _first_key(tensors, suffix: str) -> str:
    return next(k for k in sorted(tensors) if k.endswith(suffix))


def _nan(tensors):
    tensors[_first_key(tensors, "lora_B.weight")][0, 0] = float("nan")


def _other_base(tensors):  # as if trained on a model with hidden size 96, not 64
    for k in list(tensors):
        r = 4
        tensors[k] = torch.randn(r, 96) if k.endswith("lora_A.weight") else torch.randn(96, r)


def _ints(tensors):
    k = _first_key(tensors, "lora_A.weight")
    tensors[k] = tensors[k].to(torch.int32)


class _RunsCode:
    """A pickle that would run a shell command when unpickled by a trusting loader."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _pickle_bin(d) -> None:
    (d / WEIGHTS).unlink()
    with open(d / "adapter_model.bin", "wb") as f:
        pickle.dump({"x": _RunsCode(d / "pwned")}, f)


BREAKS = {
    "truncated": (lambda d: (d / WEIGHTS).write_bytes((d / WEIGHTS).read_bytes()[:200]), "could not read"),
    "empty-file": (lambda d: (d / WEIGHTS).write_bytes(b""), "could not read"),
    "corrupt-header": (lambda d: (d / WEIGHTS).write_bytes(b"\x40\x00" + os.urandom(600)), "could not read"),
    "no-weights": (lambda d: (d / WEIGHTS).unlink(), "the adapter weights are missing"),
    "no-config": (lambda d: (d / CONFIG).unlink(), "not a PEFT adapter directory"),
    "config-targets": (lambda d: _edit_config(d, target_modules=["q_proj", "k_proj", "v_proj"]),
                       "adapter weights do not match its config (missing keys"),
    "config-rank": (lambda d: _edit_config(d, r=2), "the config does not describe these weights"),
    "config-type": (lambda d: _edit_config(d, peft_type="PREFIX_TUNING"), "num_virtual_tokens"),
    "nan-weights": (lambda d: _rewrite_weights(d, _nan), "non-finite values (NaN or Inf)"),
    "other-base": (lambda d: _rewrite_weights(d, _other_base), "trained for a different base model"),
    "int-weights": (lambda d: _rewrite_weights(d, _ints), "must be float32, float16 or bfloat16"),
    "pickle-code": (_pickle_bin, "only tensors are accepted from a pickle"),
}


@pytest.mark.parametrize("how", list(BREAKS))
def test_faulty_adapter_fails_alone(server, client, dirs, how):
    own = dirs[0]
    break_it, needle = BREAKS[how]
    d = own / "broken" / how
    shutil.copytree(own / "lora-qv", d)
    break_it(d)
    good = _tokens(client, "lora-qv")
    before, failures = _registry(client), load_failures(server.metrics_port, "format")
    adapter_id = f"broken/{how}"
    expect_status(lambda: _tokens(client, adapter_id), INVALID, needle)  # lazily, by a request
    expect_status(lambda: client.load_adapter(adapter_id), INVALID, needle)  # explicitly
    assert load_failures(server.metrics_port, "format") == failures + 2
    assert _registry(client) == before
    assert _tokens(client, "lora-qv") == good
    assert_still_serving(client, "prompt-4")
    assert not (d / "pwned").exists()


def test_faulty_adapters_do_not_disturb_traffic(server, client, dirs, peft_ref):
    """All the broken adapters requested at once, amid traffic on good ones: every good response
    is exactly PEFT's, every broken one INVALID_ARGUMENT."""
    own = dirs[0]
    for how in ("truncated", "nan-weights", "other-base"):
        if not (own / "busy-broken" / how).exists():
            shutil.copytree(own / "lora-qv", own / "busy-broken" / how)
            BREAKS[how][0](own / "busy-broken" / how)
    good = ["", "lora-qv", "prompt-4", "prefix-3", "dora-qv"] * 3
    with ThreadPoolExecutor(12) as pool:
        good_f = [pool.submit(_tokens, client, a) for a in good]
        bad_f = [pool.submit(_tokens, client, f"busy-broken/{how}")
                 for how in ("truncated", "nan-weights", "other-base") for _ in range(2)]
        for f in bad_f:
            with pytest.raises(grpc.RpcError) as e:
                f.result()
            assert e.value.code() == INVALID
        for a, f in zip(good, good_f):
            assert f.result() == peft_ref(a, tuple(IDS), 6), a


# ---- changes on disk while loading, or after ---------------------------------------------------
@pytest.fixture
def during_read(monkeypatch):
    """during_read(action): run action() once, between the config read and the weights read."""

    def install(action):
        original = peft_format.read_tensors

        def read_tensors(root):
            monkeypatch.setattr(peft_format, "read_tensors", original)
            action()
            return original(root)

        monkeypatch.setattr(peft_format, "read_tensors", read_tensors)

    return install


def test_directory_deleted_while_loading(server, client, dirs, during_read):
    own = dirs[0]
    shutil.copytree(own / "lora-qv", own / "vanishing")
    during_read(lambda: shutil.rmtree(own / "vanishing"))
    missing = load_failures(server.metrics_port, "missing")
    expect_status(lambda: _tokens(client, "vanishing"), grpc.StatusCode.NOT_FOUND,
                  "disappeared while it was being loaded")
    assert load_failures(server.metrics_port, "missing") == missing + 1
    assert "vanishing" not in _registry(client)
    assert_still_serving(client, "lora-qv")


def test_directory_swapped_for_a_symlink_out_while_loading(server, client, dirs, during_read):
    own, _, outside = dirs
    shutil.copytree(own / "lora-qv", own / "swapped")

    def swap():
        shutil.rmtree(own / "swapped")
        (own / "swapped").symlink_to(outside / "extra-lora", target_is_directory=True)

    during_read(swap)
    paths = load_failures(server.metrics_port, "path")
    expect_status(lambda: _tokens(client, "swapped"), INVALID, "changed while it was being loaded")
    assert load_failures(server.metrics_port, "path") == paths + 1
    assert "swapped" not in _registry(client)
    (own / "swapped").unlink()


def test_directory_replaced_by_another_adapter_while_loading(server, client, dirs, during_read):
    """Config of one adapter, weights of another: the mismatch is caught (a replacement that is
    itself consistent would simply be loaded: it is what is on disk)."""
    own = dirs[0]
    shutil.copytree(own / "lora-qv", own / "replaced")

    def replace():
        shutil.rmtree(own / "replaced")
        shutil.copytree(own / "prefix-3", own / "replaced")

    during_read(replace)
    expect_status(lambda: _tokens(client, "replaced"), INVALID, "do not match its config")
    assert _tokens(client, "replaced") == _tokens(client, "prefix-3")  # loaded as it now is
    client.unload_adapter("replaced")


def test_files_changed_after_loading_do_not_reach_the_served_weights(server, client, dirs):
    """Deleted, or rewritten in place (same size), after LoadAdapter returned: the adapter keeps
    serving the weights it loaded, through evictions (2 device slots here) and reloads into a slot."""
    own = dirs[0]
    for name in ("gone", "rewritten"):
        shutil.copytree(own / "lora-qv", own / name)
        client.load_adapter(name)
    expected = _tokens(client, "lora-qv")
    shutil.rmtree(own / "gone")
    weights = own / "rewritten" / WEIGHTS
    data = bytearray(weights.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    data[header:] = os.urandom(len(data) - header)  # same size, other numbers
    with open(weights, "r+b") as f:  # in place, as `cp` or an editor would
        f.write(data)
    for _ in range(2):
        for other in ("prompt-4", "dora-qv", "prefix-3"):  # evict both from the 2 slots
            _tokens(client, other, n=1)
        assert _tokens(client, "gone") == expected
        assert _tokens(client, "rewritten") == expected
    for name in ("gone", "rewritten"):
        client.unload_adapter(name)


def test_truncated_after_loading_does_not_crash(dirs, tiny_model_dir, tmp_path):
    """The host copy of a loaded adapter survives its file being truncated in place (it was an
    mmap: reading it afterwards raised SIGBUS). In a subprocess, so a crash fails only this test."""
    d = tmp_path / "lora"
    shutil.copytree(dirs[0] / "lora-qv", d)
    script = f"""
import os
from runtime.adapters.peft_format import read_adapter
from runtime.models.hf import load_model_config
adapter = read_adapter({str(d)!r}, load_model_config({str(tiny_model_dir)!r}))
os.truncate({str(d / WEIGHTS)!r}, 16)
print(sum(float(m.A.sum() + m.B.sum()) for m in adapter.lora.values()))
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=os.getcwd(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])


# ---- where LoadAdapter may read from ------------------------------------------------------------
@pytest.mark.parametrize("source, ok", [
    ("{allowed}/extra-lora", True),
    ("{allowed}/link-in", True),  # a link that stays inside an allowed root
    ("{allowed}/link-out", False),  # a link inside an allowed root, pointing outside every root
    ("{allowed}/../{outside_name}/extra-lora", False),
    ("{outside}/extra-lora", False),
    ("link-out-of-adapter-dir", False),  # relative: under --adapter-dir, whose link leads out
    ("/proc/self/cwd", False),
    ("{allowed}/extra-lora\x00", False),
])
def test_load_source_confinement(client, dirs, source, ok):
    own, allowed, outside = dirs
    if not (allowed / "link-in").exists():
        (allowed / "link-in").symlink_to(allowed / "extra-lora", target_is_directory=True)
        (allowed / "link-out").symlink_to(outside / "extra-lora", target_is_directory=True)
        (own / "link-out-of-adapter-dir").symlink_to(outside / "extra-lora", target_is_directory=True)
    source = source.format(allowed=allowed, outside=outside, outside_name=outside.name)
    if ok:
        info = client.load_adapter("confined/x", source=source)
        assert info.source == str(allowed / "extra-lora")
        client.unload_adapter("confined/x")
    else:
        expect_status(lambda: client.load_adapter("confined/x", source=source), INVALID,
                      "outside the allowed adapter roots" if "\x00" not in source else "contains NUL")
        assert "confined/x" not in _registry(client)
