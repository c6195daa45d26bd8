"""The metrics server's connection cap over real sockets, on both event loops the worker runs on (uvloop is the
default, EVENT_LOOP=asyncio the other): past the cap a client gets the documented 503, not a closed socket."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from typing import Any

import httpx
import pytest
import uvloop

from worker.metrics import Metrics
from worker.metrics_server import MAX_CONNECTIONS, MetricsServer, serve

LONG_S = 30.0  # the server's head and idle timeouts here: held connections stay open for the whole test
WAIT_S = 5.0  # for any one answer

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


def run_on(loop: str, scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        runner.run(asyncio.wait_for(scenario(), 60))


async def head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    """The status and lower-cased headers of one response (its body, if any, left unread)."""
    raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT_S)
    status_line, *lines = raw.decode("latin-1").rstrip("\r\n").split("\r\n")
    headers = dict(line.split(":", 1) for line in lines)
    return int(status_line.split()[1]), {k.strip().lower(): v.strip() for k, v in headers.items()}


async def hold(server: MetricsServer) -> asyncio.StreamWriter:
    """A connection the server has taken (it answered one request) and that stays open in the middle of its next
    request head."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", server.port), WAIT_S)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
    status, headers = await head(reader)
    assert status == 200
    await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), WAIT_S)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: t\r\n")  # never finished
    await writer.drain()
    return writer


@pytest.mark.parametrize("loop", list(LOOPS))
def test_the_connection_past_the_cap_gets_a_503_with_retry_after(loop: str) -> None:
    async def scenario() -> None:
        server = await serve(Metrics(), lambda: True, "127.0.0.1", 0, head_timeout_s=LONG_S, idle_timeout_s=LONG_S)
        held = []
        try:
            held = list(await asyncio.gather(*(hold(server) for _ in range(MAX_CONNECTIONS))))
            assert server.open_connections == MAX_CONNECTIONS

            reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", server.port), WAIT_S)
            writer.write(b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n")
            status, headers = await head(reader)
            assert (status, headers["retry-after"], headers["connection"]) == (503, "1", "close")
            assert await asyncio.wait_for(reader.read(), WAIT_S) == b""  # then closed
            writer.close()

            async with httpx.AsyncClient(timeout=WAIT_S) as client:  # what a real client makes of it
                refused = await client.get(f"http://127.0.0.1:{server.port}/metrics")
            assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
            assert server.open_connections == MAX_CONNECTIONS  # the refused ones were never counted in
        finally:
            for writer in held:
                with contextlib.suppress(Exception):
                    writer.close()
            await server.aclose()

    run_on(loop, scenario)
