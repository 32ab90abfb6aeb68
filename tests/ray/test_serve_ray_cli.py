"""`quiver serve-ray` as a user runs it: a subprocess that starts its own local Ray instance, one
replica of the tiny random chat model, adapters from a local --adapter-dir; the official openai
client; then SIGTERM while a stream is in flight: the stream finishes (the app's deletion drains
the replica), the command exits 0 within the grace period, and no process of its Ray instance
is left."""
from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.peft_factory import make_peft_adapter, make_tiny_model
from tests.ray.conftest import free_port as ray_free_port
from tests.ray.conftest import openai_at

pytestmark = pytest.mark.slow
PORTS = range(19800, 19900)
GRACE_S = 5
ADAPTER = "tenant-a/lora"


def free_port() -> int:
    return ray_free_port(PORTS)


def lines_of(stream, into: queue.Queue) -> None:
    for line in iter(stream.readline, ""):
        into.put(line)


def wait_for_line(lines: queue.Queue, proc: subprocess.Popen, text: str, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.5)
        except queue.Empty:
            assert proc.poll() is None, f"quiver serve-ray exited with {proc.returncode} before {text!r}"
            continue
        if text in line:
            return line
    raise AssertionError(f"no {text!r} from quiver serve-ray within {timeout_s} s")


@pytest.fixture
def adapter_dir(tmp_path):
    make_peft_adapter(make_tiny_model("llama", seed=0), "lora", tmp_path / "adapters" / "tenant-a", seed=7)
    return tmp_path / "adapters"


def test_serve_ray_serves_openai_clients_and_sigterm_drains_and_stops_its_ray(chat_model_dir, adapter_dir, tmp_path):
    import psutil

    port = free_port()
    quiver = Path(sys.executable).with_name("quiver")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    stderr = open(tmp_path / "stderr.log", "w")
    proc = subprocess.Popen(
        [str(quiver), "serve-ray", "--model", str(chat_model_dir), "--quantize", "none", "--dtype", "float32",
         "--device", "cpu", "--kv-cache-tokens", "8192", "--adapter-dir", str(adapter_dir), "--num-replicas", "1", "--replica-cpus", "1", "--num-cpus", "2",
         "--threads", "1", "--http-port", str(port), "--served-model-name", "tiny", "--grace-period", str(GRACE_S),
         "--app-name", "quiver-cli"],
        stdout=subprocess.PIPE, stderr=stderr, text=True, env=env, start_new_session=True)
    lines: queue.Queue = queue.Queue()
    reader = threading.Thread(target=lines_of, args=(proc.stdout, lines), daemon=True)
    reader.start()
    try:
        wait_for_line(lines, proc, "quiver serve-ray on", 120)
        ray_processes = psutil.Process(proc.pid).children(recursive=True)
        assert ray_processes, "no Ray processes under quiver serve-ray"
        app = openai_at(f"http://127.0.0.1:{port}")

        answer = app.chat.completions.create(model=ADAPTER, messages=[{"role": "user", "content": "w3 w4"}],
                                             max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
        assert answer.usage.completion_tokens == 6 and answer.choices[0].message.content
        base = app.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "w3 w4"}],
                                           max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
        assert base.choices[0].message.content != answer.choices[0].message.content  # the adapter applied

        # a stream in flight when SIGTERM arrives: it is finished, not cut (the drain)
        stream = app.chat.completions.create(model=ADAPTER, messages=[{"role": "user", "content": "w5"}],
                                             stream=True, max_tokens=150, temperature=0,
                                             extra_body={"ignore_eos": True}, stream_options={"include_usage": True})
        chunks = iter(stream)
        first = next(chunks)
        proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        rest = list(chunks)
        assert rest[-1].usage.completion_tokens == 150, "the stream was cut by the shutdown"
        assert "".join(c.choices[0].delta.content or "" for c in [first, *rest] if c.choices)

        assert proc.wait(timeout=GRACE_S + 30) == 0, (tmp_path / "stderr.log").read_text()[-3000:]
        stopped_s = time.monotonic() - t0  # within the wait's bound: the grace period + Ray's teardown
        reader.join(5)
        assert "quiver serve-ray stopped" in "".join(lines.queue)
        print(f"serve-ray stopped {stopped_s:.1f} s after SIGTERM")
        _, alive = psutil.wait_procs(ray_processes, timeout=15)
        assert not alive, f"Ray processes left after quiver serve-ray stopped: {[p.info for p in alive]}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        stderr.close()


def test_num_cpus_is_refused_with_address_before_any_ray_call(chat_model_dir):
    from runtime.cli import build_parser

    args = build_parser().parse_args(["serve-ray", "--model", str(chat_model_dir), "--address", "auto",
                                      "--num-cpus", "2"])
    with pytest.raises(ValueError, match="--num-cpus"):
        args.run(args)
