"""A server on an S3 adapter store (--adapter-store s3://...), against a real S3 server on
loopback: adapters load lazily from the bucket, an absent one is 404 naming the store, and a
fine-tuning job's adapter is uploaded there, so a server with another cache serves it too."""
from __future__ import annotations

import pytest

from runtime.adapters.peft_format import CONFIG_NAME, SAFETENSORS_NAME
from runtime.adapters.s3_store import S3AdapterStore
from tests.http.conftest import BASE_ID
from tests.peft_factory import make_peft_adapter, make_tiny_model
from tests.s3_factory import s3_bucket, s3_client, upload_adapter
from tests.server.conftest import server_config
from tests.training import conftest as training
from tests.training.conftest import FAST, jsonl, learn_rows, openai_for, wait_for

chat_model_dir = training.chat_model_dir  # the tiny random chat model, as a fixture here too
BUCKET, PREFIX = "served", "fleet/"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def endpoint():
    with s3_bucket(BUCKET) as url:
        yield url


@pytest.fixture
def server(chat_model_dir, endpoint, tmp_path):
    from runtime.server.app import build_server

    cfg = server_config(chat_model_dir, http_port=0, served_model_name=BASE_ID, admin_token="adm",
                        data_dir=str(tmp_path / "data"), adapter_store=f"s3://{BUCKET}/{PREFIX}",
                        adapter_cache_dir=str(tmp_path / "cache"), s3_endpoint_url=endpoint)
    srv = build_server(cfg).start()
    yield srv
    srv.shutdown(grace_s=5)


def test_lazy_loads_come_from_the_bucket_and_an_absent_adapter_is_404(server, endpoint, tmp_path):
    import openai

    src = make_peft_adapter(make_tiny_model("llama", seed=0), "lora", tmp_path / "src", seed=4)
    upload_adapter(s3_client(endpoint), BUCKET, PREFIX, "team/lora", src)
    with openai_for(server, "adm") as client:
        ask = dict(prompt="w3 w4 w5", max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
        tuned = client.completions.create(model="team/lora", **ask).choices[0].text
        base = client.completions.create(model=BASE_ID, **ask).choices[0].text
        assert tuned != base, "the adapter fetched from S3 changed nothing"
        with pytest.raises(openai.NotFoundError) as info:
            client.completions.create(model="team/absent", **ask)
        assert info.value.body["code"] == "model_not_found"
        assert f"s3://{BUCKET}/{PREFIX}team/absent/" in info.value.body["message"]
    assert (tmp_path / "cache" / "team" / "lora" / SAFETENSORS_NAME).is_file()


def test_a_fine_tuned_adapter_is_uploaded_and_another_cache_serves_it(server, endpoint, tmp_path):
    with openai_for(server, "adm") as client:
        f = client.files.create(file=("learn.jsonl", jsonl(learn_rows())), purpose="fine-tune")
        job = client.fine_tuning.jobs.create(model=BASE_ID, training_file=f.id, suffix="s3",
                                             method={"type": "supervised", "supervised": FAST},
                                             extra_body={"quiver": {"rank": 8}})
        done = wait_for(client, job.id)
        assert done.status == "succeeded", done.error
    name = done.fine_tuned_model
    keys = {o["Key"] for o in s3_client(endpoint).list_objects_v2(Bucket=BUCKET, Prefix=f"{PREFIX}{name}/")["Contents"]}
    assert keys == {f"{PREFIX}{name}/{CONFIG_NAME}", f"{PREFIX}{name}/{SAFETENSORS_NAME}"}
    other = S3AdapterStore(f"s3://{BUCKET}/{PREFIX}", tmp_path / "elsewhere", endpoint_url=endpoint)
    local = server.core.store.path_for_id(name)
    assert (other.fetch(name) / SAFETENSORS_NAME).read_bytes() == (local / SAFETENSORS_NAME).read_bytes()
