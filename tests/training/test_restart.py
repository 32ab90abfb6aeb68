"""Jobs survive the server: stopped mid-job, or killed (SIGKILL) while a checkpoint is being
written, a restarted server on the same --data-dir resumes from the last whole checkpoint and
ends with exactly the adapter an uninterrupted run makes."""
from __future__ import annotations

import os
import signal
import time

import pytest
import torch
from safetensors.torch import load_file

from tests.server.test_lifecycle import start_serve
from tests.training.conftest import ADMIN, BASE_ID, jsonl, learn_rows, openai_for, start, wait_for
from runtime.training.state import State
from trainer import TrainConfig, train
from trainer.loop import STATE_FILE

LONG = {"n_epochs": 20, "batch_size": 1}  # 160 steps


def _job(data, job_id: str) -> dict:
    """The job's row, read from the data directory's database (the server has stopped)."""
    return State(data / "quiver.db").job(job_id)


def _uninterrupted(server, job_id: str, out) -> dict:
    """`quiver train` on the same base with the job's settings, after the server stopped."""
    spec = _job(server.core.training.data_dir, job_id)["spec"]["train_config"]
    path = train(TrainConfig.from_dict({**spec, "output": str(out), "save_every": 0}), base=server.core.base)
    return load_file(str(path / "adapter_model.safetensors"))


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_stopped_mid_job_resumes_from_its_checkpoint(chat_model_dir, tmp_path):
    data, adapters = tmp_path / "data", tmp_path / "adapters"
    first = start(chat_model_dir, data, adapters)
    with openai_for(first) as client:
        f = client.files.create(file=("learn.jsonl", jsonl(learn_rows())), purpose="fine-tune")
        job = client.fine_tuning.jobs.create(model=BASE_ID, training_file=f.id, seed=1, hyperparameters=LONG,
                                             extra_body={"quiver": {"rank": 4, "save_every": 10}})
        deadline = time.monotonic() + 60
        while not client.fine_tuning.jobs.checkpoints.list(job.id).data and time.monotonic() < deadline:
            time.sleep(0.01)
    first.core.loop.stop()  # the engine thread ends after the slice in flight: mid-job
    first.shutdown(grace_s=1)
    stopped = _job(data, job.id)
    assert stopped["status"] == "running" and 10 <= stopped["trained_tokens"]

    second = start(chat_model_dir, data, adapters)
    try:
        with openai_for(second) as client:
            done = wait_for(client, job.id)
            assert done.status == "succeeded", done.error
            messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100)]
            resumed = [m for m in messages if "resumed from its checkpoint" in m]
            assert len(resumed) == 1 and " of 160" in resumed[0]
    finally:
        second.shutdown(grace_s=5)
    mine = load_file(str(adapters / done.fine_tuned_model / "adapter_model.safetensors"))
    assert _same(mine, _uninterrupted(second, job.id, tmp_path / "offline"))


@pytest.mark.slow
def test_killed_during_a_checkpoint_write_leaves_nothing_corrupted(chat_model_dir, tmp_path):
    data, adapters = tmp_path / "data", tmp_path / "adapters"
    proc, _, _ = start_serve(["--model", str(chat_model_dir), "--quantize", "none", "--dtype", "float32",
                              "--device", "cpu", "--metrics-port", "-1", "--data-dir", str(data),
                              "--adapter-dir", str(adapters), "--admin-token", ADMIN,
                              "--served-model-name", BASE_ID, "--max-lora-rank", "8", "--threads", "1"])
    http_port = next(x for x in proc.output if x.startswith("quiver serving on ")).split(" and http :")[1].split()[0]
    try:
        import openai

        with openai.OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key=ADMIN, max_retries=0) as client:
            f = client.files.create(file=("learn.jsonl", jsonl(learn_rows())), purpose="fine-tune")
            job = client.fine_tuning.jobs.create(model=BASE_ID, training_file=f.id, seed=2, hyperparameters=LONG,
                                                 extra_body={"quiver": {"rank": 4, "save_every": 1}})
        ckpts = data / "jobs" / job.id / "checkpoints"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # kill the moment a checkpoint is half-written
            if ckpts.is_dir() and len(list(ckpts.glob("step-*"))) >= 3 and list(ckpts.glob(".step-*.tmp")):
                break
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
        assert time.monotonic() < deadline, "no checkpoint write was caught in the act"
    finally:
        if proc.poll() is None:
            proc.kill()
    for whole in ckpts.glob("step-*"):  # every published checkpoint is complete
        assert torch.load(whole / STATE_FILE, weights_only=True)["step"] == int(whole.name[5:])
        assert (whole / "adapter" / "adapter_model.safetensors").is_file()

    server = start(chat_model_dir, data, adapters)
    try:
        with openai_for(server) as client:
            done = wait_for(client, job.id, timeout_s=120)
        assert done.status == "succeeded", done.error
    finally:
        server.shutdown(grace_s=5)
    assert not list(ckpts.glob(".step-*.tmp"))
    mine = load_file(str(adapters / done.fine_tuned_model / "adapter_model.safetensors"))
    assert _same(mine, _uninterrupted(server, job.id, tmp_path / "offline"))
