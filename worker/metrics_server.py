"""The /metrics, /healthz and /readyz endpoints (and ``CappedServer``, shared with the HTTP gateway).

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
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from worker.metrics import Metrics

log = logging.getLogger(__name__)

# Limits of the metrics/health server. The endpoints are GETs that need no body and a few short headers;
# Prometheus and kubelet probes send a handful of headers and no body.
MAX_BODY = 64 * 1024  # a request announcing more (or a chunked body of unknown size) is answered 413
HEAD_TIMEOUT_S = 5.0  # for a new connection to send its first request head
IDLE_TIMEOUT_S = 5.0  # between keep-alive requests (a next head trickled byte by byte counts as idle)
MAX_CONNECTIONS = 64  # open at once; Prometheus holds one, each probe opens one
MAX_HEADERS = 32  # and each header line at most 8 KiB (aiohttp's max_field_size and max_line_size)
_MAX_LINE = 8190


class MetricsServer:
    """The running metrics/health server: ``close()`` stops it at once, ``aclose()`` also waits for it."""

    def __init__(self, listener: asyncio.Server, server: CappedServer):
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

    server = CappedServer(
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


class CappedServer(web.Server):
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
