"""LoRA adapters for a worker's models: loaded off the loop and kept in memory.

A job whose adapters are not in memory waits outside the scheduler while a thread of its own loads
them (reading and mapping a file takes tens of milliseconds to seconds; the running batch keeps
stepping meanwhile), then joins like any other job. Each model has an LRU cache bounded in bytes
(`LDM_LORA_CACHE_MB`). An adapter that does not load (missing, corrupt, another family) fails its
job alone, with the loader's message.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

from ..ldm.engine import Engine
from ..ldm.lora import LoraAdapter, LoraError
from ..ldm.lora_cache import LoraCache
from ..settings import WorkerSettings
from .metrics import WorkerMetrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Loaded:
    """A job's adapters are in memory (`error` empty), or could not be loaded."""

    key: object  # what `fetch` was given to hand back
    error: str = ""


class Adapters:
    def __init__(self, settings: WorkerSettings, engines: dict[str, Engine], metrics: WorkerMetrics) -> None:
        self.folder = settings.lora_dir
        self.engines = engines
        self.metrics = metrics
        max_bytes = settings.lora_cache_mb << 20
        self.caches = {model: LoraCache(max_bytes, partial(self._load, model)) for model in engines}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lora")
        self._pending: list[tuple[Future[None], object]] = []
        metrics.lora_cache_bytes.set_function(lambda: sum(c.stats().bytes for c in self.caches.values()))

    def _load(self, model: str, name: str) -> LoraAdapter:
        if self.folder is None:
            raise LoraError(f"LoRA {name!r}: this worker has no LoRA directory (LDM_LORA_DIR)")
        adapter = self.engines[model].load_lora(self.folder / f"{name}.safetensors", name)
        self.metrics.lora_loads.inc()
        return adapter

    def ready(self, model: str, loras: Sequence[tuple[str, float]]) -> bool:
        return all(name in self.caches[model] for name, weight in loras if weight != 0)

    def fetch(self, model: str, loras: Sequence[tuple[str, float]], key: object) -> None:
        """Loads a job's adapters on the loader thread; `done()` reports `key` when they are in."""
        names = [name for name, weight in loras if weight != 0]
        self._pending.append((self._pool.submit(_load_all, self.caches[model], names), key))

    @property
    def waiting(self) -> int:
        return len(self._pending)

    def done(self) -> list[Loaded]:
        """The fetches that have finished since the last call, in order."""
        finished = [(f, k) for f, k in self._pending if f.done()]
        self._pending = [(f, k) for f, k in self._pending if not f.done()]
        out = []
        for future, key in finished:
            error = future.exception()
            out.append(Loaded(key, "" if error is None else str(error) or type(error).__name__))
        return out

    def take_waiting(self) -> list[object]:
        """Everything still loading (draining hands those jobs back)."""
        keys = [k for _, k in self._pending]
        self._pending = []
        return keys

    def get(self, model: str, loras: Sequence[tuple[str, float]]) -> list[tuple[LoraAdapter, float]]:
        """The adapters of a job about to be prepared (in memory already, unless evicted meanwhile)."""
        return [(self.caches[model].get(name), weight) for name, weight in loras if weight != 0]

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _load_all(cache: LoraCache, names: list[str]) -> None:
    for name in names:
        cache.get(name)
