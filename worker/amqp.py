"""RabbitMQ transport: the only worker module that imports aio-pika.

It owns the robust connection, the topology, the consumer and the reply publisher, and adapts
aio-pika's incoming messages to ``worker.service.Delivery``. It knows nothing about embeddings.

Facts relied on (RabbitMQ docs and aio-pika source):
- Delivery tags belong to their channel. After a reconnect the robust channel is a new channel, and
  acking an old message raises ``ChannelInvalidStateError`` (aio_pika/message.py ``channel``). The
  broker has already requeued those deliveries, so we log and move on; duplicates are answered again.
- Quorum queues reject a global QoS; prefetch is per consumer (``global_=False``).
- A reply published with ``mandatory=True`` to a queue that does not exist comes back as basic.return,
  which aiormq turns into ``PublishError`` on the publish confirmation (aiormq/channel.py
  ``_on_return_frame``). That is how we learn a caller has gone.
- Direct Reply-to (``amq.rabbitmq.reply-to.*``) replies go through the default exchange, from any
  channel (RabbitMQ "Direct Reply-to" guide).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustChannel,
    AbstractRobustConnection,
)
from aio_pika.exceptions import ChannelInvalidStateError
from pamqp import commands as spec

from worker.messages import Reply
from worker.service import Delivery, ReplyUndeliverable

log = logging.getLogger(__name__)

EXCHANGE = "embed.requests"
QUEUE = "embed.requests"
ROUTING_KEY = "embed.requests"
DLX = "embed.requests.dlx"
DLQ = "embed.requests.dlq"
DEFERRED_QUEUE = "embed.deferred"
DEFERRED_KEY = "embed.deferred"
DEFERRED_DLQ = "embed.deferred.dlq"
FLUSH_KEY = "embed.deferred.flush"  # control messages: every worker's lane drains now
CALLER_CHECK_TTL_S = 1.0


@dataclass(frozen=True, slots=True)
class AmqpConfig:
    url: str
    prefetch: int
    queue_type: str = "quorum"
    delivery_limit: int = 5
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    connection_name: str = "embed-worker"
    reconnect_interval: float = 2.0


def queue_arguments(config: AmqpConfig, dead_letter_key: str = QUEUE) -> dict[str, Any]:
    args: dict[str, Any] = {
        "x-queue-type": config.queue_type,
        "x-dead-letter-exchange": DLX,
        "x-dead-letter-routing-key": dead_letter_key,
    }
    if config.queue_type == "quorum":
        # Past this many deliveries the broker dead-letters the message (reason "delivery_limit"):
        # a request that crashes or stalls every worker cannot loop forever.
        args["x-delivery-limit"] = config.delivery_limit
    return args


class _PassiveDeclare(spec.Queue.Declare):
    """queue.declare(passive) without pamqp's name check: RabbitMQ's own Direct Reply-to names end in
    base64 padding ("...==") that pamqp's queue-name pattern refuses, yet the broker answers for them."""

    def validate(self) -> None:
        return None


class _IncomingDelivery:
    """aio-pika's message seen through the ``Delivery`` protocol."""

    __slots__ = (
        "_message",
        "body",
        "content_type",
        "correlation_id",
        "headers",
        "message_id",
        "redelivered",
        "reply_to",
    )

    def __init__(self, message: AbstractIncomingMessage):
        self._message = message
        self.body = message.body
        self.content_type = message.content_type
        self.headers: Mapping[str, Any] = message.headers or {}
        self.reply_to = message.reply_to
        self.correlation_id = message.correlation_id
        self.message_id = message.message_id
        self.redelivered = bool(message.redelivered)

    async def ack(self) -> None:
        try:
            await self._message.ack()
        except (ChannelInvalidStateError, aiormq.exceptions.AMQPError) as exc:
            # The channel this came on is gone: the broker redelivers it; never ack it elsewhere.
            log.info("ack of correlation_id=%s skipped, its channel is closed (%r)", self.correlation_id, exc)

    async def reject(self, *, requeue: bool) -> None:
        try:
            await self._message.reject(requeue=requeue)
        except (ChannelInvalidStateError, aiormq.exceptions.AMQPError) as exc:
            log.info("reject of correlation_id=%s skipped, its channel is closed (%r)", self.correlation_id, exc)


class AmqpTransport:
    def __init__(self, config: AmqpConfig):
        self._config = config
        self._connection: AbstractRobustConnection | None = None
        self._consume_channel: AbstractRobustChannel | None = None
        self._publish_channel: AbstractRobustChannel | None = None
        self._queue: AbstractQueue | None = None
        self._consumer_tag: str | None = None
        self._handler: Callable[[Delivery], Awaitable[None]] | None = None
        self._stopping = False
        self._control: set[asyncio.Task[None]] = set()
        self._deferred_channel: AbstractRobustChannel | None = None
        self._probe_channel: aiormq.abc.AbstractChannel | None = None
        self._probe_lock = asyncio.Lock()
        self._alive_until: dict[str, float] = {}  # reply_to -> loop time until which it counts as alive
        self._inflight: set[asyncio.Task[Any]] = set()
        self._idle = asyncio.Event()
        self._idle.set()

    async def connect(self) -> None:
        self._connection = await aio_pika.connect_robust(
            self._config.url,
            ssl_context=self._ssl_context(),
            client_properties={"connection_name": self._config.connection_name},
            reconnect_interval=self._config.reconnect_interval,
        )
        self._connection.reconnect_callbacks.add(self._on_reconnect)
        self._consume_channel = await self._connection.channel()
        assert self._consume_channel is not None
        await self._consume_channel.set_qos(prefetch_count=self._config.prefetch)
        # Replies go on their own confirm-mode channel so a publish problem never closes the consumer.
        self._publish_channel = await self._connection.channel(publisher_confirms=True)
        self._queue = await self._declare_topology(self._consume_channel)

    def _ssl_context(self) -> ssl.SSLContext | None:
        c = self._config
        if not (c.ca_file or c.cert_file):
            return None
        ctx = ssl.create_default_context(cafile=c.ca_file)
        if c.cert_file:
            ctx.load_cert_chain(c.cert_file, c.key_file)
        return ctx

    async def _declare_topology(self, channel: AbstractRobustChannel) -> AbstractQueue:
        """Idempotent: declaring what exists with the same arguments is a no-op."""
        exchange = await channel.declare_exchange(EXCHANGE, aio_pika.ExchangeType.DIRECT, durable=True)
        dlx = await channel.declare_exchange(DLX, aio_pika.ExchangeType.DIRECT, durable=True)
        dlq = await channel.declare_queue(DLQ, durable=True, arguments={"x-queue-type": self._config.queue_type})
        await dlq.bind(dlx, routing_key=QUEUE)
        queue = await channel.declare_queue(QUEUE, durable=True, arguments=queue_arguments(self._config))
        await queue.bind(exchange, routing_key=ROUTING_KEY)
        # The fire-and-forget lane's buffer, on the same exchange.
        deferred_dlq = await channel.declare_queue(
            DEFERRED_DLQ, durable=True, arguments={"x-queue-type": self._config.queue_type}
        )
        await deferred_dlq.bind(dlx, routing_key=DEFERRED_KEY)
        deferred = await channel.declare_queue(
            DEFERRED_QUEUE, durable=True, arguments=queue_arguments(self._config, DEFERRED_KEY)
        )
        await deferred.bind(exchange, routing_key=DEFERRED_KEY)
        return queue

    async def start_consuming(self, handler: Callable[[Delivery], Awaitable[None]]) -> None:
        assert self._queue is not None
        self._handler = handler

        async def on_message(message: AbstractIncomingMessage) -> None:
            task = asyncio.current_task()
            assert task is not None
            self._inflight.add(task)
            self._idle.clear()
            try:
                await handler(_IncomingDelivery(message))
            except Exception:
                log.exception("unhandled error handling correlation_id=%s", message.correlation_id)
            finally:
                self._inflight.discard(task)
                if not self._inflight:
                    self._idle.set()

        self._consumer_tag = await self._queue.consume(on_message)
        log.info("consuming from %s (prefetch %d)", QUEUE, self._config.prefetch)

    def pause(self) -> None:
        """Stop taking new deliveries for now (the upstream is failing); those in hand carry on."""
        self._spawn(self._cancel_consumer())

    def resume(self) -> None:
        if self._stopping or self._handler is None or self._consumer_tag is not None:
            return
        self._spawn(self.start_consuming(self._handler))

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._control.add(task)
        task.add_done_callback(self._control.discard)

    async def stop_consuming(self) -> None:
        """For shutdown: cancel the consumer and never resume."""
        self._stopping = True
        await self._cancel_consumer()

    async def _cancel_consumer(self) -> None:
        """basic.cancel: the broker stops sending; deliveries already here are still ours to settle."""
        if self._queue is not None and self._consumer_tag is not None:
            tag, self._consumer_tag = self._consumer_tag, None
            try:
                await self._queue.cancel(tag)
            except Exception as exc:
                log.info("consumer cancel failed (%r); closing the channel will stop it", exc)

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    @property
    def paused(self) -> bool:
        return self._handler is not None and self._consumer_tag is None and not self._stopping

    @property
    def ready(self) -> bool:
        """Connected, topology declared, and consuming (or paused by the breaker, which resumes itself)."""
        connected = self._connection is not None and not self._connection.is_closed
        return connected and self._queue is not None and self._handler is not None and not self._stopping

    async def wait_idle(self) -> None:
        await self._idle.wait()

    async def publish_reply(self, reply_to: str, correlation_id: str | None, reply: Reply) -> None:
        assert self._publish_channel is not None
        message = aio_pika.Message(
            reply.body,
            content_type=reply.content_type,
            headers=reply.headers,
            correlation_id=correlation_id,
            delivery_mode=aio_pika.DeliveryMode.NOT_PERSISTENT,
        )
        try:
            await self._publish_channel.default_exchange.publish(message, routing_key=reply_to, mandatory=True)
        except aiormq.exceptions.PublishError as exc:
            raise ReplyUndeliverable(reply_to) from exc

    # ------------------------------------------------------------------ deferred lane
    async def _deferred(self) -> AbstractRobustChannel:
        if self._deferred_channel is None or self._deferred_channel.is_closed:
            assert self._connection is not None
            self._deferred_channel = await self._connection.channel()
        return self._deferred_channel

    async def fetch_deferred(self, max_messages: int) -> list[Delivery]:
        """basic.get up to ``max_messages``: take what is there, hold nothing in a prefetch window."""
        channel = await self._deferred()
        queue = await channel.get_queue(DEFERRED_QUEUE, ensure=False)
        out: list[Delivery] = []
        while len(out) < max_messages:
            message = await queue.get(no_ack=False, fail=False)
            if message is None:
                break
            out.append(_IncomingDelivery(message))
        return out

    async def deferred_depth(self) -> int:
        channel = await self._deferred()
        queue = await channel.declare_queue(DEFERRED_QUEUE, passive=True)
        return int(queue.declaration_result.message_count or 0)

    async def consume_flush_requests(self, on_flush: Callable[[Delivery], None]) -> None:
        """A private queue per worker bound to ``embed.deferred.flush``: every worker hears it.

        Named ``embed.deferred.flush.<host>.<pid>.<random>`` (not server-named) so that a worker user whose
        permissions cover only ``embed.*`` may declare it."""
        channel = await self._deferred()
        name = f"{FLUSH_KEY}.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        queue = await channel.declare_queue(name, exclusive=True, auto_delete=True)
        await queue.bind(EXCHANGE, routing_key=FLUSH_KEY)

        async def on_message(message: AbstractIncomingMessage) -> None:
            on_flush(_IncomingDelivery(message))

        await queue.consume(on_message)

    async def publish_deferred(self, body: bytes, headers: dict[str, Any]) -> None:
        await self._publish_persistent(EXCHANGE, DEFERRED_KEY, body, headers)

    async def park_deferred(self, body: bytes, reason: str) -> None:
        await self._publish_persistent(DLX, DEFERRED_KEY, body, {"x-embed-error": reason})

    async def _publish_persistent(self, exchange_name: str, key: str, body: bytes, headers: dict[str, Any]) -> None:
        assert self._publish_channel is not None
        exchange = await self._publish_channel.get_exchange(exchange_name, ensure=False)
        message = aio_pika.Message(
            body, content_type="application/json", headers=headers, delivery_mode=aio_pika.DeliveryMode.PERSISTENT
        )
        await exchange.publish(message, routing_key=key)

    async def caller_alive(self, reply_to: str) -> bool:
        """Does this Direct Reply-to queue still have its consumer? A passive declare on a spare channel:
        the broker answers declare-ok while the caller's channel lives and 404 (closing the spare channel,
        hence a channel of its own) once it has gone."""
        assert self._connection is not None
        loop = asyncio.get_running_loop()
        if self._alive_until.get(reply_to, 0.0) > loop.time():
            # A caller sends many requests from one channel: one probe vouches for it for a moment, so a
            # busy caller costs one round trip per CALLER_CHECK_TTL_S, not one per request.
            return True
        async with self._probe_lock:
            try:
                if self._probe_channel is None or self._probe_channel.is_closed:
                    transport = self._connection.transport
                    if transport is None:  # reconnecting: cannot tell
                        return True
                    # A plain aiormq channel, not a robust one: the broker closes it on 404 and we reopen it here.
                    self._probe_channel = await transport.connection.channel()
                channel: Any = self._probe_channel  # aiormq's Channel.rpc sends any method frame
                await channel.rpc(_PassiveDeclare(queue=reply_to, passive=True), timeout=5)
            except aiormq.exceptions.ChannelNotFoundEntity:
                return False
            except Exception as exc:  # cannot tell: assume the caller waits rather than drop its request
                log.debug("caller check for %s inconclusive: %r", reply_to[:60], exc)
                return True
        if len(self._alive_until) > 10_000:
            now = loop.time()
            self._alive_until = {k: t for k, t in self._alive_until.items() if t > now}
        self._alive_until[reply_to] = loop.time() + CALLER_CHECK_TTL_S
        return True

    def _on_reconnect(self, *_: Any) -> None:
        log.warning("reconnected to the broker; unacked deliveries from the old channel will be redelivered")

    async def close(self, timeout: float = 5.0) -> None:
        if self._connection is not None:
            connection, self._connection = self._connection, None
            try:
                await asyncio.wait_for(connection.close(), timeout)
            except (TimeoutError, aiormq.exceptions.AMQPError, OSError) as exc:
                log.warning("broker connection did not close cleanly (%r)", exc)
