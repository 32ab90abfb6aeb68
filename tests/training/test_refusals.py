"""What the fine-tuning routes refuse, with the right 4xx and nothing half-written; a failing or
cancelled job leaves the server serving; the gRPC Training service; the quiver_training_* metrics."""
from __future__ import annotations

import json
import urllib.request

import grpc
import openai
import pytest

from runtime.server.client import make_channel
from runtime.server.stubs import training_pb2 as tpb
from runtime.server.stubs import training_pb2_grpc
from tests.training.conftest import ADMIN, BASE_ID, jsonl, learn_rows, openai_for, start, wait_for

GOOD = jsonl(learn_rows())


@pytest.fixture(scope="module")
def server(chat_model_dir, tmp_path_factory):
    # no --adapter-dir: results go to <data-dir>/adapters, registered when done
    srv = start(chat_model_dir, tmp_path_factory.mktemp("data"), max_file_bytes=4096, max_train_epochs=20)
    yield srv
    srv.shutdown(grace_s=5)


@pytest.fixture(scope="module")
def client(server):
    with openai_for(server) as c:
        yield c


def _data_dir(server):
    return server.core.training.data_dir


BAD_FILES = {
    "not JSON": ([json.dumps(learn_rows()[0]), json.dumps(learn_rows()[1]), "{oops"], "line 3: not valid JSON"),
    "unknown keys": ([json.dumps(learn_rows()[0]), '{"question": "a", "answer": "b"}'], "line 2: unrecognised row keys"),
    "no assistant": (['{"messages": [{"role": "user", "content": "w5"}]}'], "line 1: 'messages' has no assistant turn"),
    "bad role": (['{"messages": [{"role": "robot", "content": "w5"}]}'], "line 1: messages[0] has role 'robot'"),
    "not an object": (['[1, 2]'], "line 1: a row must be a JSON object"),
    "empty": ([""], "no rows"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_a_bad_file_is_refused_with_its_line_and_nothing_is_kept(case, client, server):
    rows, message = BAD_FILES[case]
    with pytest.raises(openai.BadRequestError) as e:
        client.files.create(file=("bad.jsonl", jsonl(rows)), purpose="fine-tune")
    assert message in e.value.message and e.value.body["param"] == "file"
    assert not any(f.filename == "bad.jsonl" for f in client.files.list())
    assert not list((_data_dir(server) / "files").glob(".upload-*"))


def test_size_cap_and_purpose(client, server):
    before = sorted(p.name for p in (_data_dir(server) / "files").iterdir())
    with pytest.raises(openai.APIStatusError) as e:
        client.files.create(file=("big.jsonl", GOOD * 40), purpose="fine-tune")
    assert e.value.status_code == 413
    with pytest.raises(openai.BadRequestError, match="purpose"):
        client.files.create(file=("ok.jsonl", GOOD), purpose="assistants")
    assert sorted(p.name for p in (_data_dir(server) / "files").iterdir()) == before


def test_file_routes(client):
    f = client.files.create(file=("learn.jsonl", GOOD), purpose="fine-tune")
    assert client.files.retrieve(f.id).bytes == len(GOOD)
    assert client.files.content(f.id).read() == GOOD
    assert client.files.delete(f.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(f.id)


def test_job_requests_refused_before_anything_is_written(client, server):
    f = client.files.create(file=("learn.jsonl", GOOD), purpose="fine-tune")
    jobs_before = [j.id for j in client.fine_tuning.jobs.list()]
    with pytest.raises(openai.NotFoundError) as e:
        client.fine_tuning.jobs.create(model="gpt-4o-mini", training_file=f.id)
    assert e.value.code == "model_not_found"
    cases = {
        "hyperparameters.n_epochs": dict(hyperparameters={"n_epochs": 21}),  # --max-train-epochs 20
        "training_file": dict(training_file="file-nope"),
        "method.type": dict(method={"type": "dpo"}),
        "quiver.method": dict(extra_body={"quiver": {"method": "ia3"}}),
        "quiver.data": dict(extra_body={"quiver": {"data": "/etc/passwd"}}),
        "quiver.rank": dict(extra_body={"quiver": {"rank": 64}}),  # above --max-lora-rank 8
        "quiver.no_such_option": dict(extra_body={"quiver": {"no_such_option": 1}}),
        "suffix": dict(suffix="has:colons"),
    }
    for param, overrides in cases.items():
        args = {"model": BASE_ID, "training_file": f.id, **overrides}
        with pytest.raises(openai.BadRequestError) as e:
            client.fine_tuning.jobs.create(**args)
        assert e.value.body["param"] == param, (param, e.value.message)
    assert [j.id for j in client.fine_tuning.jobs.list()] == jobs_before
    assert not (_data_dir(server) / "jobs").exists() or not any((_data_dir(server) / "jobs").iterdir())


def test_admin_token_is_required(server):
    with openai_for(server, token="wrong") as bad:
        with pytest.raises(openai.AuthenticationError):
            bad.files.create(file=("learn.jsonl", GOOD), purpose="fine-tune")
        with pytest.raises(openai.AuthenticationError):
            bad.fine_tuning.jobs.list()
    req = urllib.request.Request(f"http://127.0.0.1:{server.http_port}/v1/fine_tuning/jobs")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code == 401
    with make_channel(server.address) as channel:
        with pytest.raises(grpc.RpcError) as e:
            training_pb2_grpc.TrainingStub(channel).ListJobs(tpb.ListJobsRequest(), timeout=10)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.slow
def test_a_failing_job_says_why_and_the_server_keeps_serving(client, server):
    f = client.files.create(file=("learn.jsonl", GOOD), purpose="fine-tune")
    # every row is cut to 2 tokens: no assistant token is left to learn from
    job = client.fine_tuning.jobs.create(model=BASE_ID, training_file=f.id, extra_body={"quiver": {"max_seq_len": 2}})
    done = wait_for(client, job.id)
    assert done.status == "failed" and done.error.code == "invalid_training_file", done.error
    assert "training file" in done.error.message and "no usable training rows" in done.error.message
    reply = client.chat.completions.create(model=BASE_ID, messages=[{"role": "user", "content": "w5"}], max_tokens=3)
    assert reply.choices[0].finish_reason in ("length", "stop")


@pytest.mark.slow
def test_jobs_queue_one_at_a_time_cancel_frees_and_grpc_watches(client, server):
    f = client.files.create(file=("learn.jsonl", GOOD), purpose="fine-tune")
    quick = {"hyperparameters": {"n_epochs": 2, "batch_size": 4}}
    first = client.fine_tuning.jobs.create(model=BASE_ID, training_file=f.id, method={"type": "supervised", "supervised": quick})
    doomed = client.fine_tuning.jobs.create(model=BASE_ID, training_file=f.id, hyperparameters={"n_epochs": 20, "batch_size": 1})
    third = client.fine_tuning.jobs.create(model=BASE_ID, training_file=f.id, suffix="prompt",
                                           hyperparameters={"n_epochs": 2}, extra_body={"quiver": {"method": "prompt", "num_virtual_tokens": 4}})
    assert client.fine_tuning.jobs.retrieve(third.id).status == "queued"
    with pytest.raises(openai.APIStatusError) as e:  # pending jobs still need it
        client.files.delete(f.id)
    assert e.value.status_code == 409
    wait_for(client, doomed.id, statuses=("running",))
    assert client.fine_tuning.jobs.retrieve(first.id).status == "succeeded"  # one at a time, in order
    assert client.fine_tuning.jobs.cancel(doomed.id).status == "cancelled"
    with pytest.raises(openai.APIStatusError) as e:
        client.fine_tuning.jobs.cancel(doomed.id)
    assert e.value.status_code == 409

    with make_channel(server.address, token=ADMIN) as channel:
        stub = training_pb2_grpc.TrainingStub(channel)
        events = list(stub.WatchJob(tpb.WatchJobRequest(job_id=third.id), timeout=60))
        got = stub.GetJob(tpb.GetJobRequest(job_id=third.id), timeout=10)
        assert got.status == tpb.JOB_STATUS_SUCCEEDED and got.method == "prompt"
        assert events[0].message.startswith("Created fine-tuning job") and "successfully" in events[-1].message
        assert [int(e.data["step"]) for e in events if e.type == "metrics"] == list(range(1, 5))
        with pytest.raises(grpc.RpcError) as e:
            stub.CancelJob(tpb.CancelJobRequest(job_id=third.id), timeout=10)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        with pytest.raises(grpc.RpcError) as e:
            stub.GetJob(tpb.GetJobRequest(job_id="ftjob-nope"), timeout=10)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        listed = stub.ListJobs(tpb.ListJobsRequest(limit=2), timeout=10)
        assert [j.id for j in listed.jobs] == [third.id, doomed.id] and listed.has_more

    cancelled = client.fine_tuning.jobs.retrieve(doomed.id)
    assert cancelled.status == "cancelled" and cancelled.fine_tuned_model is None
    assert server.core.training.scheduler.active is None  # nothing held
    linears = server.core.base.model.adapted_linears().values()
    assert all(lin.lora is None or lin.lora.num_slots == server.core.registry.num_slots for lin in linears)
    # the prompt-tuning result serves at once (registered from <data-dir>/adapters)
    done = client.fine_tuning.jobs.retrieve(third.id)
    reply = client.chat.completions.create(model=done.fine_tuned_model, messages=[{"role": "user", "content": "w5"}],
                                           max_tokens=2)
    assert reply.model == done.fine_tuned_model

    metrics = urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/metrics", timeout=10).read().decode()
    series = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
              if line.startswith("quiver_training")}
    assert series['quiver_training_jobs{status="succeeded"}'] >= 2
    assert series['quiver_training_jobs{status="cancelled"}'] == 1
    assert series["quiver_training_tokens_total"] > 0
    assert series["quiver_training_step_seconds_count"] >= 8


def test_a_second_server_on_the_same_data_dir_serves_without_fine_tuning(chat_model_dir, server, caplog):
    other = start(chat_model_dir, _data_dir(server))
    try:
        assert other.core.training is None  # two would both run the queued jobs
        assert any("another server is using the data directory" in r.getMessage() for r in caplog.records)
        with openai_for(other) as c:
            assert c.chat.completions.create(model=BASE_ID, messages=[{"role": "user", "content": "w5"}],
                                             max_tokens=2).choices
            with pytest.raises(openai.NotFoundError):
                c.fine_tuning.jobs.list()
    finally:
        other.shutdown(grace_s=5)


@pytest.mark.slow
def test_grpc_create_job_with_quiver_options(client, server):
    from google.protobuf import struct_pb2

    f = client.files.create(file=("learn.jsonl", GOOD), purpose="fine-tune")
    options = struct_pb2.Struct()
    options.update({"rank": 4, "targets": "q_proj,v_proj", "save_every": 1})
    with make_channel(server.address, token=ADMIN) as channel:
        stub = training_pb2_grpc.TrainingStub(channel)
        bad = tpb.CreateJobRequest(model=BASE_ID, training_file=f.id, method="lora",
                                   hyperparameters=tpb.Hyperparameters(n_epochs=99))
        with pytest.raises(grpc.RpcError) as e:
            stub.CreateJob(bad, timeout=10)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "n_epochs" in e.value.details()
        job = stub.CreateJob(tpb.CreateJobRequest(model=BASE_ID, training_file=f.id, method="dora", suffix="g",
                                                  seed=5, options=options,
                                                  hyperparameters=tpb.Hyperparameters(n_epochs=1, batch_size=4)),
                             timeout=10)
        assert job.status == tpb.JOB_STATUS_QUEUED and job.seed == 5 and job.hyperparameters.n_epochs == 1
        list(stub.WatchJob(tpb.WatchJobRequest(job_id=job.id), timeout=60))
        done = stub.GetJob(tpb.GetJobRequest(job_id=job.id), timeout=10)
    assert done.status == tpb.JOB_STATUS_SUCCEEDED, done.error.message
    assert done.method == "dora" and done.options["rank"] == 4 and done.trained_tokens > 0
    assert done.fine_tuned_model == f"ft/{BASE_ID}/g/{job.id.removeprefix('ftjob-')}"
    config = server.core.training.scheduler.adapter_root / done.fine_tuned_model
    peft = json.loads((config / "adapter_config.json").read_text())
    assert peft["use_dora"] and peft["r"] == 4 and sorted(peft["target_modules"]) == ["q_proj", "v_proj"]
    assert [c.step_number for c in client.fine_tuning.jobs.checkpoints.list(job.id).data] == [2, 1]



@pytest.mark.slow
def test_an_ended_jobs_objects_are_collected_when_the_engine_is_idle(client, server):
    """A LoRA job's parametrized slot modules sit in reference cycles (~35k objects on the
    embedded model); the scheduler collects them at the engine's next idle moment instead of
    leaving them to the cyclic collector's own timing (a 25-50 ms pause inside some stream).
    With that collector off here, only the scheduler's collection can free them."""
    import gc
    import time
    import weakref

    f = client.files.create(file=("learn.jsonl", GOOD), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model=BASE_ID, training_file=f.id, hyperparameters={"n_epochs": 20})
    sched = server.core.training.scheduler
    deadline = time.monotonic() + 30
    while (sched.active is None or sched.active.run is None or not sched.active.run.ready) and time.monotonic() < deadline:
        time.sleep(0.01)
    slots = weakref.ref(next(iter(sched.active.run.trainer.method._slots.values())))
    gc.disable()
    try:
        client.fine_tuning.jobs.cancel(job.id)
        deadline = time.monotonic() + 10
        while slots() is not None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert slots() is None and sched.active is None
    finally:
        gc.enable()
