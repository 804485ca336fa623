"""A worker's loaded LoRA adapters: least recently used first out, bounded in bytes.

Adapters are loaded on demand (on a background thread once the worker prefetches them for queued
jobs), so the cache is thread-safe, and two threads asking for the same adapter at once load it
once: the second waits for the first. An adapter evicted while a batch still uses it stays alive
through the members that hold it; only the cache forgets it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from .lora import LoraAdapter

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoraCacheStats:
    hits: int
    misses: int
    loads: int  # successful loads (a failed load counts as a miss only)
    load_seconds: float  # total time spent loading
    bytes: int  # adapter tensor bytes held now
    entries: int

    @property
    def hit_rate(self) -> float:
        asked = self.hits + self.misses
        return self.hits / asked if asked else 0.0


class LoraCache:
    """`get(key)` returns the adapter, loading it with `loader(key)` on a miss."""

    def __init__(self, max_bytes: int, loader: Callable[[str], LoraAdapter]) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.max_bytes = max_bytes
        self._loader = loader
        self._entries: OrderedDict[str, LoraAdapter] = OrderedDict()
        self._loading: dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        self._bytes = 0
        self._hits = self._misses = self._loads = 0
        self._load_seconds = 0.0

    def get(self, key: str) -> LoraAdapter:
        while True:
            with self._lock:
                adapter = self._entries.get(key)
                if adapter is not None:
                    self._entries.move_to_end(key)
                    self._hits += 1
                    return adapter
                pending = self._loading.get(key)
                if pending is None:
                    self._misses += 1
                    done = self._loading[key] = threading.Event()
                    break
            pending.wait()  # another thread is loading it: then a hit, or our turn if it failed
        try:
            started = time.perf_counter()
            adapter = self._loader(key)
            elapsed = time.perf_counter() - started
            with self._lock:
                self._loads += 1
                self._load_seconds += elapsed
                self._store(key, adapter)
            return adapter
        finally:
            with self._lock:
                del self._loading[key]
            done.set()

    def _store(self, key: str, adapter: LoraAdapter) -> None:
        size = adapter.nbytes
        if size > self.max_bytes:
            log.warning(
                "LoRA %s (%d bytes) is larger than the whole cache (%d): not kept", key, size, self.max_bytes
            )
            return
        while self._entries and self._bytes + size > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self._bytes -= evicted.nbytes
        self._entries[key] = adapter
        self._bytes += size

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._entries

    def stats(self) -> LoraCacheStats:
        with self._lock:
            return LoraCacheStats(
                self._hits, self._misses, self._loads, self._load_seconds, self._bytes, len(self._entries)
            )
