"""An asyncio caller library: publish embed requests, await replies over Direct Reply-to.

This is the caller side, so it imports aio-pika itself; the worker's own AMQP code is in
``worker.amqp``. Usage::

    async with EmbedClient("amqp://guest:guest@localhost/") as client:
        vectors = await client.embed(["first text", "second text"], task_type="RETRIEVAL_DOCUMENT")
"""

from __future__ import annotations

import asyncio
import time
import uuid
from types import TracebackType
from typing import Any

import aio_pika
import numpy as np
import orjson
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage

from worker.messages import (
    DEADLINE_HEADER,
    FLOAT32_CONTENT_TYPE,
    JSON_CONTENT_TYPE,
    Vectors,
    decode_float32_reply,
)

DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"
ROUTING_KEY = "embed.requests"
EXCHANGE = "embed.requests"
DEFERRED_KEY = "embed.deferred"
FLUSH_KEY = "embed.deferred.flush"


class EmbedClientError(Exception):
    """The worker answered with an error."""

    def __init__(self, code: str, message: str, retryable: bool):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retryable = retryable


class EmbedClient:
    def __init__(self, url: str, *, timeout: float = 30.0, max_in_flight: int = 256, exchange: str = ""):
        self._url = url
        self._timeout = timeout
        self._exchange_name = exchange
        self._slots = asyncio.Semaphore(max_in_flight)
        self._connection: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None
        self._pending: dict[str, asyncio.Future[AbstractIncomingMessage]] = {}

    async def connect(self) -> None:
        self._connection = await aio_pika.connect(self._url)
        self._channel = await self._connection.channel()
        # Direct Reply-to: consume the pseudo-queue in no-ack mode on the channel we publish from.
        queue = await self._channel.get_queue(DIRECT_REPLY_TO, ensure=False)
        await queue.consume(self._on_reply, no_ack=True)

    async def close(self) -> None:
        for future in self._pending.values():
            future.cancel()
        if self._connection is not None:
            await self._connection.close()

    async def __aenter__(self) -> EmbedClient:
        await self.connect()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        future = self._pending.pop(message.correlation_id or "", None)
        if future is not None and not future.done():
            future.set_result(message)

    async def embed(
        self,
        texts: list[str],
        *,
        model: str | None = None,
        task_type: str | None = None,
        output_dimensionality: int | None = None,
        timeout: float | None = None,
        binary: bool = False,
    ) -> Vectors:
        """Vectors for ``texts`` in order; raises EmbedClientError or TimeoutError.

        The timeout also becomes the request's ``x-deadline``, so the worker spends no upstream call
        on a request whose caller has stopped waiting. ``binary`` asks for the float32 reply encoding.
        """
        body: dict[str, Any] = {"texts": texts}
        if binary:
            body["reply_encoding"] = "float32"
        if model:
            body["model"] = model
        if task_type:
            body["task_type"] = task_type
        if output_dimensionality:
            body["output_dimensionality"] = output_dimensionality
        message = await self.request(orjson.dumps(body), timeout=timeout)
        if message.content_type == FLOAT32_CONTENT_TYPE:
            return decode_float32_reply(message.body, message.headers or {})
        reply = orjson.loads(message.body)
        if "error" in reply:
            err = reply["error"]
            raise EmbedClientError(err["code"], err["message"], bool(err.get("retryable")))
        return np.asarray(reply["embeddings"], dtype=np.float32)

    async def defer(self, items: list[tuple[str, str]], **options: Any) -> None:
        """Hand (key, text) pairs to the fire-and-forget lane; vectors land in Redis hashes by key."""
        assert self._channel is not None, "call connect() first"
        body: dict[str, Any] = {"items": [{"key": k, "text": t} for k, t in items]}
        body.update({k: v for k, v in options.items() if v is not None})
        exchange = await self._channel.get_exchange(EXCHANGE, ensure=False)
        await exchange.publish(
            aio_pika.Message(
                orjson.dumps(body), content_type=JSON_CONTENT_TYPE, delivery_mode=aio_pika.DeliveryMode.PERSISTENT
            ),
            routing_key=DEFERRED_KEY,
        )

    async def flush(self, *, timeout: float | None = None) -> int:
        """Ask every worker's deferred lane to drain now; returns the vectors the first to answer wrote."""
        message = await self.request(b"{}", timeout=timeout, routing_key=FLUSH_KEY, exchange=EXCHANGE)
        reply = orjson.loads(message.body)
        if "error" in reply:
            err = reply["error"]
            raise EmbedClientError(err["code"], err["message"], bool(err.get("retryable")))
        return int(reply["flushed"])

    async def request(
        self, body: bytes, *, timeout: float | None = None, routing_key: str = ROUTING_KEY, exchange: str | None = None
    ) -> AbstractIncomingMessage:
        assert self._channel is not None, "call connect() first"
        timeout = timeout or self._timeout
        async with self._slots:
            cid = uuid.uuid4().hex
            future: asyncio.Future[AbstractIncomingMessage] = asyncio.get_running_loop().create_future()
            self._pending[cid] = future
            message = aio_pika.Message(
                body,
                content_type=JSON_CONTENT_TYPE,
                correlation_id=cid,
                reply_to=DIRECT_REPLY_TO,
                headers={DEADLINE_HEADER: int((time.time() + timeout) * 1000)},
                expiration=timeout,
            )
            name = self._exchange_name if exchange is None else exchange
            target = (
                self._channel.default_exchange if not name else await self._channel.get_exchange(name, ensure=False)
            )
            try:
                await target.publish(message, routing_key=routing_key)
                return await asyncio.wait_for(future, timeout)
            finally:
                self._pending.pop(cid, None)


class SyncEmbedClient:
    """A blocking wrapper for scripts and notebooks: the async client on a private event loop thread."""

    def __init__(self, url: str, **kwargs: Any):
        import threading

        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="embed-client", daemon=True)
        self._thread.start()
        self._client = EmbedClient(url, **kwargs)
        self._call(self._client.connect())

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def embed(self, texts: list[str], **kwargs: Any) -> Vectors:
        result: Vectors = self._call(self._client.embed(texts, **kwargs))
        return result

    def close(self) -> None:
        self._call(self._client.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def __enter__(self) -> SyncEmbedClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
