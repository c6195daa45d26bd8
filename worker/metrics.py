"""Prometheus metrics: what the worker counts, one registry per ``Metrics`` object.

Each worker process serves its own metrics on ``METRICS_PORT`` (children of ``run --processes N``
use ``METRICS_PORT + i``), so nothing needs prometheus-client's multiprocess mode; scrape each port.
A registry per ``Metrics`` object keeps several in-process workers (tests) apart. The server of /metrics,
/healthz and /readyz is ``metrics_server.py``: imported only when METRICS_PORT is set (aiohttp costs ~0.17 s
of a start).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_SIZES = (1, 2, 5, 10, 20, 30, 50, 75, 100)
_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        # lane: "default" (embed.requests) or "bulk" (embed.requests.bulk); spend also "deferred" (embed.deferred).
        self.requests = Counter("embed_requests_received", "Request messages received, by lane", ["lane"], registry=r)
        self.texts = Counter("embed_texts_received", "Texts in valid requests", registry=r)
        self.replies = Counter(
            "embed_replies", "Replies published, by lane, outcome and code", ["lane", "outcome", "code"], registry=r
        )
        self.queue_wait = Histogram(
            "embed_queue_wait_seconds",
            "Per text, from its request's delivery to the start of its upstream call (batching, a slot, the budget)",
            ["lane"],
            buckets=_SECONDS,
            registry=r,
        )
        self.request_seconds = Histogram(
            "embed_request_seconds",
            "Per request, from its delivery to its reply confirmed by the broker",
            ["lane"],
            buckets=_SECONDS,
            registry=r,
        )
        self.spend = Counter(
            "embed_spend_usd",
            "Estimated cost of upstream calls in USD (the worker's token estimate; the API's own count is billed)",
            ["lane", "model"],
            registry=r,
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
        self.concurrency_limit = Gauge(
            "embed_upstream_concurrency_limit",
            "Upstream calls allowed at once now: the adaptive limit, at most MAX_CONCURRENT_BATCHES",
            registry=r,
        )
        self.retries = Counter("embed_upstream_retries", "Upstream calls retried after a transient error", registry=r)
        self.inflight = Gauge("embed_inflight_messages", "Deliveries held and not yet settled", registry=r)
        self.held_bytes = Gauge(
            "embed_held_bytes", "Bodies of deliveries held, both lanes (MAX_HELD_BYTES)", registry=r
        )
        self.held_bytes_max = Gauge("embed_held_bytes_max", "The most body bytes held at once since start", registry=r)
        self.paused = Gauge("embed_consuming_paused", "1 while consuming is paused by the circuit breaker", registry=r)
        self.ready = Gauge("embed_ready", "1 when connected, topology declared and consuming", registry=r)
        # Saving quota (worker/frugal.py, worker/redis_quota.py)
        self.duplicate_inputs = Counter(
            "embed_duplicate_inputs", "Inputs not sent because an identical one was in the same call", registry=r
        )
        self.cache_hits = Counter("embed_cache_hits", "Inputs answered from the embedding cache", registry=r)
        self.cache_misses = Counter("embed_cache_misses", "Inputs looked up in the cache and not found", registry=r)
        self.cache_tokens_saved = Counter(
            "embed_cache_tokens_saved", "Estimated input tokens not sent thanks to cache hits", registry=r
        )
        self.cache_errors = Counter("embed_cache_errors", "Cache reads or writes that failed or timed out", registry=r)
        self.ratelimit_wait = Counter(
            "embed_ratelimit_wait_seconds",
            "Seconds upstream calls waited for the API budget (UPSTREAM_RPM, _TPM, _USD_LIMIT), by lane",
            ["lane"],
            registry=r,
        )
        self.ratelimit_errors = Counter(
            "embed_ratelimit_errors",
            "Rate limiter failures survived: Redis unreachable or refusing, unreadable replies, internal errors",
            registry=r,
        )
        self.ratelimit_fallback = Gauge(
            "embed_ratelimit_fallback", "1 while Redis is away and this process keeps to its share", registry=r
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
