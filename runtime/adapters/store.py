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
"""
from __future__ import annotations

import os
import re
from pathlib import Path

ADAPTER_ID_RE = re.compile(r"[A-Za-z0-9._/-]+")
MAX_ADAPTER_ID_LEN = 256


class AdapterPathError(ValueError):
    """An adapter id or source path that is malformed or points outside the allowed roots."""


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
