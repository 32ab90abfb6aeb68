"""The S3 adapter store (runtime/adapters/s3_store.py) against a real S3 server on loopback
(moto's server mode, tests/s3_factory.py): fetching into the cache, reuse by ETag, confinement
of ids and keys to the prefix, no pickles, missing objects, an unreachable store, publishing."""
from __future__ import annotations

import os
import socket

import pytest

from runtime.adapters import s3_store
from runtime.adapters.peft_format import BIN_NAME, CONFIG_NAME, SAFETENSORS_NAME, read_adapter
from runtime.adapters.registry import AdapterNotFound
from runtime.adapters.s3_store import MANIFEST_NAME, AdapterNotInStore, S3AdapterStore, S3Location
from runtime.adapters.store import AdapterPathError, AdapterStore, AdapterStoreUnavailable, open_store
from runtime.adapters.types import AdapterFormatError
from tests.peft_factory import make_peft_adapter, model_config
from tests.s3_factory import s3_bucket, s3_client, upload_adapter

BUCKET = "quiver-adapters"
PREFIX = "team/"


@pytest.fixture(scope="module")
def endpoint():
    with s3_bucket(BUCKET) as url:
        yield url


@pytest.fixture(scope="module")
def client(endpoint):
    return s3_client(endpoint)


@pytest.fixture(scope="module")
def lora_dirs(bases, tmp_path_factory):
    """Two LoRA adapters with different weights (to see a re-upload arrive)."""
    root = tmp_path_factory.mktemp("s3-src")
    return [make_peft_adapter(bases("llama"), "lora", root / f"v{i}", seed=i) for i in range(2)]


@pytest.fixture
def store(endpoint, tmp_path):
    return S3AdapterStore(f"s3://{BUCKET}/{PREFIX}", tmp_path / "cache", endpoint_url=endpoint)


def _unique(request) -> str:
    return request.node.name.replace("[", "-").replace("]", "").replace("_", "-")


def test_fetch_copies_the_adapter_and_reuses_the_copy_while_etags_match(store, client, lora_dirs, bases, request):
    adapter_id = f"{_unique(request)}/lora"
    upload_adapter(client, BUCKET, PREFIX, adapter_id, lora_dirs[0])
    path = store.fetch(adapter_id)
    assert path == (store.adapter_dir / adapter_id).resolve()
    for name in (CONFIG_NAME, SAFETENSORS_NAME):
        assert (path / name).read_bytes() == (lora_dirs[0] / name).read_bytes()
    read_adapter(path, model_config(bases("llama")))  # the copy passes the loader's checks
    inode = (path / SAFETENSORS_NAME).stat().st_ino
    assert store.fetch(adapter_id) == path
    assert (path / SAFETENSORS_NAME).stat().st_ino == inode, "an unchanged adapter was fetched again"

    upload_adapter(client, BUCKET, PREFIX, adapter_id, lora_dirs[1])  # re-trained: new ETag
    store.fetch(adapter_id)
    assert (path / SAFETENSORS_NAME).read_bytes() == (lora_dirs[1] / SAFETENSORS_NAME).read_bytes()
    assert not [p for p in store.adapter_dir.iterdir() if p.name.startswith((".fetch-", ".old-"))]


def test_version_is_the_buckets_etags_and_the_copy_records_what_it_was_fetched_at(store, client, lora_dirs, request):
    adapter_id = _unique(request)
    assert store.version(adapter_id) == {} and store.cached_version(adapter_id) is None
    upload_adapter(client, BUCKET, PREFIX, adapter_id, lora_dirs[0])
    first = store.version(adapter_id)
    assert set(first) == {CONFIG_NAME, SAFETENSORS_NAME}
    store.fetch(adapter_id)
    assert store.cached_version(adapter_id) == first
    upload_adapter(client, BUCKET, PREFIX, adapter_id, lora_dirs[1])  # replaced in the bucket
    assert store.version(adapter_id) != first and store.cached_version(adapter_id) == first
    store.fetch(adapter_id)
    assert store.cached_version(adapter_id) == store.version(adapter_id)
    with pytest.raises(AdapterPathError):
        store.version("../escape")


def test_a_damaged_copy_is_fetched_again(store, client, lora_dirs, request):
    adapter_id = _unique(request)
    upload_adapter(client, BUCKET, PREFIX, adapter_id, lora_dirs[0])
    path = store.fetch(adapter_id)
    (path / SAFETENSORS_NAME).write_bytes(b"truncated")
    store.fetch(adapter_id)
    assert (path / SAFETENSORS_NAME).read_bytes() == (lora_dirs[0] / SAFETENSORS_NAME).read_bytes()


@pytest.mark.parametrize("bad_id", ["../escape", "/abs", "a//b", "a/./b", "a/../../b", "x\x00y", ""])
def test_ids_that_would_leave_the_prefix_are_refused_before_any_request(store, bad_id):
    with pytest.raises(AdapterPathError):
        store.fetch(bad_id)


def test_keys_outside_the_prefix_or_not_ids_are_never_listed(store, client, lora_dirs, endpoint, tmp_path):
    upload_adapter(client, BUCKET, PREFIX, "listed", lora_dirs[0])
    client.put_object(Bucket=BUCKET, Key=f"{PREFIX}../evil/{CONFIG_NAME}", Body=b"{}")
    client.put_object(Bucket=BUCKET, Key=f"{PREFIX}a//b/{CONFIG_NAME}", Body=b"{}")
    client.put_object(Bucket=BUCKET, Key=f"{PREFIX}./dot/{CONFIG_NAME}", Body=b"{}")
    client.put_object(Bucket=BUCKET, Key=f"elsewhere/outside/{CONFIG_NAME}", Body=b"{}")
    ids = store.remote_ids()
    assert "listed" in ids
    assert not [i for i in ids if ".." in i or "//" in i or i.startswith("./") or "outside" in i]


def test_a_symlink_in_the_cache_pointing_outside_is_refused(store, client, lora_dirs, tmp_path):
    upload_adapter(client, BUCKET, PREFIX, "linked", lora_dirs[0])
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, store.adapter_dir / "linked")
    with pytest.raises(AdapterPathError, match="outside"):
        store.fetch("linked")
    assert not list(outside.iterdir()), "something was written through the link"


def test_a_pickle_only_adapter_is_refused_and_a_pickle_is_never_fetched(store, client, lora_dirs, tmp_path):
    client.upload_file(str(lora_dirs[0] / CONFIG_NAME), BUCKET, f"{PREFIX}pickled/{CONFIG_NAME}")
    client.put_object(Bucket=BUCKET, Key=f"{PREFIX}pickled/{BIN_NAME}", Body=b"\x80\x04not-unpickled")
    with pytest.raises(AdapterFormatError, match="pickle"):
        store.fetch("pickled")
    assert not (store.adapter_dir / "pickled").exists()

    upload_adapter(client, BUCKET, PREFIX, "both", lora_dirs[0])
    client.put_object(Bucket=BUCKET, Key=f"{PREFIX}both/{BIN_NAME}", Body=b"\x80\x04not-unpickled")
    client.put_object(Bucket=BUCKET, Key=f"{PREFIX}both/extra.py", Body=b"import os")
    path = store.fetch("both")
    assert sorted(p.name for p in path.iterdir()) == sorted([CONFIG_NAME, SAFETENSORS_NAME, MANIFEST_NAME])


def test_missing_objects(store, client, lora_dirs, bases):
    with pytest.raises(AdapterNotInStore, match="not in the adapter store") as info:
        store.fetch("never-uploaded")
    assert isinstance(info.value, AdapterNotFound)  # NOT_FOUND / 404 on both ports
    client.upload_file(str(lora_dirs[0] / CONFIG_NAME), BUCKET, f"{PREFIX}config-only/{CONFIG_NAME}")
    path = store.fetch("config-only")
    with pytest.raises(AdapterFormatError, match="weights are missing"):
        read_adapter(path, model_config(bases("llama")))


def test_objects_over_the_cap_are_refused(store, client, lora_dirs, monkeypatch):
    upload_adapter(client, BUCKET, PREFIX, "big", lora_dirs[0])
    monkeypatch.setitem(s3_store.FETCHED, SAFETENSORS_NAME, 100)
    with pytest.raises(AdapterFormatError, match="cap"):
        store.fetch("big")
    assert not (store.adapter_dir / "big").exists()


def _dead_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"  # closed again: connections are refused


def test_an_unreachable_store_serves_complete_copies_and_is_retryable_otherwise(store, client, lora_dirs, endpoint):
    upload_adapter(client, BUCKET, PREFIX, "cached", lora_dirs[0])
    store.fetch("cached")
    dead = S3AdapterStore(f"s3://{BUCKET}/{PREFIX}", store.adapter_dir, endpoint_url=_dead_endpoint())
    assert dead.fetch("cached") == store.adapter_dir / "cached"
    with pytest.raises(AdapterStoreUnavailable, match="could not be read"):
        dead.fetch("not-cached")


def test_publish_uploads_what_the_loader_reads_and_another_cache_fetches_it(store, lora_dirs, endpoint, tmp_path):
    store.roots.append(lora_dirs[1].parent.resolve())
    store.publish("published/one", lora_dirs[1])
    other = S3AdapterStore(f"s3://{BUCKET}/{PREFIX}", tmp_path / "other-cache", endpoint_url=endpoint)
    path = other.fetch("published/one")
    assert (path / SAFETENSORS_NAME).read_bytes() == (lora_dirs[1] / SAFETENSORS_NAME).read_bytes()
    assert "published/one" in other.remote_ids()


def test_publish_refuses_pickles_and_files_outside_the_roots(store, lora_dirs, tmp_path):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / CONFIG_NAME).write_bytes((lora_dirs[0] / CONFIG_NAME).read_bytes())
    (pickled / BIN_NAME).write_bytes(b"\x80\x04")
    store.roots.append(tmp_path.resolve())
    with pytest.raises(AdapterFormatError, match="no pickled weights"):
        store.publish("pickled", pickled)
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / CONFIG_NAME).write_bytes((lora_dirs[0] / CONFIG_NAME).read_bytes())
    os.symlink(lora_dirs[0] / SAFETENSORS_NAME, linked / SAFETENSORS_NAME)  # outside every root
    with pytest.raises(AdapterPathError, match="outside"):
        store.publish("linked", linked)
    with pytest.raises(AdapterPathError):
        store.publish("../up", lora_dirs[0])


@pytest.mark.parametrize("uri,bucket,prefix", [("s3://b-1/", "b-1", ""), ("s3://bkt/a/b", "bkt", "a/b/"),
                                               ("s3://bkt/a/b/", "bkt", "a/b/")])
def test_locations(uri, bucket, prefix):
    loc = S3Location.parse(uri)
    assert (loc.bucket, loc.prefix) == (bucket, prefix)
    assert loc.key("x/y", CONFIG_NAME) == f"{prefix}x/y/{CONFIG_NAME}"


@pytest.mark.parametrize("uri", ["s3://", "s3://UPPER/p", "s3://bkt/../p", "s3://bkt/a//b", "http://bkt/p"])
def test_bad_locations_are_refused(uri):
    with pytest.raises(ValueError):
        S3Location.parse(uri)


def test_open_store_picks_the_store_from_the_flags(endpoint, tmp_path):
    assert isinstance(open_store(None, (), f"s3://{BUCKET}/{PREFIX}", str(tmp_path / "c"), endpoint), S3AdapterStore)
    local = open_store(str(tmp_path), ())
    assert not isinstance(local, S3AdapterStore) and local.fetch("x") == (tmp_path / "x").resolve()


def test_a_local_directory_store_versions_its_files(tmp_path):
    """The version a Ray replica compares to notice a replaced adapter, for a local store: the
    files' mtime and size; {} for an id with none; the copy it loads from is the store's own."""
    store = AdapterStore(tmp_path)
    assert store.version("team/a") == {}
    (tmp_path / "team" / "a").mkdir(parents=True)
    (tmp_path / "team" / "a" / CONFIG_NAME).write_text("{}")
    before = store.version("team/a")
    assert set(before) == {CONFIG_NAME} and store.cached_version("team/a") == before
    (tmp_path / "team" / "a" / CONFIG_NAME).write_text('{"r": 8}')
    assert store.version("team/a") != before
    with pytest.raises(AdapterPathError):
        store.version("../escape")
