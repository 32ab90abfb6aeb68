"""Loading adapters from disk at runtime, off the engine's step thread.

Reading and validating a PEFT directory takes milliseconds to seconds (safetensors, folding,
checks); the step loop must not wait for it. Loads run on a small thread pool; concurrent
requests for the same id share one load. A load that fails leaves the registry exactly as it was
and reports why (AdapterFormatError / AdapterPathError: the client's fault; OSError: the disk's).
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

from runtime.adapters.peft_format import read_adapter
from runtime.adapters.registry import AdapterRegistry
from runtime.adapters.store import AdapterStore
from runtime.config import ModelConfig

log = logging.getLogger(__name__)


class AdapterLoader:
    def __init__(self, registry: AdapterRegistry, store: AdapterStore, model: ModelConfig,
                 max_virtual_tokens: int | None = None, workers: int = 2,
                 on_loaded=None, on_failed=None):
        self.registry, self.store, self.model = registry, store, model
        self.max_virtual_tokens = max_virtual_tokens
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="quiver-load")
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
            adapter = read_adapter(path, self.model, max_rank=self.registry.max_rank,
                                   max_virtual_tokens=self.max_virtual_tokens)
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

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
