"""A minimal asyncio HTTP/1.1 server (keep-alive, Content-Length bodies) for the emulator and the
metrics/health endpoints. Small on purpose: neither needs more, and neither should be the bottleneck."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

MAX_BODY = 64 * 1024 * 1024
_REASONS = {
    200: "OK",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    413: "Payload Too Large",
    429: "Too Many Requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes
    content_type: str = "application/json; charset=UTF-8"


Handler = Callable[[Request], Awaitable[Response]]


async def start_server(handler: Handler, host: str, port: int) -> asyncio.Server:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = [*lines[0].split(" ", 2), "", ""][:3]
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        name, value = line.split(":", 1)
                        headers[name.strip().lower()] = value.strip()
                length = int(headers.get("content-length", "0") or 0)
                if length > MAX_BODY:
                    await _write(writer, Response(413, b'{"error":{"code":413,"message":"too large"}}'))
                    return
                body = await reader.readexactly(length) if length else b""
                response = await handler(Request(method, target.split("?", 1)[0], headers, body))
                await _write(writer, response)
                if headers.get("connection", "").lower() == "close":
                    return
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            return
        finally:
            writer.close()

    return await asyncio.start_server(serve, host, port, backlog=512)


async def _write(writer: asyncio.StreamWriter, response: Response) -> None:
    head = (
        f"HTTP/1.1 {response.status} {_REASONS.get(response.status, 'Status')}\r\n"
        f"Content-Type: {response.content_type}\r\nContent-Length: {len(response.body)}\r\n\r\n"
    )
    writer.write(head.encode("latin-1") + response.body)
    await writer.drain()
