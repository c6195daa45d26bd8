"""An in-memory broker for unit tests, as faststream's ``TestRabbitBroker`` and dramatiq's ``StubBroker`` are for
theirs. It sits beside the real-broker tests, never instead of them.

The seams are those of ``worker/amqp/seams.py``: ``MemoryChannel`` is a ``SettlingChannel`` and implements the few
other channel methods the worker's AMQP adapters call (basic.consume with a prefetch window, basic.get, a passive
queue.declare); what it hands out is a ``MemoryDelivered`` (a ``seams.Delivered``); ``MemoryPublisher`` is a
``ReopeningPublisher``. So the real ``AmqpDelivery``, ``Settler``, ``RpcReplies``, ``AmqpDeferredQueue`` and
``handle_delivery`` run on top of it, and type-check doing so. Where RabbitMQ has a rule the worker relies on, the
fake keeps it (``tests/cases/settle_cases.py`` runs the same settle cases on this and on RabbitMQ):

- delivery tags count from 1 per channel; basic.ack(multiple=true, N) acks every unacked tag up to N and, as in
  ``rabbit_channel.erl`` ``collect_acks``, an N that is not unacked closes the channel (PRECONDITION_FAILED);
- basic.reject(requeue=true) puts the message back at the head, redelivered, and counts a delivery; a quorum queue
  dead-letters it when that count goes past ``delivery_limit`` (rabbit_fifo: delivery count > limit), so a
  message with ``x-delivery-limit`` N is delivered N + 1 times, then dead-lettered (``x-death`` reason
  ``delivery_limit``); requeue=false dead-letters it (reason ``rejected``); a closed channel requeues what it held;
- publishing routes by the worker's topology; a mandatory publish to nowhere is returned (``ReplyUndeliverable``).
Every frame is recorded in ``MemoryChannel.frames``, so tests can count acks.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from pamqp import commands as spec
from pamqp.header import ContentHeader

from worker import topology
from worker.ports import ReplyUndeliverable


class PreconditionFailed(Exception):
    """What RabbitMQ answers an ack or reject of an unknown delivery tag with: it closes the channel."""


@dataclass
class Message:
    body: bytes
    properties: spec.Basic.Properties
    exchange: str
    routing_key: str
    deliveries: int = 0  # how many times it was handed out and given back (quorum queues count these)


@dataclass(frozen=True)
class MemoryDelivered:
    """What the channel hands out: aiormq's ``DeliveredMessage``, with a memory channel in it (``seams.Delivered``)."""

    delivery: spec.Basic.Deliver | spec.Basic.GetOk | spec.Basic.GetEmpty
    header: ContentHeader
    body: bytes
    channel: MemoryChannel


Callback = Callable[[MemoryDelivered], Awaitable[None]]


@dataclass
class _Consumer:
    queue: str
    callback: Callback
    tasks: set[asyncio.Task[None]] = field(default_factory=set)


class MemoryChannel:
    """The part of aiormq's ``Channel`` that worker/amqp uses."""

    def __init__(self, broker: MemoryBroker, prefetch: int = 0):
        self.broker = broker
        self.prefetch = prefetch  # 0 = unlimited, as in AMQP
        self.is_closed = False
        self.frames: list[tuple[str, int, bool]] = []  # ("ack" | "reject", tag, multiple | requeue)
        self._tags = itertools.count(1)
        self._unacked: dict[int, tuple[str, Message]] = {}  # tag -> (queue, message), in delivery order
        self._consumers: dict[str, _Consumer] = {}

    # ------------------------------------------------------------------ taking messages
    def _deliver(self, queue: str, message: Message, frame: spec.Basic.Deliver | spec.Basic.GetOk) -> MemoryDelivered:
        tag = next(self._tags)
        frame.delivery_tag = tag
        self._unacked[tag] = (queue, message)
        header = ContentHeader(body_size=len(message.body), properties=message.properties)
        return MemoryDelivered(delivery=frame, header=header, body=message.body, channel=self)

    async def basic_get(self, queue: str = "", no_ack: bool = False, timeout: Any = None) -> MemoryDelivered:
        self._check_open()
        waiting = self.broker.queues[queue]
        if not waiting:
            return MemoryDelivered(delivery=spec.Basic.GetEmpty(), header=ContentHeader(), body=b"", channel=self)
        message = waiting.popleft()
        frame = spec.Basic.GetOk(exchange=message.exchange, routing_key=message.routing_key, redelivered=False)
        frame.redelivered = message.deliveries > 0
        return self._deliver(queue, message, frame)

    async def basic_consume(self, queue: str, consumer_callback: Callback, **_: Any) -> spec.Basic.ConsumeOk:
        self._check_open()
        tag = f"memory-{len(self._consumers)}"
        self._consumers[tag] = _Consumer(queue, consumer_callback)
        self.broker.pump()
        return spec.Basic.ConsumeOk(consumer_tag=tag)

    async def basic_cancel(self, consumer_tag: str, **_: Any) -> spec.Basic.CancelOk:
        self._consumers.pop(consumer_tag, None)
        return spec.Basic.CancelOk(consumer_tag=consumer_tag)

    def _pump(self) -> None:
        """Hand out messages to consumers while the prefetch window has room, each in a task, as aiormq does."""
        for consumer in self._consumers.values():
            waiting = self.broker.queues[consumer.queue]
            while waiting and not self.is_closed and (not self.prefetch or len(self._unacked) < self.prefetch):
                message = waiting.popleft()
                frame = spec.Basic.Deliver(
                    consumer_tag="memory", exchange=message.exchange, routing_key=message.routing_key
                )
                frame.redelivered = message.deliveries > 0
                task = asyncio.ensure_future(consumer.callback(self._deliver(consumer.queue, message, frame)))
                consumer.tasks.add(task)
                task.add_done_callback(consumer.tasks.discard)

    async def queue_declare(self, queue: str, passive: bool = False, **_: Any) -> spec.Queue.DeclareOk:
        return spec.Queue.DeclareOk(queue=queue, message_count=len(self.broker.queues[queue]), consumer_count=0)

    # ------------------------------------------------------------------ settling, with RabbitMQ's rules
    async def basic_ack(self, delivery_tag: int, multiple: bool = False, wait: bool = True) -> None:
        self._check_open()
        self.frames.append(("ack", delivery_tag, multiple))
        if delivery_tag not in self._unacked:
            self.close()
            raise PreconditionFailed(f"unknown delivery tag {delivery_tag}")
        tags = [t for t in self._unacked if t <= delivery_tag] if multiple else [delivery_tag]
        for tag in tags:
            del self._unacked[tag]
        self.broker.pump()

    async def basic_reject(self, delivery_tag: int, *, requeue: bool = True, wait: bool = True) -> None:
        self._check_open()
        self.frames.append(("reject", delivery_tag, requeue))
        if delivery_tag not in self._unacked:
            self.close()
            raise PreconditionFailed(f"unknown delivery tag {delivery_tag}")
        queue, message = self._unacked.pop(delivery_tag)
        self.broker.give_back(queue, message, requeue=requeue)
        self.broker.pump()

    def close(self) -> None:
        """The channel dies: the broker requeues everything it held (redelivered)."""
        if self.is_closed:
            return
        self.is_closed = True
        for queue, message in reversed(list(self._unacked.values())):
            message.deliveries += 1
            self.broker.queues[queue].appendleft(message)
        self._unacked.clear()

    def _check_open(self) -> None:
        if self.is_closed:
            raise RuntimeError("channel is closed")

    @property
    def unacked(self) -> int:
        return len(self._unacked)

    async def idle(self) -> None:
        """Until every consumer task handed out so far has finished."""
        while tasks := [t for c in self._consumers.values() for t in c.tasks]:
            await asyncio.gather(*tasks)


# The worker's work queues, as worker/amqp/connection.py declares them: (queue, its routing key, which is also the
# routing key of its dead letters, its dead-letter queue)
ROUTES = (
    (topology.QUEUE, topology.ROUTING_KEY, topology.DLQ),
    (topology.BULK_QUEUE, topology.BULK_KEY, topology.BULK_DLQ),
    (topology.DEFERRED_QUEUE, topology.DEFERRED_KEY, topology.DEFERRED_DLQ),
)


class MemoryBroker:
    def __init__(self, *, queue_type: str = "quorum", delivery_limit: int = 5):
        self.queue_type = queue_type
        self.delivery_limit = delivery_limit
        self.queues: dict[str, deque[Message]] = {name: deque() for queue, _, dlq in ROUTES for name in (queue, dlq)}
        self.replies: dict[str, list[Message]] = {}  # callers' reply queues and what reached them
        self.channels: list[MemoryChannel] = []

    def channel(self, prefetch: int = 0) -> MemoryChannel:
        channel = MemoryChannel(self, prefetch)
        self.channels.append(channel)
        return channel

    def reply_queue(self, name: str) -> list[Message]:
        """A caller's queue (server-named or Direct Reply-to): replies published to it are kept here."""
        return self.replies.setdefault(name, [])

    def pump(self) -> None:
        for channel in self.channels:
            channel._pump()

    # ------------------------------------------------------------------ publishing
    def publish(
        self, body: bytes, *, exchange: str, routing_key: str, properties: spec.Basic.Properties, mandatory: bool
    ) -> None:
        queue = self._route(exchange, routing_key)
        message = Message(body, properties, exchange, routing_key)
        if queue in self.replies:
            self.replies[queue].append(message)
        elif queue is not None:
            self.queues[queue].append(message)
            self.pump()
        elif mandatory:
            raise ReplyUndeliverable(routing_key)

    def _route(self, exchange: str, key: str) -> str | None:
        if exchange == "":
            return key if key in self.queues or key in self.replies else None
        if exchange == topology.EXCHANGE:
            return next((queue for queue, routing_key, _ in ROUTES if routing_key == key), None)
        if exchange == topology.DLX:
            return next((dlq for _, routing_key, dlq in ROUTES if routing_key == key), None)
        return None

    def give_back(self, queue: str, message: Message, *, requeue: bool) -> None:
        message.deliveries += 1
        # rabbit_fifo: dead-lettered once the delivery count is greater than the limit, not when it reaches it
        if requeue and not (self.queue_type == "quorum" and message.deliveries > self.delivery_limit):
            self.queues[queue].appendleft(message)
            return
        reason = "rejected" if not requeue else "delivery_limit"
        self._dead_letter(queue, message, reason)

    def _dead_letter(self, queue: str, message: Message, reason: str) -> None:
        """As the queue's ``x-dead-letter-routing-key`` (its own routing key) takes it to its dead-letter queue."""
        dlq = next(dlq for name, _, dlq in ROUTES if name == queue)
        headers = dict(message.properties.headers or {})
        headers["x-death"] = [{"reason": reason, "queue": queue, "count": 1}]
        message.properties.headers = headers
        self.queues[dlq].append(message)

    # ------------------------------------------------------------------ a caller's side, for tests
    def send(self, body: bytes, **properties: Any) -> None:
        properties.setdefault("content_type", "application/json")
        self.publish(
            body,
            exchange=topology.EXCHANGE,
            routing_key=properties.pop("routing_key", topology.ROUTING_KEY),
            properties=spec.Basic.Properties(**properties),
            mandatory=False,
        )


class MemoryPublisher:
    """``worker.amqp.publish.Publisher`` on the memory broker (a ``seams.ReopeningPublisher``): confirms at once,
    returns what cannot be routed."""

    def __init__(self, broker: MemoryBroker):
        self.broker = broker
        self.fail: Exception | None = None  # set to make every publish fail (a broken channel)

    async def publish(
        self, body: bytes, *, exchange: str, routing_key: str, properties: spec.Basic.Properties, mandatory: bool
    ) -> None:
        if self.fail is not None:
            raise self.fail
        self.broker.publish(
            body, exchange=exchange, routing_key=routing_key, properties=properties, mandatory=mandatory
        )

    generation = 0

    async def reopened_since(self, generation: int, timeout: float) -> bool:
        """A broken memory channel is never reopened: the publish is not tried again."""
        return False
