"""The HTTP servers' limits, over real connections: the metrics/health server holds no client's body, closes
idle and slow connections and caps how many are open; the emulator refuses oversize bodies the way the API
does; and the SDK stays on our httpx transport although aiohttp (which the servers need) is importable."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import httpx
import orjson
import pytest
from google.genai import _api_client
from pydantic import SecretStr

from worker import emulator as emulator_module
from worker.bench.naive import sdk_client
from worker.embedders.gemini import GeminiEmbedder
from worker.emulator import EmulatorThread
from worker.messages import EmbedConfig
from worker.metrics import Metrics
from worker.metrics_server import MetricsServer, serve

IDLE_S = 0.5  # the metrics server's head and idle timeouts in these tests (production: 5 s)
LONG_S = 30.0  # a timeout that does not run out during a test
MAX_CONNECTIONS = 3
SLACK_S = 1.5  # how much later than due a close may be seen, on a loaded machine
BIG = 60 * 1024 * 1024  # the body size


@pytest.fixture
async def server() -> AsyncIterator[MetricsServer]:
    running = await serve(
        Metrics(),
        lambda: True,
        "127.0.0.1",
        0,
        head_timeout_s=IDLE_S,
        idle_timeout_s=IDLE_S,
        max_connections=MAX_CONNECTIONS,
    )
    yield running
    await running.aclose()


@pytest.fixture
async def head_timeout_only() -> AsyncIterator[MetricsServer]:
    running = await serve(Metrics(), lambda: True, "127.0.0.1", 0, head_timeout_s=IDLE_S, idle_timeout_s=LONG_S)
    yield running
    await running.aclose()


@pytest.fixture
async def idle_timeout_only() -> AsyncIterator[MetricsServer]:
    running = await serve(Metrics(), lambda: True, "127.0.0.1", 0, head_timeout_s=LONG_S, idle_timeout_s=IDLE_S)
    yield running
    await running.aclose()


async def connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)


async def response(reader: asyncio.StreamReader, timeout: float = 5) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length body: status, lower-cased headers, body."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    body = await asyncio.wait_for(reader.readexactly(int(headers.get("content-length", "0"))), timeout)
    return int(lines[0].split(" ", 2)[1]), headers, body


async def closed_by_server(reader: asyncio.StreamReader, timeout: float) -> float:
    """Waits for the server to close the connection (EOF or reset); the seconds it took."""
    start = time.monotonic()
    with contextlib.suppress(ConnectionError):
        while await asyncio.wait_for(reader.read(65536), timeout - (time.monotonic() - start)):
            pass
    return time.monotonic() - start


def close(writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(Exception):
        writer.close()


# ---------------------------------------------------------------- the metrics/health server


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_an_oversize_body_is_refused_before_it_is_read(server: MetricsServer, method: str) -> None:
    reader, writer = await connect(server.port)
    try:
        started = time.monotonic()
        writer.write(f"{method} /metrics HTTP/1.1\r\nHost: t\r\nContent-Length: {BIG}\r\n\r\n".encode() + b"x" * 1000)
        status, _, body = await response(reader)
        assert status == 413 and b"too large" in body
        assert time.monotonic() - started < IDLE_S  # at once, not after a timeout
        assert await closed_by_server(reader, SLACK_S) < SLACK_S
    finally:
        close(writer)


async def test_a_client_cannot_push_a_big_body(server: MetricsServer) -> None:
    """The issue's case: a 60 MiB body sent as fast as the client can. The server stops reading it, so the
    client's writes fail long before the 60 MiB are through."""
    _, writer = await connect(server.port)
    sent = 0
    chunk = b"x" * (1024 * 1024)
    try:
        writer.write(f"GET /metrics HTTP/1.1\r\nHost: t\r\nContent-Length: {BIG}\r\n\r\n".encode())
        with pytest.raises((ConnectionError, TimeoutError)):
            while sent < BIG:
                writer.write(chunk)
                await asyncio.wait_for(writer.drain(), IDLE_S + SLACK_S)
                sent += len(chunk)
        assert sent < BIG // 2, f"the server took {sent} bytes of the body"
    finally:
        close(writer)


async def test_a_slow_body_is_not_waited_for(server: MetricsServer) -> None:
    """A small body that never arrives: the answer comes anyway, and the connection is closed after it."""
    reader, writer = await connect(server.port)
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: t\r\nContent-Length: 1000\r\n\r\n0123456789")
        status, _, body = await response(reader, IDLE_S)
        assert (status, body) == (200, b'{"status":"alive"}')
        assert await closed_by_server(reader, SLACK_S) < SLACK_S
    finally:
        close(writer)


async def test_a_silent_new_connection_is_closed(head_timeout_only: MetricsServer) -> None:
    """By the server's own deadline for a first request head (aiohttp before 3.14 has none)."""
    reader, writer = await connect(head_timeout_only.port)
    try:
        took = await closed_by_server(reader, IDLE_S + SLACK_S)
        assert took >= IDLE_S * 0.8
        assert head_timeout_only.open_connections == 0
    finally:
        close(writer)


async def test_a_kept_alive_connection_is_closed_when_idle(idle_timeout_only: MetricsServer) -> None:
    reader, writer = await connect(idle_timeout_only.port)
    try:
        for _ in range(2):
            writer.write(b"GET /readyz HTTP/1.1\r\nHost: t\r\n\r\n")
            assert (await response(reader))[0] == 200
        took = await closed_by_server(reader, IDLE_S + SLACK_S)
        assert took >= IDLE_S * 0.8
    finally:
        close(writer)


@pytest.mark.parametrize("first", [True, False], ids=["first-request", "kept-alive"])
async def test_headers_trickled_byte_by_byte_do_not_keep_the_connection(
    head_timeout_only: MetricsServer, idle_timeout_only: MetricsServer, first: bool
) -> None:
    """A slowloris client: bytes that never make a whole request head do not reset the deadline, be it the
    first request's or the keep-alive one's."""
    server = head_timeout_only if first else idle_timeout_only
    reader, writer = await connect(server.port)
    if not first:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        assert (await response(reader))[0] == 200

    async def trickle() -> None:
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: t\r\n")
        with contextlib.suppress(ConnectionError):
            for i in range(1000):
                writer.write(f"X-{i}: y\r\n".encode()[: 1 + i % 3])  # never a complete header block
                await writer.drain()
                await asyncio.sleep(IDLE_S / 10)

    task = asyncio.create_task(trickle())
    try:
        took = await closed_by_server(reader, IDLE_S + SLACK_S)
        assert took >= IDLE_S * 0.8
    finally:
        task.cancel()
        close(writer)


async def test_too_many_headers_are_refused(server: MetricsServer) -> None:
    reader, writer = await connect(server.port)
    try:
        many = "".join(f"X-{i}: y\r\n" for i in range(100))
        writer.write(f"GET /metrics HTTP/1.1\r\nHost: t\r\n{many}\r\n".encode())
        status, _, _ = await response(reader)
        assert status in (400, 431)
    finally:
        close(writer)


async def test_connections_beyond_the_cap_are_refused(server: MetricsServer) -> None:
    held = []
    try:
        for _ in range(MAX_CONNECTIONS):
            reader, writer = await connect(server.port)
            held.append(writer)
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")  # kept alive: the connection stays open
            assert (await response(reader))[0] == 200
        assert server.open_connections == MAX_CONNECTIONS

        reader, writer = await connect(server.port)
        try:
            status, headers, _ = await response(reader)
            assert (status, headers["connection"], headers["retry-after"]) == (503, "close", "1")
            assert await closed_by_server(reader, SLACK_S) < SLACK_S
        finally:
            close(writer)

        # one held connection ends: a new one is served again
        held.pop().close()
        deadline = time.monotonic() + 5
        while server.open_connections >= MAX_CONNECTIONS:
            assert time.monotonic() < deadline, "the closed connection was not counted out"
            await asyncio.sleep(0.01)
        reader, writer = await connect(server.port)
        held.append(writer)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        assert (await response(reader))[0] == 200
    finally:
        for writer in held:
            close(writer)


async def test_only_get_and_head_on_known_paths(server: MetricsServer) -> None:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}", timeout=5) as client:
        metrics = await client.get("/metrics")
        assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
        assert b"embed_requests_received_total" in metrics.content
        head = await client.head("/healthz")
        assert head.status_code == 200 and head.content == b""
        assert (await client.get("/nope")).status_code == 404
        post = await client.post("/metrics")
        assert post.status_code == 405 and post.headers["allow"] == "GET, HEAD"


async def test_close_stops_listening_at_once() -> None:
    """``close()`` is synchronous (for callers that cannot await); the port is refused right after it."""
    running = await serve(Metrics(), lambda: False, "127.0.0.1", 0, idle_timeout_s=IDLE_S)
    port = running.port
    async with httpx.AsyncClient(timeout=5) as client:
        assert (await client.get(f"http://127.0.0.1:{port}/readyz")).status_code == 503
    running.close()
    with pytest.raises(OSError):
        await connect(port)
    await running.aclose()


# ---------------------------------------------------------------- the emulator


def _api_error(body: bytes) -> dict[str, Any]:
    error = orjson.loads(body)["error"]
    assert set(error) >= {"code", "message", "status"}
    return dict(error)


async def test_the_emulator_refuses_an_announced_oversize_body(emulator: EmulatorThread) -> None:
    port = int(emulator.base_url.rsplit(":", 1)[1])
    reader, writer = await connect(port)
    try:
        size = emulator_module.MAX_BODY + 1
        writer.write(
            b"POST /v1beta/models/gemini-embedding-001:batchEmbedContents HTTP/1.1\r\nHost: t\r\n"
            + f"x-goog-api-key: k\r\nContent-Type: application/json\r\nContent-Length: {size}\r\n\r\n".encode()
            + b'{"requests": ['
        )
        status, headers, body = await response(reader)
        assert status == 400 and headers["content-type"].startswith("application/json")
        error = _api_error(body)
        assert error["code"] == 400 and error["status"] == "INVALID_ARGUMENT"
        assert f"exceeds the limit: {emulator_module.MAX_BODY} bytes" in error["message"]
    finally:
        close(writer)


async def test_the_emulator_refuses_a_chunked_body_that_outgrows_the_limit(emulator: EmulatorThread) -> None:
    chunk = b" " * (1024 * 1024)

    async def body() -> AsyncIterator[bytes]:  # no Content-Length: sent chunked, size unknown up front
        for _ in range(emulator_module.MAX_BODY // len(chunk) + 2):
            yield chunk

    async with httpx.AsyncClient(base_url=emulator.base_url, timeout=30) as client:
        with contextlib.suppress(httpx.WriteError):  # the server may close before the client is done
            got = await client.post(
                "/v1beta/models/gemini-embedding-001:batchEmbedContents",
                headers={"x-goog-api-key": "k"},
                content=body(),
            )
            assert got.status_code == 400
            assert "exceeds the limit" in _api_error(got.content)["message"]
        # and it still serves
        ok = await client.post(
            "/v1beta/models/gemini-embedding-001:embedContent",
            headers={"x-goog-api-key": "k"},
            json={"content": {"parts": [{"text": "hello"}]}, "outputDimensionality": 128},
        )
        assert ok.status_code == 200 and len(ok.json()["embedding"]["values"]) == 128


async def test_the_emulator_does_not_wait_forever_for_a_body(
    emulator: EmulatorThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(emulator_module, "BODY_TIMEOUT_S", IDLE_S)
    port = int(emulator.base_url.rsplit(":", 1)[1])
    reader, writer = await connect(port)
    try:
        writer.write(
            b"POST /v1beta/models/gemini-embedding-001:batchEmbedContents HTTP/1.1\r\nHost: t\r\n"
            b"x-goog-api-key: k\r\nContent-Length: 1000\r\n\r\n{"
        )
        status, headers, body = await response(reader, IDLE_S + SLACK_S)
        assert status == 408 and _api_error(body)["code"] == 408
        assert headers["connection"] == "close"  # after aiohttp's lingering close (it drains what still comes)
    finally:
        close(writer)


# ---------------------------------------------------------------- the SDK's transport


@pytest.fixture
def transports(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, int]]:
    """Counts requests sent through httpx, and fails any sent through aiohttp."""
    assert _api_client.has_aiohttp, "aiohttp is not importable: these tests would prove nothing"
    seen = {"httpx": 0}
    send = httpx.AsyncClient.send

    async def counting_send(self: httpx.AsyncClient, request: httpx.Request, **kwargs: Any) -> httpx.Response:
        seen["httpx"] += 1
        return await send(self, request, **kwargs)

    async def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the SDK sent a request through aiohttp")

    monkeypatch.setattr(httpx.AsyncClient, "send", counting_send)
    monkeypatch.setattr(aiohttp.ClientSession, "_request", refuse)
    yield seen


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast-path", "public-method"])
async def test_the_embedder_stays_on_httpx_with_aiohttp_importable(
    emulator: EmulatorThread, transports: dict[str, int], fast_path: bool
) -> None:
    embedder = GeminiEmbedder(api_key=SecretStr("k"), base_url=emulator.base_url, fast_path=fast_path)
    try:
        assert embedder.client._api_client._use_aiohttp() is False
        vectors = await embedder.call(["a", "b"], EmbedConfig("gemini-embedding-001", None, 128))
        assert vectors.shape == (2, 128)
        assert transports["httpx"] == 1
    finally:
        await embedder.aclose()


async def test_the_naive_bench_worker_stays_on_httpx(emulator: EmulatorThread, transports: dict[str, int]) -> None:
    client = sdk_client(emulator.base_url)
    options = client._api_client._http_options
    try:
        assert client._api_client._use_aiohttp() is False
        assert options.timeout == 30_000  # milliseconds
        result = await client.aio.models.embed_content(model="gemini-embedding-001", contents=["a", "b"])
        assert len(result.embeddings or []) == 2
        assert transports["httpx"] == 1
    finally:
        assert options.httpx_async_client is not None
        await options.httpx_async_client.aclose()
