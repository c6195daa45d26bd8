"""Prometheus metrics and the /metrics, /healthz and /readyz endpoints.

Each worker process serves its own metrics on ``METRICS_PORT`` (children of ``run --processes N``
use ``METRICS_PORT + i``), so nothing needs prometheus-client's multiprocess mode; scrape each port.
A registry per ``Metrics`` object keeps several in-process workers (tests) apart.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from worker import http

log = logging.getLogger(__name__)

_SIZES = (1, 2, 5, 10, 20, 30, 50, 75, 100)
_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("embed_requests_received", "Request messages received", registry=r)
        self.texts = Counter("embed_texts_received", "Texts in valid requests", registry=r)
        self.replies = Counter(
            "embed_replies", "Replies published, by outcome and code", ["outcome", "code"], registry=r
        )
        self.dead_lettered = Counter("embed_dead_lettered", "Messages dead-lettered, by reason", ["reason"], registry=r)
        self.batch_size = Histogram("embed_batch_size", "Texts per upstream batch", buckets=_SIZES, registry=r)
        self.batch_wait = Histogram(
            "embed_batch_wait_seconds", "Time from a batch's first text to its send", buckets=_SECONDS, registry=r
        )
        self.upstream_latency = Histogram(
            "embed_upstream_latency_seconds", "Duration of each upstream call", buckets=_SECONDS, registry=r
        )
        self.upstream_errors = Counter(
            "embed_upstream_errors", "Failed upstream calls, by HTTP status", ["status"], registry=r
        )
        self.retries = Counter("embed_upstream_retries", "Upstream calls retried after a transient error", registry=r)
        self.inflight = Gauge("embed_inflight_messages", "Deliveries held and not yet settled", registry=r)
        self.paused = Gauge("embed_consuming_paused", "1 while consuming is paused by the circuit breaker", registry=r)
        self.ready = Gauge("embed_ready", "1 when connected, topology declared and consuming", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)


async def serve(metrics: Metrics, is_ready: Callable[[], bool], host: str, port: int) -> asyncio.Server:
    """/metrics (Prometheus text), /healthz (the event loop answers), /readyz (ready to consume)."""

    async def handle(request: http.Request) -> http.Response:
        if request.path == "/metrics":
            return http.Response(200, metrics.render(), CONTENT_TYPE_LATEST)
        if request.path == "/healthz":
            return http.Response(200, b'{"status":"alive"}')
        if request.path == "/readyz":
            ready = is_ready()
            return http.Response(200 if ready else 503, b'{"ready":true}' if ready else b'{"ready":false}')
        return http.Response(404, b'{"error":"not found"}')

    server = await http.start_server(handle, host, port)
    log.info("metrics and health on http://%s:%d (/metrics, /healthz, /readyz)", host, port)
    return server
