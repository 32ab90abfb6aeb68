"""The adapter registry: parsed adapters in host memory, a bounded set of device slots, LRU.

    host:   id -> Adapter   (parsed and validated once; tensors on CPU)
    device: slot -> id      (at most `num_slots`; weights copied into the model's slot tensors)

A request holds two things. A *reference* (`retain` / `unretain`) from the moment the engine
accepts it until it finishes, queued, running or preempted alike: it keeps the adapter
registered. A *pin* (`acquire` / `release`) while it is admitted into the running batch: it
keeps the adapter in its device slot, so a slot used by running rows is never overwritten.
When a slot is needed and none is free, the least recently used *unpinned* adapter goes back to
host-only (its slot is reused; nothing is re-read from disk). If every slot is pinned, `acquire` raises `NoFreeSlot` and the engine keeps the request
waiting until one is released.

Unloading an adapter that still has requests in flight (references) marks it `unloading`: new
requests for it are refused as unknown, the in-flight ones (queued ones included) are still
admitted and finish with it, and it is dropped when the last reference and pin are gone.

Thread safety: one lock around the bookkeeping. Slot *writes* (device copies) happen inside
`acquire`, which only the engine's step thread calls, between forwards.
"""
from __future__ import annotations

import itertools
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from enum import Enum

import torch

from runtime.adapters.device import SlotState, clear_slot, write_slot
from runtime.adapters.types import Adapter
from runtime.nn.model import DecoderModel


_GENERATIONS = itertools.count(1)  # registrations, process-wide


class AdapterNotFound(KeyError):
    def __str__(self) -> str:
        return f"adapter {self.args[0]!r} is not loaded"


class AdapterBusy(RuntimeError):
    """The adapter has requests in flight and the operation would change it under them."""


class NoFreeSlot(RuntimeError):
    """Every device slot is pinned by running requests."""


class AdapterState(str, Enum):
    HOST = "host"
    DEVICE = "device"
    LOADING = "loading"
    UNLOADING = "unloading"


@dataclass
class Entry:
    adapter_id: str
    adapter: Adapter
    loaded_at: float = field(default_factory=time.time)
    slot: int | None = None
    slot_state: SlotState | None = None
    pins: int = 0  # requests in the running batch (device slot held)
    refs: int = 0  # requests accepted and not finished (queued, running or preempted)
    requests_served: int = 0
    unloading: bool = False
    #: distinct for every registration, so a reloaded adapter (same id, maybe other weights)
    #: never meets KV computed by its predecessor (the prefix cache keys on it)
    generation: int = field(default_factory=lambda: next(_GENERATIONS))

    @property
    def state(self) -> AdapterState:
        if self.unloading:
            return AdapterState.UNLOADING
        return AdapterState.DEVICE if self.slot is not None else AdapterState.HOST


@dataclass
class AdapterInfo:
    adapter_id: str
    peft_type: str
    kind: str
    rank: int
    target_modules: list[str]
    num_virtual_tokens: int
    nbytes: int
    state: AdapterState
    requests_served: int
    in_flight: int  # requests accepted for it and not finished yet (queued or running)
    source: str
    use_dora: bool = False


class AdapterRegistry:
    def __init__(self, model: DecoderModel, num_slots: int, max_rank: int,
                 weight_dtype: torch.dtype | None = None):
        """weight_dtype: the LoRA slots' storage (`--adapter-dtype`; None = the model's dtype)."""
        self.model = model
        self.num_slots = num_slots
        self.max_rank = max_rank
        if model.num_slots != num_slots or model.lora_weight_dtype != (weight_dtype or model.dtype):
            model.allocate_lora_slots(num_slots, max_rank, weight_dtype=weight_dtype)
        self.none_slot = num_slots  # the always-zero slot
        self._entries: dict[str, Entry] = {}
        self._lru: OrderedDict[int, str] = OrderedDict()  # slot -> id, oldest first
        self._free_slots = list(range(num_slots - 1, -1, -1))
        self._loading: set[str] = set()
        self._lock = threading.RLock()
        self.evictions = 0
        self.on_evict = None  # optional callback(adapter_id), e.g. a metrics counter

    # ---- host side (any thread) ------------------------------------------------------------
    def add(self, adapter_id: str, adapter: Adapter) -> None:
        """Register a parsed adapter (replacing an idle one with the same id)."""
        with self._lock:
            old = self._entries.get(adapter_id)
            if old is not None and (old.pins or old.refs or old.unloading):
                raise AdapterBusy(f"adapter {adapter_id!r} has {max(old.pins, old.refs)} requests in "
                                  "flight; unload it and retry once they finish")
            if old is not None:
                self._drop(old)
            self._entries[adapter_id] = Entry(adapter_id, adapter)

    def remove(self, adapter_id: str) -> bool:
        """Unload. Returns True if dropped now, False if it will go after in-flight requests."""
        with self._lock:
            entry = self._get(adapter_id)
            if entry.pins or entry.refs:
                entry.unloading = True
                return False
            self._drop(entry)
            return True

    def mark_loading(self, adapter_id: str, loading: bool) -> None:
        with self._lock:
            (self._loading.add if loading else self._loading.discard)(adapter_id)

    def is_loading(self, adapter_id: str) -> bool:
        with self._lock:
            return adapter_id in self._loading

    def contains(self, adapter_id: str) -> bool:
        with self._lock:
            e = self._entries.get(adapter_id)
            return e is not None and not e.unloading

    def is_unloading(self, adapter_id: str) -> bool:
        with self._lock:
            e = self._entries.get(adapter_id)
            return e is not None and e.unloading

    def get(self, adapter_id: str) -> Adapter:
        with self._lock:
            return self._get(adapter_id).adapter

    def generation(self, adapter_id: str) -> int:
        """The load generation of the registered adapter (unloading ones included: their
        in-flight requests still run on it); AdapterNotFound once it is dropped."""
        with self._lock:
            entry = self._entries.get(adapter_id)
            if entry is None:
                raise AdapterNotFound(adapter_id)
            return entry.generation

    def list(self) -> list[AdapterInfo]:
        with self._lock:
            infos = [self._info(e) for e in self._entries.values()]
            for adapter_id in sorted(self._loading - set(self._entries)):
                infos.append(AdapterInfo(adapter_id, "", "", 0, [], 0, 0, AdapterState.LOADING, 0, 0, ""))
            return infos

    def _info(self, e: Entry) -> AdapterInfo:
        a = e.adapter
        return AdapterInfo(e.adapter_id, a.peft_type, a.kind.value, a.rank, a.target_modules,
                           a.num_virtual_tokens, a.nbytes, e.state, e.requests_served,
                           max(e.refs, e.pins), a.source, a.use_dora)

    def _get(self, adapter_id: str) -> Entry:
        entry = self._entries.get(adapter_id)
        if entry is None or entry.unloading:
            raise AdapterNotFound(adapter_id)
        return entry

    def retain(self, adapter_id: str) -> Adapter:
        """Reference the adapter for one accepted request (any thread); AdapterNotFound if it is
        not registered or is being unloaded. Pair with `unretain` when the request finishes."""
        with self._lock:
            entry = self._get(adapter_id)
            entry.refs += 1
            return entry.adapter

    def unretain(self, adapter_id: str) -> None:
        with self._lock:
            entry = self._entries.get(adapter_id)
            if entry is None:
                return
            entry.refs -= 1
            self._drop_if_unloaded(entry)

    def _drop_if_unloaded(self, entry: Entry) -> None:
        if entry.unloading and entry.pins == 0 and entry.refs == 0:
            self._drop(entry)

    def _drop(self, entry: Entry) -> None:
        if entry.slot is not None:
            self._release_slot(entry)
        del self._entries[entry.adapter_id]

    def _release_slot(self, entry: Entry) -> None:
        clear_slot(self.model, entry.slot)
        self._lru.pop(entry.slot, None)
        self._free_slots.append(entry.slot)
        entry.slot, entry.slot_state = None, None

    # ---- device side (engine thread) ---------------------------------------------------------
    def acquire(self, adapter_id: str) -> tuple[int, SlotState]:
        """Pin the adapter on a device slot for one request; copies it in if needed.

        An adapter that is `unloading` is still acquired: the request holds a reference from
        before the unload (the engine retains at intake), and it must finish."""
        with self._lock:
            entry = self._entries.get(adapter_id)
            if entry is None:
                raise AdapterNotFound(adapter_id)
            if entry.slot is None:
                slot = self._take_slot()
                entry.slot_state = write_slot(self.model, slot, entry.adapter)
                entry.slot = slot
            self._lru[entry.slot] = adapter_id
            self._lru.move_to_end(entry.slot)
            entry.pins += 1
            entry.requests_served += 1
            return entry.slot, entry.slot_state

    def release(self, adapter_id: str) -> None:
        with self._lock:
            entry = self._entries.get(adapter_id)
            if entry is None:
                return
            entry.pins -= 1
            self._drop_if_unloaded(entry)

    def _take_slot(self) -> int:
        if self._free_slots:
            return self._pop_lowest_free()
        for slot, victim_id in self._lru.items():  # oldest first
            victim = self._entries[victim_id]
            if victim.pins == 0:
                self._release_slot(victim)
                self.evictions += 1
                if self.on_evict is not None:
                    self.on_evict(victim_id)
                return self._pop_lowest_free()
        raise NoFreeSlot(f"all {self.num_slots} device adapter slots are in use by running requests")

    def _pop_lowest_free(self) -> int:
        """The lowest free slot: resident adapters stay packed at the bottom of the slot range
        (a step's slot weights sit close together in memory)."""
        slot = min(self._free_slots)
        self._free_slots.remove(slot)
        return slot

    def slot_sets(self) -> tuple[set[int], set[int], set[int]]:
        """(LoRA slots, DoRA slots, embedding-LoRA slots) currently filled."""
        with self._lock:
            lora, dora, emb = set(), set(), set()
            for e in self._entries.values():
                if e.slot is not None and e.slot_state.kind.value == "lora":
                    lora.add(e.slot)
                    if e.slot_state.dora:
                        dora.add(e.slot)
                    if e.slot_state.embedding:
                        emb.add(e.slot)
            return lora, dora, emb
