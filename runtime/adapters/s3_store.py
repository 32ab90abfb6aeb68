"""An adapter store in an S3-compatible bucket, shared by every server and machine that names it.

    --adapter-store s3://bucket/prefix         adapter id `team/a` = objects under prefix/team/a/
    --s3-endpoint-url http://minio:9000        any S3-compatible server (or AWS_ENDPOINT_URL)
    --adapter-cache-dir DIR                    local copies (default $QUIVER_HOME/adapter-cache)

Credentials, region and endpoint come from the usual AWS settings (environment, ~/.aws, an
instance role): boto3 reads them, Quiver never sees or logs a secret.

Why a cache and not reads from the bucket: the loader (loader.py) and its checks work on a
directory. `fetch(id)` makes `<cache>/<id>` a copy of the bucket's objects and everything after
it is the local store's path: the same id validation, the same confinement (the copy must
resolve inside the cache), the same PEFT checks in read_adapter. What is copied is narrow:

- only the objects `<prefix>/<id>/adapter_config.json` and `<prefix>/<id>/adapter_model.safetensors`;
  an id is validated (store.validate_adapter_id) before it becomes a key, and keys are built
  from it, never taken from a listing, so no key outside the prefix is ever read;
- never `adapter_model.bin`: it is a pickle, and a store shared by many writers is exactly where
  one should not be unpickled; an adapter that has only that file is refused, naming it;
- each object within a size cap, read in chunks into a temporary directory in the cache and
  moved into place whole (os.replace) under a file lock, so a reader never sees half a copy and
  two servers sharing a cache directory fetch once.

A copy is reused while the bucket's ETags match the ones recorded beside it (`.quiver-s3.json`):
a lazy load costs one LIST request, and a changed adapter (re-trained, re-uploaded) is fetched
again on its next load. When the bucket cannot be reached, a complete earlier copy is served and
the outage logged; without one the request fails as retryable (AdapterStoreUnavailable, 503).

`publish(id, dir)` uploads a finished adapter (a fine-tuning job's export, runtime/training;
an adapter loaded through vLLM's load route on a Ray replica, runtime/distributed): weights
first, config last, since a reader treats the config as the adapter's presence.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from runtime.adapters.peft_format import BIN_NAME, CONFIG_NAME, SAFETENSORS_NAME
from runtime.adapters.registry import AdapterNotFound
from runtime.adapters.store import (AdapterPathError, AdapterStore, AdapterStoreUnavailable,
                                    validate_adapter_id)
from runtime.adapters.types import AdapterFormatError

log = logging.getLogger(__name__)

#: the objects of one adapter that are ever read, with their size caps (bytes)
FETCHED = {CONFIG_NAME: 1 << 20, SAFETENSORS_NAME: 16 << 30}
#: written beside a cached copy: where it came from and the ETags it was fetched at
MANIFEST_NAME = ".quiver-s3.json"
BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
CHUNK = 1 << 20


class AdapterNotInStore(AdapterNotFound):
    """No adapter_config.json for this id in the bucket (NOT_FOUND / 404)."""

    def __init__(self, adapter_id: str, where: str):
        super().__init__(adapter_id)
        self.where = where

    def __str__(self) -> str:
        return f"adapter {self.args[0]!r} is not in the adapter store (no {CONFIG_NAME} under {self.where})"


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str  # "" or "a/b/" (always ends with "/")

    @classmethod
    def parse(cls, uri: str) -> "S3Location":
        """s3://bucket[/prefix]; the prefix obeys the adapter-id rules (no '..', '.', '//')."""
        if not uri.startswith("s3://"):
            raise ValueError(f"--adapter-store {uri!r}: an S3 store is s3://bucket/prefix")
        bucket, _, prefix = uri[len("s3://"):].partition("/")
        if not BUCKET_RE.fullmatch(bucket):
            raise ValueError(f"--adapter-store {uri!r}: {bucket!r} is not a valid bucket name")
        prefix = prefix.strip("/")
        if prefix:
            try:
                validate_adapter_id(prefix)
            except AdapterPathError as e:
                raise ValueError(f"--adapter-store {uri!r}: the prefix {e}".replace("adapter id ", "")) from e
        return cls(bucket, prefix + "/" if prefix else "")

    def key(self, adapter_id: str, name: str) -> str:
        return f"{self.prefix}{adapter_id}/{name}"

    def uri(self, adapter_id: str = "") -> str:
        return f"s3://{self.bucket}/{self.prefix}{adapter_id + '/' if adapter_id else ''}"


def make_client(endpoint_url: str | None = None):
    """boto3's S3 client with the usual AWS settings; path-style addressing when an endpoint is
    given (MinIO, Ceph, a local test server: no per-bucket DNS names there)."""
    import boto3
    from botocore.config import Config

    endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    config = Config(retries={"max_attempts": 4, "mode": "standard"}, connect_timeout=5, read_timeout=60,
                    s3={"addressing_style": "path"} if endpoint_url else None)
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url or None, config=config)


def default_cache_dir(location: S3Location) -> Path:
    from runtime.models.embedded import quiver_home

    return quiver_home() / "adapter-cache" / location.bucket / location.prefix


class S3AdapterStore(AdapterStore):
    def __init__(self, uri: str, cache_dir: str | os.PathLike | None = None, allowed_roots=(),
                 endpoint_url: str | None = None, client=None):
        self.location = S3Location.parse(uri)
        cache = Path(cache_dir) if cache_dir else default_cache_dir(self.location)
        cache.mkdir(parents=True, exist_ok=True)
        super().__init__(cache, allowed_roots)
        self.client = client if client is not None else make_client(endpoint_url)

    def describe(self) -> str:
        return self.location.uri()

    # ---- reading --------------------------------------------------------------------------
    def fetch(self, adapter_id: str) -> Path:
        """`<cache>/<id>`, a current copy of the bucket's adapter (module docstring)."""
        path = self.path_for_id(adapter_id)  # validates the id; confined to the cache
        try:
            remote = self._objects(adapter_id)
        except AdapterStoreUnavailable:
            if _manifest(path) is not None:
                log.warning("adapter store %s unreachable; serving the cached copy of %s",
                            self.describe(), adapter_id)
                return path
            raise
        if CONFIG_NAME not in remote:
            raise AdapterNotInStore(adapter_id, self.location.uri(adapter_id))
        if SAFETENSORS_NAME not in remote and BIN_NAME in remote:
            raise AdapterFormatError(
                f"adapter {adapter_id!r} in {self.describe()} has only {BIN_NAME}, a pickle; the "
                f"S3 store reads {SAFETENSORS_NAME} only (convert it: PEFT's save_pretrained "
                "writes safetensors by default)")
        wanted = {name: remote[name] for name in FETCHED if name in remote}
        with FileLock(str(self._lock_path(adapter_id))):
            if not _current(path, wanted):
                self._download(adapter_id, path, wanted)
        return path

    def version(self, adapter_id: str) -> dict[str, str]:
        """{object name: ETag} of the adapter in the bucket now (one LIST; {} when absent),
        comparable with `cached_version`: a Ray replica's check for a replaced adapter."""
        self.path_for_id(adapter_id)  # validates the id
        return {name: etag for name, (etag, _) in self._objects(adapter_id).items() if name in FETCHED}

    def cached_version(self, adapter_id: str) -> dict[str, str] | None:
        """{object name: ETag} the cached copy was fetched (or published) at; None without one."""
        return _manifest(self.path_for_id(adapter_id))

    def _objects(self, adapter_id: str) -> dict[str, tuple[str, int]]:
        """name -> (ETag, size) of the objects directly under the adapter's key prefix that
        this store knows (FETCHED and BIN_NAME); anything else there is ignored."""
        prefix = self.location.key(adapter_id, "")
        try:
            page = self.client.list_objects_v2(Bucket=self.location.bucket, Prefix=prefix, Delimiter="/")
        except Exception as e:  # noqa: BLE001 - botocore's errors are many; all mean "not reachable"
            raise _unavailable(self, e) from e
        found = {}
        for obj in page.get("Contents", ()):
            name = obj["Key"][len(prefix):]
            if name in FETCHED or name == BIN_NAME:
                found[name] = (obj["ETag"], int(obj["Size"]))
        return found

    def _download(self, adapter_id: str, path: Path, wanted: dict[str, tuple[str, int]]) -> None:
        """Every wanted object into a fresh directory, then swapped in whole."""
        tmp = self.adapter_dir / f".fetch-{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            etags = {name: self._get(adapter_id, name, size, tmp / name) for name, (_, size) in wanted.items()}
            (tmp / MANIFEST_NAME).write_text(json.dumps({"source": self.location.uri(adapter_id),
                                                         "objects": etags}))
            _swap_in(tmp, path, self.adapter_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("adapter %s fetched from %s", adapter_id, self.location.uri(adapter_id))

    def _get(self, adapter_id: str, name: str, size: int, dest: Path) -> str:
        """One object into `dest`, within its cap; returns the ETag of what was read."""
        cap = FETCHED[name]
        if size > cap:
            raise AdapterFormatError(f"adapter {adapter_id!r}: {name} is {size} bytes in the store; "
                                     f"the cap is {cap}")
        try:
            obj = self.client.get_object(Bucket=self.location.bucket, Key=self.location.key(adapter_id, name))
        except Exception as e:  # noqa: BLE001
            raise _unavailable(self, e) from e
        written = 0
        with open(dest, "wb") as f:
            for chunk in obj["Body"].iter_chunks(CHUNK):
                written += len(chunk)
                if written > cap:
                    raise AdapterFormatError(f"adapter {adapter_id!r}: {name} passed its cap of "
                                             f"{cap} bytes while it was read")
                f.write(chunk)
        return obj["ETag"]

    def _lock_path(self, adapter_id: str) -> Path:
        locks = self.adapter_dir / ".locks"
        locks.mkdir(exist_ok=True)
        return locks / (hashlib.sha256(adapter_id.encode()).hexdigest()[:32] + ".lock")

    def remote_ids(self, limit: int = 4096, max_depth: int = 4) -> list[str]:
        """Ids of the adapters in the bucket (keys ending in /adapter_config.json), sorted; a key
        whose id is not a valid adapter id (`..`, empty parts) is skipped, not followed."""
        ids = []
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.location.bucket, Prefix=self.location.prefix):
                for obj in page.get("Contents", ()):
                    rest = obj["Key"][len(self.location.prefix):]
                    if not rest.endswith("/" + CONFIG_NAME):
                        continue
                    adapter_id = rest[:-len(CONFIG_NAME) - 1]
                    if _valid_id(adapter_id) and adapter_id.count("/") < max_depth:
                        ids.append(adapter_id)
                    if len(ids) >= limit:
                        return sorted(ids)
        except Exception as e:  # noqa: BLE001
            raise _unavailable(self, e) from e
        return sorted(ids)

    # ---- writing --------------------------------------------------------------------------
    def publish(self, adapter_id: str, path: Path) -> None:
        """Upload the adapter at `path` as `adapter_id` (weights, then config). Only the files
        the loader reads go up, each resolving inside an allowed root; never a pickle."""
        validate_adapter_id(adapter_id)
        path = Path(path).resolve()
        files = [n for n in (SAFETENSORS_NAME, CONFIG_NAME) if (path / n).is_file()]
        if files != [SAFETENSORS_NAME, CONFIG_NAME]:
            raise AdapterFormatError(f"{path} needs {SAFETENSORS_NAME} and {CONFIG_NAME} to be "
                                     "published to the adapter store (no pickled weights)")
        self.check_unchanged(path, tuple(files))
        etags = {}
        for name in files:
            key = self.location.key(adapter_id, name)
            try:
                self.client.upload_file(str(path / name), self.location.bucket, key)
                etags[name] = self.client.head_object(Bucket=self.location.bucket, Key=key)["ETag"]
            except Exception as e:  # noqa: BLE001
                raise _unavailable(self, e) from e
        if path == self.path_for_id(adapter_id):  # the copy in the cache is the bucket's now
            (path / MANIFEST_NAME).write_text(json.dumps({"source": self.location.uri(adapter_id),
                                                          "objects": etags}))
        log.info("adapter %s published to %s", adapter_id, self.location.uri(adapter_id))


def _unavailable(store: S3AdapterStore, error: Exception) -> AdapterStoreUnavailable:
    return AdapterStoreUnavailable(f"the adapter store {store.describe()} could not be read: {error}")


def _valid_id(adapter_id: str) -> bool:
    try:
        validate_adapter_id(adapter_id)
        return True
    except AdapterPathError:
        return False


def _manifest(path: Path) -> dict | None:
    """The ETags a cached copy was fetched at, if it is a complete copy."""
    try:
        recorded = json.loads((path / MANIFEST_NAME).read_text())["objects"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not all((path / name).is_file() for name in recorded):
        return None
    return recorded


def _current(path: Path, wanted: dict[str, tuple[str, int]]) -> bool:
    """The cached copy holds exactly the wanted objects, at their ETags and sizes."""
    recorded = _manifest(path)
    if recorded is None or set(recorded) != set(wanted):
        return False
    return all(recorded[n] == etag and (path / n).stat().st_size == size for n, (etag, size) in wanted.items())


def _swap_in(tmp: Path, path: Path, root: Path) -> None:
    """Replace `path` by the directory `tmp` (both under `root`); the old copy is removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    old = None
    if path.exists() or path.is_symlink():
        old = root / f".old-{uuid.uuid4().hex}"
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        if old.is_symlink() or old.is_file():
            old.unlink()
        else:
            shutil.rmtree(old, ignore_errors=True)
