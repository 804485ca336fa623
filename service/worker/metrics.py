"""The worker's Prometheus metrics (prefix `ldm_`), in a registry of their own, served on
`/metrics` beside `/healthz` (the liveness of the worker loop). Each is recorded where its decision
is made."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app

LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.batch_size = Histogram(
            "ldm_batch_size", "Members denoised per UNet call", buckets=BATCH_BUCKETS, registry=r
        )
        self.step_seconds = Histogram(
            "ldm_step_seconds", "Time of one batched denoising step", buckets=STEP_BUCKETS, registry=r
        )
        self.queue_wait_seconds = Histogram(
            "ldm_queue_wait_seconds", "Enqueue to start of denoising", buckets=LATENCY_BUCKETS, registry=r
        )
        self.inference_seconds = Histogram(
            "ldm_inference_seconds",
            "Start of denoising to stored result",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.total_seconds = Histogram(
            "ldm_total_seconds", "Enqueue to stored result", buckets=LATENCY_BUCKETS, registry=r
        )
        self.images = Counter("ldm_images", "Images generated and stored", registry=r)
        self.jobs = Counter("ldm_jobs", "Jobs ended by this worker", ["status"], registry=r)
        self.reclaimed = Counter(
            "ldm_jobs_reclaimed", "Deliveries taken over from a dead or draining worker", registry=r
        )
        self.dead_lettered = Counter(
            "ldm_jobs_dead_lettered", "Jobs delivered too often, moved to the dead-letter stream", registry=r
        )
        self.handed_back = Counter("ldm_jobs_handed_back", "Jobs returned to the queue on drain", registry=r)
        self.stale = Counter(
            "ldm_jobs_superseded",
            "Jobs dropped because another worker's attempt replaced this one",
            registry=r,
        )
        self.busy_ratio = Gauge(
            "ldm_worker_busy_ratio", "Share of recent wall time spent denoising and decoding", registry=r
        )
        self.queue_backlog = Gauge(
            "ldm_queue_backlog", "Jobs queued or held by workers, per model stream", ["model"], registry=r
        )
        self.gpu_memory = Gauge("ldm_gpu_memory_bytes", "GPU memory held by torch", ["kind"], registry=r)
        self.redis_errors = Counter(
            "ldm_redis_errors", "Redis commands that failed after retries", registry=r
        )
        self.loop_timestamp = Gauge(
            "ldm_worker_loop_timestamp_seconds",
            "Unix time of the worker loop's last iteration (it stops moving when the loop is stuck)",
            registry=r,
        )
        self.lora_loads = Counter("ldm_lora_loads", "LoRA adapters read from disk into memory", registry=r)
        self.lora_cache_bytes = Gauge(
            "ldm_lora_cache_bytes", "Memory held by the LoRA adapters in the worker's caches", registry=r
        )
        self.lora_adapters = Histogram(
            "ldm_lora_adapters_per_step",
            "Distinct LoRA adapters in one batched UNet call",
            buckets=(0, 1, 2, 4, 8, 16, 32),
            registry=r,
        )
        self._busy = BusyWindow()

    def observe_success(self, started: float, created: float) -> None:
        """A stored image: inference from `started`, total from `created` (Unix times)."""
        now = time.time()
        self.inference_seconds.observe(max(0.0, now - started))
        self.total_seconds.observe(max(0.0, now - created))

    def busy(self, seconds: float, now: float | None = None) -> None:
        self.busy_ratio.set(self._busy.add(seconds, time.monotonic() if now is None else now))

    def serve(self, port: int, host: str, healthy: Callable[[], bool]) -> WSGIServer:
        """/metrics, and /healthz: 200 while `healthy()`, else 503. On a thread of its own."""
        metrics = make_wsgi_app(self.registry)

        def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            if environ.get("PATH_INFO") == "/healthz":
                ok = healthy()
                start_response(
                    "200 OK" if ok else "503 Service Unavailable", [("Content-Type", "text/plain")]
                )
                return [b"ok\n" if ok else b"stuck: the worker loop has not moved for too long\n"]
            return metrics(environ, start_response)

        server = make_server(host, port, app, _ThreadingServer, handler_class=_QuietHandler)
        threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
        return server


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # scrapes and probes are not news
        pass


class BusyWindow:
    """Busy time over the last `window_s` seconds, as a share (two half-windows, rotated)."""

    def __init__(self, window_s: float = 10.0) -> None:
        self.half = window_s / 2
        self.start = time.monotonic()
        self.previous = 0.0
        self.current = 0.0

    def add(self, seconds: float, now: float) -> float:
        if now - self.start >= self.half:
            rotations = int((now - self.start) // self.half)
            self.previous = self.current if rotations == 1 else 0.0
            self.current = 0.0
            self.start += rotations * self.half
        self.current += seconds
        span = self.half + (now - self.start)
        return min(1.0, (self.previous + self.current) / span) if span > 0 else 0.0
