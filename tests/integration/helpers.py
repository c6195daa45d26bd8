"""Callers for the integration tests, and the one check every reply gets."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import aio_pika
import numpy as np
import orjson

from worker import limits
from worker.amqp import codec
from worker.vectors import expected_vector


def assert_right_vectors(
    reply: dict[str, Any],
    texts: Sequence[str],
    *,
    model: str = "gemini-embedding-001",
    task_type: str | None = None,
    dims: int | None = None,
) -> None:
    """The reply holds, in order, the vector the emulator derives from each text, normalised."""
    assert "error" not in reply, reply
    full = limits.full_dimensions(model)
    want_dims = dims or full
    assert reply["model"] == model
    assert reply["dimensions"] == want_dims
    got = np.asarray(reply["embeddings"], dtype=np.float32)
    assert got.shape == (len(texts), want_dims)
    for i, text in enumerate(texts):
        want = expected_vector(text, model=model, task_type=task_type, dims=dims, full_dims=full)
        assert np.allclose(got[i], want, atol=1e-6), f"vector {i} is not the vector of {text!r}"
        assert abs(float(np.linalg.norm(got[i])) - 1.0) < 1e-5


class RawCaller:
    """Publishes arbitrary request messages and collects replies from an exclusive server-named queue."""

    def __init__(self, url: str):
        self.url = url
        self.replies: dict[str, asyncio.Future[aio_pika.abc.AbstractIncomingMessage]] = {}
        self.counts: Counter[str] = Counter()

    async def __aenter__(self) -> RawCaller:
        codec.install()  # replies may carry the bytes a hostile request sent (see test_hostile_input.py)
        self.connection = await aio_pika.connect(self.url)
        self.channel = await self.connection.channel()
        self.queue = await self.channel.declare_queue("", exclusive=True, auto_delete=True)
        await self.queue.consume(self._on_reply, no_ack=True)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.connection.close()

    async def _on_reply(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        self.counts[message.correlation_id or ""] += 1
        future = self.replies.get(message.correlation_id or "")
        if future is not None and not future.done():
            future.set_result(message)

    async def send(
        self,
        body: bytes | dict[str, Any],
        *,
        reply_to: str | None = "",
        correlation_id: str | None = None,
        headers: dict[str, Any] | None = None,
        content_type: str | None = "application/json",
        content_encoding: str | None = None,
        routing_key: str = "embed.requests",
        expiration: float | None = None,
    ) -> str:
        cid = correlation_id or uuid.uuid4().hex
        self.replies[cid] = asyncio.get_running_loop().create_future()
        raw = body if isinstance(body, bytes) else orjson.dumps(body)
        await self.channel.default_exchange.publish(
            aio_pika.Message(
                raw,
                content_type=content_type,
                content_encoding=content_encoding,
                correlation_id=cid,
                reply_to=self.queue.name if reply_to == "" else reply_to,
                headers=headers,
                expiration=expiration,
            ),
            routing_key=routing_key,
        )
        return cid

    async def reply(self, cid: str, timeout: float = 20) -> dict[str, Any]:
        message = await asyncio.wait_for(self.replies[cid], timeout)
        assert message.correlation_id == cid
        result: dict[str, Any] = orjson.loads(message.body)
        return result

    async def sync(self, timeout: float = 10) -> None:
        """Return once every reply already in our queue has been received (the queue is FIFO)."""
        cid = await self.send(b"sentinel", reply_to=None, routing_key=self.queue.name)
        await asyncio.wait_for(self.replies[cid], timeout)

    async def call(self, body: bytes | dict[str, Any], timeout: float = 20, **kw: Any) -> dict[str, Any]:
        return await self.reply(await self.send(body, **kw), timeout)


async def get_one(url: str, queue: str, timeout: float = 10) -> aio_pika.abc.AbstractIncomingMessage:
    """Wait for one message on ``queue`` (for checking the dead-letter queue)."""
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        q = await channel.get_queue(queue)
        async with q.iterator() as it:
            async for message in it:
                await message.ack()
                return message
        raise AssertionError("queue iterator ended")
    finally:
        await asyncio.wait_for(connection.close(), timeout)


async def _passive(url: str, queue: str) -> tuple[int, int]:
    """(messages ready, consumers) of ``queue``, from a passive declare."""
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        q = await channel.declare_queue(queue, passive=True)
        result = q.declaration_result
        return int(result.message_count or 0), int(result.consumer_count or 0)
    finally:
        await connection.close()


async def queue_depth(url: str, queue: str) -> int:
    """Messages waiting in ``queue`` that no consumer holds."""
    return (await _passive(url, queue))[0]


async def consumers(url: str, queue: str) -> int:
    return (await _passive(url, queue))[1]


async def wait_until(probe: Callable[[], Awaitable[int]], want: int, timeout: float = 20) -> None:
    """Poll a broker-side count until it equals ``want`` (the broker offers no event for this)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while (value := await probe()) != want:
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"count stayed at {value}, wanted {want}")
        await asyncio.sleep(0.05)
