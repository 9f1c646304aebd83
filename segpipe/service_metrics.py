"""Prometheus metrics of the prediction service: requests by endpoint and status, latencies, batch sizes, queue depth.

With several worker processes (serve.py --workers N) each process writes its values to files in
PROMETHEUS_MULTIPROC_DIR (serve.py sets it) and /metrics, answered by any one worker, adds them up.
"""
from __future__ import annotations

import os
import time

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest,
                               multiprocess)

ENDPOINTS = ("/predict", "/healthz", "/readyz", "/metadata", "/metrics")  # any other path is counted as "other"


def batch_buckets(max_batch: int) -> list[float]:
    """Histogram bounds that tell every batch size apart up to 16, then powers of two up to max_batch."""
    sizes = list(range(1, min(max_batch, 16) + 1)) + [2 ** k for k in range(5, 16) if 2 ** k < max_batch]
    return [float(s) for s in sorted(set(sizes + [max_batch]))]


class Metrics:
    """The service's metrics in a registry of their own (so two apps in one process never clash)."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, max_batch: int):
        self.registry = CollectorRegistry()
        self.requests = Counter("segpipe_requests", "HTTP requests answered, by endpoint and status code",
                                ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram("segpipe_request_seconds", "Time from request to response, by endpoint",
                                 ["endpoint"], registry=self.registry)
        self.batch_size = Histogram("segpipe_batch_size", "Images per forward pass",
                                    buckets=batch_buckets(max_batch), registry=self.registry)
        self.queue_depth = Gauge("segpipe_queue_depth", "Requests waiting for a forward pass",
                                 registry=self.registry, multiprocess_mode="livesum")

    def observe_request(self, path: str, status: int, seconds: float) -> None:
        """Count one answered request."""
        endpoint = path if path in ENDPOINTS else "other"  # a label per unknown path would grow without bound
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def exposition(self) -> bytes:
        """The text format for /metrics: this process's metrics, or all workers' in multiprocess mode."""
        if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)

    @staticmethod
    def process_exits() -> None:
        """Drop this worker's live gauges from the multiprocess totals."""
        if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
            multiprocess.mark_process_dead(os.getpid())


class RequestMetrics:
    """ASGI middleware counting every HTTP response (errors included) into Metrics."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status, counted = time.perf_counter(), 500, False  # 500 unless a response starts: the app failed

        def count() -> None:
            nonlocal counted
            if not counted:
                counted = True
                self.metrics.observe_request(scope["path"], status, time.perf_counter() - start)

        async def send_and_count(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                count()  # before the last byte goes out: a client that has its answer sees it counted
            await send(message)

        try:
            await self.app(scope, receive, send_and_count)
        finally:
            count()
