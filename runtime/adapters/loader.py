"""Loading adapters from disk at runtime, off the engine's step thread.

Reading and validating a PEFT directory takes milliseconds to seconds (safetensors, folding,
checks); the step loop must not wait for it. Loads run on a small thread pool; concurrent
requests for the same id share one load. A load that fails leaves the registry exactly as it was
and reports why (AdapterFormatError / AdapterPathError: the client's fault; AdapterVanished: the
directory went away mid-read; OSError: the disk's).
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from runtime.adapters.peft_format import BIN_NAME, CONFIG_NAME, SAFETENSORS_NAME, read_adapter
from runtime.adapters.registry import AdapterNotFound, AdapterRegistry
from runtime.adapters.store import AdapterStore
from runtime.config import ModelConfig
from runtime.nn.kernels import helper_thread

log = logging.getLogger(__name__)

#: The files read_adapter opens; each must resolve inside an allowed root (store.check_unchanged).
ADAPTER_FILES = (CONFIG_NAME, SAFETENSORS_NAME, BIN_NAME)


class AdapterVanished(AdapterNotFound):
    """The adapter directory disappeared while it was being read."""

    def __str__(self) -> str:
        return (f"adapter {self.args[0]!r}: its directory disappeared while it was being loaded; "
                "retry once it is back in place")


class AdapterLoader:
    def __init__(self, registry: AdapterRegistry, store: AdapterStore, model: ModelConfig,
                 max_virtual_tokens: int | None = None, workers: int = 2,
                 on_loaded=None, on_failed=None):
        self.registry, self.store, self.model = registry, store, model
        self.max_virtual_tokens = max_virtual_tokens
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="quiver-load",
                                        initializer=helper_thread)  # (kernels.helper_thread: why)
        self._inflight: dict[str, Future] = {}
        self._lock = threading.Lock()
        self.on_loaded = on_loaded  # callback(adapter_id, adapter, seconds)
        self.on_failed = on_failed  # callback(adapter_id, exception)

    def load(self, adapter_id: str, source: str | None = None, reload: bool = True) -> Future:
        """Start loading `adapter_id` from `source` (default: <adapter-dir>/<id>).

        reload=False (lazy loading): an id that is already registered is not read again. The
        check happens under the same lock as the in-flight lookup, and a load registers before it
        leaves the in-flight table, so two requests racing for a new id never load it twice (a
        second load would find the first one's requests in flight and fail as busy).
        """
        path = self.store.check_source(source) if source else self.store.path_for_id(adapter_id)
        with self._lock:
            fut = self._inflight.get(adapter_id)
            if fut is not None:
                return fut
            if not reload and self.registry.contains(adapter_id):
                done: Future = Future()
                done.set_result(None)
                return done
            self.registry.mark_loading(adapter_id, True)
            fut = self._pool.submit(self._load, adapter_id, str(path))
            self._inflight[adapter_id] = fut
            return fut

    def ensure(self, adapter_id: str, timeout: float | None = None) -> None:
        """Make sure `adapter_id` is registered, loading it lazily from the adapter dir."""
        self.load(adapter_id, reload=False).result(timeout)

    def _load(self, adapter_id: str, path: str) -> None:
        t0 = time.monotonic()
        try:
            adapter = self._read(adapter_id, Path(path))
            self.registry.add(adapter_id, adapter)
        except Exception as e:
            log.warning("adapter %s failed to load from %s: %s", adapter_id, path, e)
            if self.on_failed is not None:
                self.on_failed(adapter_id, e)
            raise
        finally:
            with self._lock:
                self._inflight.pop(adapter_id, None)
                self.registry.mark_loading(adapter_id, False)
        seconds = time.monotonic() - t0
        log.info("adapter %s loaded from %s in %.1f ms", adapter_id, path, seconds * 1e3)
        if self.on_loaded is not None:
            self.on_loaded(adapter_id, adapter, seconds)

    def _read(self, adapter_id: str, path: Path):
        """read_adapter between two confinement checks (store.py: the symlink-swap window)."""
        self.store.check_unchanged(path, ADAPTER_FILES)
        existed = path.is_dir()  # a source that never existed is the caller's mistake, not a race
        try:
            adapter = read_adapter(path, self.model, max_rank=self.registry.max_rank,
                                   max_virtual_tokens=self.max_virtual_tokens)
        except Exception as e:
            if existed and not path.is_dir():
                raise AdapterVanished(adapter_id) from e
            self.store.check_unchanged(path, ADAPTER_FILES)  # a swap explains a failure best
            raise
        self.store.check_unchanged(path, ADAPTER_FILES)
        return adapter

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
