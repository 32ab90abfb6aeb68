"""The whole flow with the official openai client against a real server on loopback: upload,
create a job, follow its events to `succeeded`, chat with `fine_tuned_model` (over HTTP and gRPC)
while a base-model stream keeps flowing, and the adapter equals what `quiver train` makes."""
from __future__ import annotations

import threading
import time

import pytest
import torch
from safetensors.torch import load_file

from runtime.server.client import QuiverClient
from tests.training.conftest import ADMIN, BASE_ID, FAST, jsonl, learn_rows, openai_for, start, wait_for
from trainer import TrainConfig, train


@pytest.fixture
def server(chat_model_dir, tmp_path):
    srv = start(chat_model_dir, tmp_path / "data", tmp_path / "adapters")
    yield srv
    srv.shutdown(grace_s=5)


def _busy_until_a_step(client, job_id: str, timeout_s: float = 120.0):
    """Two clients streaming 240-token base requests back to back, overlapping, so the engine is
    never without a request, until the job reports trained tokens (a step done beside them):
    (the job then, each stream's completion token count)."""
    stop, counts = threading.Event(), []

    def pump():
        while not stop.is_set():
            chunks = list(client.chat.completions.create(
                model=BASE_ID, messages=[{"role": "user", "content": "w5 w6"}], max_tokens=240, stream=True,
                temperature=0, stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
            counts.append(chunks[-1].usage.completion_tokens)

    threads = [threading.Thread(target=pump) for _ in range(2)]
    for i, t in enumerate(threads):
        t.start()
        time.sleep(0.2 * (i + 1))  # offset: one is always mid-stream while the other starts
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            job = client.fine_tuning.jobs.retrieve(job_id)
            if job.trained_tokens or time.monotonic() > deadline:
                return job, counts
            time.sleep(0.1)
    finally:
        stop.set()
        for t in threads:
            t.join()


@pytest.mark.slow
def test_upload_train_and_serve_the_result_while_a_base_stream_flows(server, tmp_path):
    rows = learn_rows()
    with openai_for(server) as client:
        f = client.files.create(file=("learn.jsonl", jsonl(rows)), purpose="fine-tune")
        assert (f.purpose, f.bytes, f.filename) == ("fine-tune", len(jsonl(rows)), "learn.jsonl")
        assert [x.id for x in client.files.list()] == [f.id]

        stream = client.chat.completions.create(
            model=BASE_ID, messages=[{"role": "user", "content": "w5 w6"}], max_tokens=240, stream=True,
            temperature=0, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        pieces = [next(stream)]
        job = client.fine_tuning.jobs.create(
            model=BASE_ID, training_file=f.id, suffix="counting", seed=3,
            method={"type": "supervised", "supervised": FAST}, extra_body={"quiver": {"rank": 8, "save_every": 20}})
        assert job.status == "queued" and job.fine_tuned_model is None
        pieces += list(stream)
        assert pieces[-1].usage.completion_tokens == 240  # the base stream lost nothing meanwhile
        during, counts = _busy_until_a_step(client, job.id)
        assert during.trained_tokens, "no training step ran while base streams were in flight"
        assert counts and set(counts) == {240}, counts  # and none of them lost a token

        done = wait_for(client, job.id)
        assert done.status == "succeeded", done.error
        assert done.fine_tuned_model == f"ft/{BASE_ID}/counting/{job.id.removeprefix('ftjob-')}"
        assert done.hyperparameters.n_epochs == 40 and done.seed == 3
        events = list(client.fine_tuning.jobs.list_events(job.id, limit=100))
        steps = [e for e in events if e.type == "metrics"]
        assert len(steps) == 40 * 2 and events[0].message == "The job has successfully completed"
        assert steps[0].data["step"] == 80 and steps[-1].data["step"] == 1  # newest first
        assert steps[0].data["train_loss"] < steps[-1].data["train_loss"]
        checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id, limit=20).data
        assert [c.step_number for c in checkpoints] == [80, 60, 40, 20]  # quiver.save_every

        served = {}
        for row in rows:
            question, answer = (m["content"] for m in row["messages"])
            reply = client.chat.completions.create(model=done.fine_tuned_model, max_tokens=2, temperature=0,
                                                   messages=[{"role": "user", "content": question}])
            served[question] = reply.choices[0].message.content.strip()
        right = sum(served[r["messages"][0]["content"]] == r["messages"][1]["content"] for r in rows)
        assert right >= 0.8 * len(rows), served
        assert done.fine_tuned_model in [m.id for m in client.models.list()]

    with QuiverClient(server.address, timeout=60, token=ADMIN) as grpc_client:
        q = rows[0]["messages"][0]["content"]
        out = grpc_client.generate(messages=[("user", q)], adapter_id=done.fine_tuned_model, max_new_tokens=2)
        assert out.text.strip() == served[q]

    # the same adapter `quiver train` makes on the same base with the job's settings: serving
    # traffic in between changed nothing (the job's RNG and slots are its own)
    spec = server.core.training.state.job(job.id)["spec"]["train_config"]
    server.shutdown(grace_s=5)
    offline = train(TrainConfig.from_dict({**spec, "output": str(tmp_path / "offline"), "save_every": 0}),
                    base=server.core.base)
    mine = load_file(str(tmp_path / "adapters" / done.fine_tuned_model / "adapter_model.safetensors"))
    theirs = load_file(str(offline / "adapter_model.safetensors"))
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
