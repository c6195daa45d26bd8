"""The gateway's HTTP server and its composition root: each request is checked (key, size, in-flight bound),
becomes one RPC through ``EmbedClient`` (``calls.embed``) and is answered in its API's shape.

Served by aiohttp's low-level server with the limits of the metrics server
(``worker.metrics_server.CappedServer``: at most GATEWAY_MAX_CONNECTIONS open, a new connection's head within
GATEWAY_CLIENT_TIMEOUT_S), a body read within the same timeout and at most MAX_BODY_BYTES (413 past it, announced
or not), never lingering on a body it did not read.
GATEWAY_MAX_IN_FLIGHT bounds the requests being served, from head to answer: past it, 429 with Retry-After at once,
so the gateway never queues requests in memory; the broker is the queue. It holds no state: run as many as you like
behind a load balancer.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import math
import signal
import time
from typing import Any

from aiohttp import web
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from worker import tracing
from worker.amqp.connection import FirstConnect
from worker.client import EmbedClient, EmbedClientError, EmbedClientRefused, lane_key
from worker.errors import ConfigurationError
from worker.gateway import gemini_routes, openai_routes
from worker.gateway.calls import Failure, Job, bad_request, embed, overloaded, too_large
from worker.gateway.metrics import GatewayMetrics
from worker.gateway.settings import GatewaySettings
from worker.logs import safe
from worker.metrics_server import CappedServer

log = logging.getLogger(__name__)

LANE_HEADER = "X-Embed-Lane"
# Timeouts the SDKs state on each request: openai's read timeout, google-genai's (HttpOptions.timeout).
TIMEOUT_HEADERS = ("x-stainless-read-timeout", "x-server-timeout")
_READ_STEP = 64 * 1024
_MAX_LINE = 8190
_MAX_HEADERS = 64
HEALTH = ("/healthz", "/readyz", "/metrics")
OPENAI_ROUTE = "openai.embeddings"


class Gateway:
    """One HTTP request at a time: ``handle`` is aiohttp's handler."""

    def __init__(self, settings: GatewaySettings, client: EmbedClient, metrics: GatewayMetrics):
        self._settings = settings
        self._client = client
        self._metrics = metrics
        self._keys = [key.get_secret_value().encode() for key in settings.gateway_api_keys]
        self._models = settings.models
        self.in_flight = 0
        self.server = CappedServer(
            self.handle,
            max_connections=settings.gateway_max_connections,
            head_timeout_s=settings.gateway_client_timeout_s,
            keepalive_timeout=settings.gateway_idle_timeout_s,
            lingering_time=0,  # a body we did not read (refused, 413) is not drained: the connection is closed
            max_headers=_MAX_HEADERS,
            max_line_size=_MAX_LINE,
            max_field_size=_MAX_LINE,
            access_log=None,
        )
        metrics.in_flight.set_function(lambda: self.in_flight)
        metrics.ready.set_function(lambda: int(client.connected))

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        self.server.head_received(request.protocol)
        path = request.path
        if path in HEALTH:
            return self._health(request, path)
        started = time.perf_counter()
        if path == openai_routes.PATH:
            route, match = OPENAI_ROUTE, None
        elif (match := gemini_routes.PATH.match(path)) is not None:
            route = f"gemini.{match['method']}"
        else:
            route = "other"
        response = await self._route(request, route, match)
        self._metrics.requests.labels(route, str(response.status)).inc()
        self._metrics.seconds.labels(route).observe(time.perf_counter() - started)
        return response

    async def _route(self, request: web.BaseRequest, route: str, match: Any) -> web.Response:
        openai = route == OPENAI_ROUTE or (match is None and not request.path.startswith("/v1beta"))
        if route == "other":
            return _error(Failure(404, "not_found", f"no such endpoint: {safe(request.path, 100)}"), openai)
        if request.method != "POST":
            response = _error(Failure(405, "method_not_allowed", f"{request.path} takes POST"), openai)
            response.headers["Allow"] = "POST"
            return response
        if self.in_flight >= self._settings.gateway_max_in_flight:
            return _error(overloaded(self._settings.gateway_max_in_flight), openai)
        self.in_flight += 1
        try:
            with tracing.server_span(request.headers, request.method, route) as span:
                response = await self._answer(request, match, openai)
                span.set_status_code(response.status)
                return response
        finally:
            self.in_flight -= 1

    async def _answer(self, request: web.BaseRequest, match: Any, openai: bool) -> web.Response:
        deadline = time.monotonic() + self._timeout(request)
        user = None
        try:
            key = (
                openai_routes.api_key(request.headers)
                if openai
                else gemini_routes.api_key(request.headers, request.query)
            )
            if self._keys and not self._known(key):
                raise (openai_routes if openai else gemini_routes).auth_failure(key is not None)
            lane = request.headers.get(LANE_HEADER, "default").strip().lower()
            try:
                lane_key(lane)
            except ValueError as exc:
                raise bad_request(f"{LANE_HEADER}: {exc}") from None
            body = await self._body(request)
            left = deadline - time.monotonic()
            if openai:
                parsed = openai_routes.parse(body, models=self._models, lane=lane, timeout=left)
                user, job = parsed.user, parsed.job
                vectors = await self._call(job)
                payload = openai_routes.render(vectors, parsed)
            else:
                method = match["method"]
                job = gemini_routes.parse(
                    body, model=match["model"], method=method, models=self._models, lane=lane, timeout=left
                )
                vectors = await self._call(job)
                payload = gemini_routes.render(vectors, method)
        except Failure as failure:
            log.info(
                "%s %s -> %d %s: %s%s",
                request.method,
                safe(request.path, 120),
                failure.status,
                failure.code,
                safe(failure.message),
                f" (user {safe(user)})" if user is not None else "",
            )
            return _error(failure, openai)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s -> 200, %d vectors%s", request.path, job.count, f" (user {safe(user)})" if user else "")
        return web.Response(body=payload, content_type="application/json")

    async def _call(self, job: Job) -> Any:
        if job.timeout <= 0:
            raise Failure(504, "timeout", "the request's timeout passed before it could be sent")
        return await embed(self._client, job)

    def _known(self, given: str | None) -> bool:
        """Whether ``given`` is one of the keys, compared in constant time against every key (no early exit)."""
        if given is None:
            return False
        candidate = given.encode("utf-8", "surrogatepass")
        found = False
        for key in self._keys:
            found |= hmac.compare_digest(candidate, key)
        return found

    def _timeout(self, request: web.BaseRequest) -> float:
        """GATEWAY_REQUEST_TIMEOUT_S, or the caller's own shorter timeout when its SDK states one."""
        timeout = self._settings.gateway_request_timeout_s
        for name in TIMEOUT_HEADERS:
            try:
                stated = float(request.headers.get(name, "nan"))
            except ValueError:
                continue
            if math.isfinite(stated) and stated > 0:
                timeout = min(timeout, stated)
        return timeout

    async def _body(self, request: web.BaseRequest) -> bytes:
        """The body, within MAX_BODY_BYTES (413) and GATEWAY_CLIENT_TIMEOUT_S (408)."""
        limit = self._settings.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise too_large(limit)
        pieces, size = [], 0
        try:
            async with asyncio.timeout(self._settings.gateway_client_timeout_s):
                while piece := await request.content.read(_READ_STEP):
                    size += len(piece)
                    if size > limit:
                        raise too_large(limit)
                    pieces.append(piece)
        except TimeoutError:
            raise Failure(
                408, "timeout", f"the request body did not arrive within {self._settings.gateway_client_timeout_s:g} s"
            ) from None
        return b"".join(pieces)

    def _health(self, request: web.BaseRequest, path: str) -> web.Response:
        if request.method not in ("GET", "HEAD"):
            return web.Response(status=405, headers={"Allow": "GET, HEAD"})
        if path == "/metrics":
            return web.Response(body=self._metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})
        if path == "/healthz":
            return web.Response(body=b'{"status":"alive"}', content_type="application/json")
        ready = self._client.connected
        return web.Response(
            status=200 if ready else 503,
            body=b'{"ready":%s}' % (b"true" if ready else b"false"),
            content_type="application/json",
        )


def _error(failure: Failure, openai: bool) -> web.Response:
    body = openai_routes.error_body(failure) if openai else gemini_routes.error_body(failure)
    response = web.Response(status=failure.status, body=body, content_type="application/json")
    if failure.retry_after is not None:
        response.headers["Retry-After"] = str(failure.retry_after)
    if failure.status in (408, 413):  # its body was not read (whole): the connection cannot be reused
        response.force_close()
    return response


# ---------------------------------------------------------------------- the composition root
class Running:
    """A listening gateway: its port, and how to stop it."""

    def __init__(self, gateway: Gateway, listener: asyncio.Server):
        self.gateway = gateway
        self._listener = listener

    @property
    def port(self) -> int:
        return int(self._listener.sockets[0].getsockname()[1])

    async def aclose(self, grace: float) -> None:
        """Stop accepting, let requests in progress finish within ``grace`` seconds, close."""
        self._listener.close()
        self.gateway.server.pre_shutdown()
        await self.gateway.server.shutdown(grace)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._listener.wait_closed(), 1.0)


async def listen(settings: GatewaySettings, client: EmbedClient, metrics: GatewayMetrics | None = None) -> Running:
    gateway = Gateway(settings, client, metrics or GatewayMetrics())
    where = f"{settings.gateway_host}:{settings.gateway_port}"
    try:
        listener = await asyncio.get_running_loop().create_server(
            gateway.server.protocol, settings.gateway_host, settings.gateway_port, backlog=512
        )
    except OSError as exc:
        raise ConfigurationError(f"GATEWAY_PORT: cannot listen on {where}: {exc.strerror or exc}") from exc
    return Running(gateway, listener)


async def connect(client: EmbedClient, settings: GatewaySettings) -> None:
    """Connect as the worker does at start: a broker that does not answer yet is retried with back-off for
    AMQP_CONNECT_TIMEOUT_S, each attempt logged; one that refuses us (login, vhost, TLS) is a configuration error."""
    retry = FirstConnect(settings.amqp_url_redacted, settings.amqp_connect_timeout_s)
    while True:
        retry.next_attempt()
        try:
            await client.connect()
            return
        except EmbedClientRefused as exc:
            raise ConfigurationError(exc.message) from None
        except EmbedClientError as exc:
            await retry.failed(exc.message)


async def run_gateway(
    settings: GatewaySettings, stop: asyncio.Event | None = None, started: asyncio.Future[int] | None = None
) -> None:
    """Run until ``stop`` is set (or SIGTERM/SIGINT); ``started`` gets the port once it serves."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    tracing.configure("embed-gateway")
    client = EmbedClient(
        settings.amqp_url.get_secret_value(),
        timeout=settings.gateway_request_timeout_s,
        max_in_flight=settings.gateway_max_in_flight,  # never the bound: the gateway refuses past it first
    )
    try:
        log.info("connecting to %s", settings.amqp_url_redacted)
        await connect(client, settings)
        running = await listen(settings, client)
        keys = len(settings.gateway_api_keys)
        log.info(
            "ready: gateway on http://%s:%d (%s; at most %d requests in flight)",
            settings.gateway_host,
            running.port,
            f"{keys} API key{'s' if keys != 1 else ''}" if keys else "anonymous: no API key checked",
            settings.gateway_max_in_flight,
        )
        if started is not None:
            started.set_result(running.port)
        await stop.wait()
        log.info(
            "stopping: waiting up to %.0f s for %d requests in flight",
            settings.gateway_request_timeout_s,
            running.gateway.in_flight,
        )
        await running.aclose(settings.gateway_request_timeout_s)
    finally:
        await client.close()
        tracing.shutdown()
    log.info("stopped")
