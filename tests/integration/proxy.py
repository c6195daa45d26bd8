"""A TCP proxy in front of the broker that a test can cut, optionally terminating TLS."""

from __future__ import annotations

import asyncio
import contextlib
import ssl


class Proxy:
    def __init__(self, host: str, port: int, ssl_context: ssl.SSLContext | None = None):
        self._target = (host, port)
        self._ssl = ssl_context
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self, port: int = 0) -> Proxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", port, ssl=self._ssl)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        broker_r, broker_w = await asyncio.open_connection(*self._target)
        self._writers |= {client_w, broker_w}
        for task in (
            asyncio.create_task(self._pipe(client_r, broker_w)),
            asyncio.create_task(self._pipe(broker_r, client_w)),
        ):
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def cut(self) -> None:
        """Refuse new connections and drop the open ones: the broker is unreachable from here on."""
        if self._server is not None:
            self._server.close()
        for writer in self._writers:
            writer.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
