"""Starting a worker: load the models once, expose /metrics and /healthz, run the loop until drained."""

from __future__ import annotations

import logging
import time

import torch

from ..ldm.engine import Engine
from ..settings import WorkerSettings
from .metrics import WorkerMetrics
from .runner import Worker
from .warmup import warm_up

log = logging.getLogger(__name__)


def load_engines(settings: WorkerSettings) -> dict[str, Engine]:
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    engines = {}
    for name, path in settings.models.items():
        started = time.perf_counter()
        engines[name] = Engine.load(
            path,
            device=settings.device,
            dtype=settings.dtype,
            decode_tile=settings.decode_tile,
            channels_last=settings.channels_last,
            compile=settings.compile,
        )
        log.info("model %s loaded from %s in %.1f s", name, path, time.perf_counter() - started)
    return engines


def serve(settings: WorkerSettings) -> int:
    """Loads the models, starts /metrics and /healthz, runs until drained."""
    engines = load_engines(settings)
    for name, engine in engines.items():  # with LDM_COMPILE: compile now, not inside the loop
        warm_up(name, engine, settings.max_batch)
    metrics = WorkerMetrics()
    if settings.device == "cuda":
        metrics.gpu_memory.labels("allocated").set_function(torch.cuda.memory_allocated)
        metrics.gpu_memory.labels("reserved").set_function(torch.cuda.memory_reserved)
    worker = Worker(settings, engines, metrics)
    if settings.metrics_port:
        metrics.serve(settings.metrics_port, settings.metrics_host, worker.keeper.healthy)
        log.info(
            "metrics on http://%s:%d/metrics, liveness on /healthz",
            settings.metrics_host,
            settings.metrics_port,
        )
    return worker.run()
