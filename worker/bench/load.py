"""The load driver: publishes requests, collects replies, and keeps the timings.

It runs in the bench process, never inside a worker. Replies are counted as they arrive and only a
sample is parsed and checked (right vector for the right text), so the driver spends as little CPU
as it can on the shared machine.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import aio_pika
import numpy as np

from worker import limits
from worker.messages import JSON_CONTENT_TYPE, decode_reply, encode_request
from worker.topology import ROUTING_KEY
from worker.vectors import expected_vector


@dataclass
class Sent:
    text: str
    at: float
    check: bool


@dataclass
class Driver:
    url: str
    sample_every: int = 50
    sent: dict[str, Sent] = field(default_factory=dict)
    received: dict[str, float] = field(default_factory=dict)
    bodies: dict[str, aio_pika.abc.AbstractIncomingMessage] = field(default_factory=dict)
    reply_encoding: str = "json"
    on_reply: Callable[[], None] | None = None
    # Where requests go: the default exchange with the default lane's key, as before lanes; or an exchange by name
    # (worker.topology.EXCHANGE) with the key of the lane to reach (ROUTING_KEY or BULK_KEY).
    exchange: str = ""
    routing_key: str = ROUTING_KEY

    async def __aenter__(self) -> Driver:
        self.connection = await aio_pika.connect(self.url)
        self.channel = await self.connection.channel()
        self._exchange: aio_pika.abc.AbstractExchange = self.channel.default_exchange
        if self.exchange:
            self._exchange = await self.channel.get_exchange(self.exchange, ensure=False)
        self.queue = await self.channel.declare_queue("", exclusive=True, auto_delete=True)
        self._all_in = asyncio.Event()
        self._target = 0
        await self.queue.consume(self._reply, no_ack=True)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.connection.close()

    async def _reply(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        cid = message.correlation_id or ""
        if cid in self.received:
            return  # a duplicate (allowed after redelivery); the first one counts
        self.received[cid] = time.perf_counter()
        sent = self.sent.get(cid)
        if sent is not None and sent.check:
            self.bodies[cid] = message
        if self.on_reply is not None:
            self.on_reply()
        if len(self.received) >= self._target:
            self._all_in.set()

    async def send(self, text: str, *, model: str, dims: int | None) -> None:
        body = encode_request([text], model=model, output_dimensionality=dims, reply_encoding=self.reply_encoding)
        await self.send_body(body, text)

    async def send_body(self, body: bytes, seed: str) -> None:
        """Publish a ready-made request body; ``seed`` is what its one input's vector derives from (the text
        itself for a text; ``vectors.seed_of`` of its parts otherwise), so sampled replies are checked too."""
        cid = uuid.uuid4().hex
        self.sent[cid] = Sent(seed, time.perf_counter(), len(self.sent) % self.sample_every == 0)
        await self._exchange.publish(
            aio_pika.Message(body, content_type=JSON_CONTENT_TYPE, correlation_id=cid, reply_to=self.queue.name),
            routing_key=self.routing_key,
        )

    async def open_loop(self, rate: float, count: int, *, model: str, dims: int | None, prefix: str) -> None:
        """Send ``count`` requests at ``rate`` per second on a fixed schedule (not paced by replies)."""
        start = time.perf_counter()
        for i in range(count):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            await self.send(f"{prefix} {i}", model=model, dims=dims)

    async def wait_for(self, total: int, timeout: float) -> None:
        self._target = total
        if len(self.received) >= total:
            return
        self._all_in.clear()
        await asyncio.wait_for(self._all_in.wait(), timeout)

    def check_sample(self, *, model: str, dims: int | None, echo: bool = False) -> int:
        """Verify the sampled replies; returns how many were checked. Raises on a wrong vector."""
        full = limits.full_dimensions(model)
        for cid, message in self.bodies.items():
            got = decode_reply(message.body, message.content_type, message.headers, count=1)[0]
            if echo:
                if got.shape != ((dims or full),):
                    raise AssertionError(f"echo reply of shape {got.shape}")
                continue
            want = expected_vector(self.sent[cid].text, model=model, task_type=None, dims=dims, full_dims=full)
            if not np.allclose(got, want, atol=1e-6):
                raise AssertionError(f"wrong vector for {self.sent[cid].text!r}")
        return len(self.bodies)

    def latencies_ms(self, cids: list[str] | None = None) -> np.ndarray:
        keys = cids if cids is not None else list(self.received)
        return np.array([(self.received[c] - self.sent[c].at) * 1000 for c in keys if c in self.received])
