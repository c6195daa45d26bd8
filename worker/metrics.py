"""Prometheus metrics and the /metrics, /healthz and /readyz endpoints.

Each worker process serves its own metrics on ``METRICS_PORT`` (children of ``run --processes N``
use ``METRICS_PORT + i``), so nothing needs prometheus-client's multiprocess mode; scrape each port.
A registry per ``Metrics`` object keeps several in-process workers (tests) apart.

The endpoints are served by aiohttp's low-level server (``aiohttp.web.Server``) with small limits, so a
client cannot make the worker hold memory: no request body is read, a request announcing one over
``MAX_BODY`` is answered 413 and the connection closed, headers are capped, a new connection that has
not sent a whole request head within ``HEAD_TIMEOUT_S`` (silent, or trickling bytes) is closed, as is a
kept-alive one idle for ``IDLE_TIMEOUT_S``, and at most ``MAX_CONNECTIONS`` connections are open at
once; more are answered 503 (``Retry-After: 1``) and closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any, cast

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

log = logging.getLogger(__name__)

# Limits of the metrics/health server. The endpoints are GETs that need no body and a few short headers;
# Prometheus and kubelet probes send a handful of headers and no body.
MAX_BODY = 64 * 1024  # a request announcing more (or a chunked body of unknown size) is answered 413
HEAD_TIMEOUT_S = 5.0  # for a new connection to send its first request head
IDLE_TIMEOUT_S = 5.0  # between keep-alive requests (a next head trickled byte by byte counts as idle)
MAX_CONNECTIONS = 64  # open at once; Prometheus holds one, each probe opens one
MAX_HEADERS = 32  # and each header line at most 8 KiB (aiohttp's max_field_size and max_line_size)
_MAX_LINE = 8190

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


class MetricsServer:
    """The running metrics/health server: ``close()`` stops it at once, ``aclose()`` also waits for it."""

    def __init__(self, listener: asyncio.Server, server: _CappedServer):
        self._listener = listener
        self._server = server

    @property
    def port(self) -> int:
        return int(self._listener.sockets[0].getsockname()[1])

    @property
    def open_connections(self) -> int:
        return self._server.open

    def close(self) -> None:
        """Stop accepting connections and close the idle ones; a response being written still completes."""
        self._listener.close()
        self._server.pre_shutdown()

    async def aclose(self, timeout: float = 1.0) -> None:
        """``close()``, then wait up to ``timeout`` for responses in progress before closing their connections."""
        self.close()
        await self._server.shutdown(timeout)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._listener.wait_closed(), timeout)


async def serve(
    metrics: Metrics,
    is_ready: Callable[[], bool],
    host: str,
    port: int,
    *,
    max_body: int = MAX_BODY,
    head_timeout_s: float = HEAD_TIMEOUT_S,
    idle_timeout_s: float = IDLE_TIMEOUT_S,
    max_connections: int = MAX_CONNECTIONS,
) -> MetricsServer:
    """/metrics (Prometheus text), /healthz (the event loop answers), /readyz (ready to consume)."""

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        server.head_received(request.protocol)
        if request.body_exists and (request.content_length is None or request.content_length > max_body):
            # Refused before any of it is read; the connection is closed after the answer (no lingering).
            return _json(413, b'{"error":"request body too large"}', close=True)
        if request.method not in ("GET", "HEAD"):
            response = _json(405, b'{"error":"method not allowed"}')
            response.headers["Allow"] = "GET, HEAD"
            return response
        if request.path == "/metrics":
            return web.Response(body=metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})
        if request.path == "/healthz":
            return _json(200, b'{"status":"alive"}')
        if request.path == "/readyz":
            ready = is_ready()
            return _json(200 if ready else 503, b'{"ready":true}' if ready else b'{"ready":false}')
        return _json(404, b'{"error":"not found"}')

    server = _CappedServer(
        handle,
        max_connections=max_connections,
        head_timeout_s=head_timeout_s,
        # aiohttp's keep-alive timer runs from the end of a response and is not reset by incoming bytes, so
        # it also bounds the time to send the next request head.
        keepalive_timeout=idle_timeout_s,
        lingering_time=0,  # never read (drain) a body the handler did not read: close the connection instead
        max_headers=MAX_HEADERS,
        max_line_size=_MAX_LINE,
        max_field_size=_MAX_LINE,
        access_log=None,  # scrapes and probes every few seconds would flood the log
    )
    listener = await asyncio.get_running_loop().create_server(server.protocol, host, port, backlog=128)
    running = MetricsServer(listener, server)
    log.info("metrics and health on http://%s:%d (/metrics, /healthz, /readyz)", host, running.port)
    return running


def _json(status: int, body: bytes, *, close: bool = False) -> web.Response:
    response = web.Response(status=status, body=body, content_type="application/json")
    if close:
        response.force_close()
    return response


class _CappedServer(web.Server):
    """aiohttp's low-level server, with two things aiohttp lacks (up to 3.14 at least for the second):
    a cap on open connections, and a deadline for a new connection's first request head.

    ``protocol`` is the factory for ``loop.create_server``: it counts the connections it hands to aiohttp
    (aiohttp's ``connection_lost`` callback counts them out) and arms each one's deadline, which the
    request handler disarms by calling ``head_received``."""

    def __init__(self, handler: Any, *, max_connections: int, head_timeout_s: float, **kwargs: Any):
        super().__init__(handler, **kwargs)
        self.max_connections = max_connections
        self.head_timeout_s = head_timeout_s
        self.open = 0
        self._deadlines: dict[web.RequestHandler, asyncio.TimerHandle] = {}

    def protocol(self) -> asyncio.BaseProtocol:
        if self.open >= self.max_connections:
            return _Refuse()
        self.open += 1
        handler = self()
        loop = asyncio.get_running_loop()
        self._deadlines[handler] = loop.call_later(self.head_timeout_s, self._head_too_late, handler)
        return handler

    def head_received(self, handler: web.RequestHandler) -> None:
        if (deadline := self._deadlines.pop(handler, None)) is not None:
            deadline.cancel()

    def _head_too_late(self, handler: web.RequestHandler) -> None:
        if self._deadlines.pop(handler, None) is not None:
            if handler.transport is None:  # its connection was never made, so it will never be lost
                self.open -= 1
            handler.force_close()

    def connection_lost(self, handler: web.RequestHandler, exc: BaseException | None = None) -> None:
        self.open -= 1
        self.head_received(handler)
        super().connection_lost(handler, exc)


_REFUSAL = b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


class _Refuse(asyncio.Protocol):
    """Answers 503 without reading the request, and closes (after the answer is written)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A cast, not an isinstance check: uvloop's TCP transports write and close but are no asyncio.WriteTransport.
        writer = cast(asyncio.WriteTransport, transport)
        writer.write(_REFUSAL)
        writer.close()
