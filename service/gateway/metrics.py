"""The gateway's Prometheus metrics (prefix `ldm_`), in a registry of its own per app.

Counters are recorded where the decision is made (the routes, `generation.py`); the queue depth and
live workers are read from Redis when /metrics is scraped, so they are never stale.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class QueueCollector(Collector):
    """`ldm_queue_depth{model}` and `ldm_workers_live{model}`, read at scrape time."""

    def __init__(self, read: Callable[[], tuple[dict[str, int], dict[str, int]]]) -> None:
        self.read = read

    def collect(self) -> Iterable[GaugeMetricFamily]:
        depth = GaugeMetricFamily("ldm_queue_depth", "jobs queued or running, per model", labels=["model"])
        workers = GaugeMetricFamily("ldm_workers_live", "workers with a live heartbeat", labels=["model"])
        try:
            depths, live = self.read()
        except Exception as e:  # Redis down: the scrape still answers, without these
            log.warning("queue metrics unavailable: %s", e)
            return
        for model, value in depths.items():
            depth.add_metric([model], value)
            workers.add_metric([model], live.get(model, 0))
        yield depth
        yield workers


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.http_requests = Counter(
            "ldm_http_requests", "HTTP requests answered", ["route", "status"], registry=r
        )
        self.http_seconds = Histogram(
            "ldm_http_request_seconds", "HTTP request latency", ["route"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.grpc_requests = Counter(
            "ldm_grpc_requests", "gRPC calls answered", ["method", "code"], registry=r
        )
        self.submitted = Counter("ldm_jobs_submitted", "jobs enqueued", ["model"], registry=r)
        self.webhooks = Counter(
            "ldm_webhook_deliveries",
            "webhook events handled: delivered, retrying (an attempt failed) or gave_up",
            ["outcome"],
            registry=r,
        )
        self.rejected = Counter(
            "ldm_jobs_rejected", "requests refused before enqueueing", ["reason"], registry=r
        )
        self.wait_seconds = Histogram(
            "ldm_request_wait_seconds",
            "time a synchronous request waited for its images",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )

    def watch_queue(self, read: Callable[[], tuple[dict[str, int], dict[str, int]]]) -> None:
        self.registry.register(QueueCollector(read))

    def scrape(self) -> bytes:
        return generate_latest(self.registry)
