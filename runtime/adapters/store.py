"""Where adapters may be read from: ids under the adapter directory, sources under allowed roots.

An adapter id names a directory below `--adapter-dir` (`customer-7/support-v2`). Ids and sources
come from clients, so every path is checked *after* resolving symlinks: it must stay inside one
of the configured roots. Nothing outside them is ever opened.

The check happens before the read, on another thread than the read, so a directory swapped for a
symlink in between would be followed. `check_unchanged` runs before and again after the read (see
loader.py): the directory must still resolve to the path that was checked, and the files the
reader opens (config, weights; they may be symlinks, e.g. into a Hugging Face cache's blobs/) must
resolve inside a root too. What this cannot catch is a swap that is undone before the read ends;
it takes write access to the adapter directory, which is already the power to serve any adapter.

A store may also be remote (s3_store.py: `--adapter-store s3://bucket/prefix`): then the adapter
directory is its local cache, `fetch` brings an id into it before the checks above run on the
copy, and `publish` writes a finished adapter (a fine-tuning job's, runtime/training) back, so
every server sharing the store can serve it. For a local directory both are no-ops.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from runtime.adapters.peft_format import CONFIG_NAME, SAFETENSORS_NAME

ADAPTER_ID_RE = re.compile(r"[A-Za-z0-9._/-]+")
MAX_ADAPTER_ID_LEN = 256


class AdapterPathError(ValueError):
    """An adapter id or source path that is malformed or points outside the allowed roots."""


class AdapterStoreUnavailable(OSError):
    """A remote adapter store could not be reached (retryable: UNAVAILABLE / 503)."""


def validate_adapter_id(adapter_id: str) -> None:
    if not adapter_id or len(adapter_id) > MAX_ADAPTER_ID_LEN:
        raise AdapterPathError(f"adapter id must be 1..{MAX_ADAPTER_ID_LEN} characters")
    if not ADAPTER_ID_RE.fullmatch(adapter_id):
        raise AdapterPathError(
            f"adapter id {adapter_id!r} has characters outside [A-Za-z0-9._/-]")
    parts = adapter_id.split("/")
    if adapter_id.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise AdapterPathError(
            f"adapter id {adapter_id!r} must be a relative path without '.', '..' or empty parts")


def _inside(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
        return True
    except ValueError:
        return False


class AdapterStore:
    def __init__(self, adapter_dir: str | os.PathLike | None, allowed_roots=()):
        self.adapter_dir = Path(adapter_dir).resolve() if adapter_dir else None
        roots = [Path(r).resolve() for r in allowed_roots]
        if self.adapter_dir is not None:
            roots.insert(0, self.adapter_dir)
        self.roots = roots

    def path_for_id(self, adapter_id: str) -> Path:
        """`<adapter-dir>/<id>`, resolved, guaranteed inside the adapter dir."""
        validate_adapter_id(adapter_id)
        if self.adapter_dir is None:
            raise AdapterPathError("no --adapter-dir configured: adapters must be loaded explicitly")
        path = (self.adapter_dir / adapter_id).resolve()
        if not _inside(path, self.adapter_dir):
            raise AdapterPathError(f"adapter id {adapter_id!r} resolves outside the adapter directory")
        return path

    def fetch(self, adapter_id: str) -> Path:
        """The local directory `adapter_id` loads from (path_for_id). A remote store downloads it
        into its cache first; here it is already local, present or not."""
        return self.path_for_id(adapter_id)

    def publish(self, adapter_id: str, path: Path) -> None:
        """Make the adapter at `path` (a directory under an allowed root) servable as
        `adapter_id` by every server sharing this store. A local directory is shared as it is."""

    def describe(self) -> str:
        """Where adapters come from, for messages and listings."""
        return str(self.adapter_dir) if self.adapter_dir is not None else "(no adapter directory)"

    def version(self, adapter_id: str) -> dict[str, str]:
        """What identifies the store's copy of `adapter_id` now ({} when it has none): a
        server holding it compares this with `cached_version` to notice a replaced adapter.
        Here: the config's and weights' mtime and size."""
        out = {}
        path = self.path_for_id(adapter_id)
        for name in (CONFIG_NAME, SAFETENSORS_NAME):
            try:
                st = (path / name).stat()
            except OSError:
                continue
            out[name] = f"{st.st_mtime_ns}:{st.st_size}"
        return out

    def cached_version(self, adapter_id: str) -> dict[str, str] | None:
        """The version of the local copy `adapter_id` loads from: for a local directory, the
        store's own copy."""
        return self.version(adapter_id)

    def check_source(self, source: str) -> Path:
        """A LoadAdapter source: an absolute path, or relative to the adapter dir; must lie under
        an allowed root after symlinks are resolved."""
        if not source or "\x00" in source:
            raise AdapterPathError("source path is empty or contains NUL")
        raw = Path(source)
        if not raw.is_absolute():
            if self.adapter_dir is None:
                raise AdapterPathError("relative source needs --adapter-dir")
            raw = self.adapter_dir / raw
        path = raw.resolve()
        if not any(_inside(path, root) for root in self.roots):
            raise AdapterPathError(
                f"source {source!r} is outside the allowed adapter roots "
                "(--adapter-dir, --allow-adapter-root)")
        return path

    def check_unchanged(self, path: Path, files: tuple[str, ...]) -> None:
        """`path` (resolved when it was checked) still resolves to itself, and each of `files`
        present in it resolves inside an allowed root; AdapterPathError otherwise."""
        if path.resolve() != path:
            raise AdapterPathError(f"adapter directory {path} changed while it was being loaded (it "
                                   "now resolves elsewhere); not loaded")
        for name in files:
            target = (path / name).resolve()
            if (path / name).exists() and not any(_inside(target, root) for root in self.roots):
                raise AdapterPathError(f"{path / name} links outside the allowed adapter roots "
                                       "(--adapter-dir, --allow-adapter-root); not loaded")


def open_store(adapter_dir: str | None, allowed_roots=(), adapter_store: str | None = None,
               cache_dir: str | None = None, endpoint_url: str | None = None) -> AdapterStore:
    """The store a server's flags describe: `adapter_store` s3://bucket/prefix (cached under
    `cache_dir`), else the local `adapter_dir` (or none)."""
    if adapter_store and adapter_store.startswith("s3://"):
        from runtime.adapters.s3_store import S3AdapterStore  # boto3 only when asked for

        return S3AdapterStore(adapter_store, cache_dir, allowed_roots, endpoint_url=endpoint_url)
    return AdapterStore(adapter_store or adapter_dir, allowed_roots)
