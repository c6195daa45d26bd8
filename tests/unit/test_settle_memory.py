"""The shared settle cases (tests/cases/settle_cases.py) on the memory broker; tests/integration/
test_settle_rabbitmq.py runs the same cases on RabbitMQ."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pamqp.commands import Basic

from tests.cases.settle_cases import DELIVERY_LIMIT, LANES, Parked, SettleCases, Taken
from tests.memory import MemoryBroker, MemoryDelivered, MemoryPublisher, PreconditionFailed
from worker import topology
from worker.amqp.delivery import AmqpDelivery
from worker.amqp.settle import Settler
from worker.metrics import Metrics

TIMEOUT = 1.0  # the memory broker hands a delivery to its consumer within a turn or two of the loop
PREFETCH = 30

# lane -> (its queue, the routing key of its messages and of its dead letters, its dead-letter queue)
QUEUES = {
    "rpc": (topology.QUEUE, topology.ROUTING_KEY, topology.DLQ),
    "deferred": (topology.DEFERRED_QUEUE, topology.DEFERRED_KEY, topology.DEFERRED_DLQ),
}


class MemoryLane:
    """A ``SettleLane`` on the memory broker: the worker's own queues, with ``DELIVERY_LIMIT``."""

    def __init__(self, lane: str):
        self.consume = lane == "rpc"
        self.queue, self.dead_letter_key, self.dlq = QUEUES[lane]
        self.broker = MemoryBroker(delivery_limit=DELIVERY_LIMIT)
        self.publisher = MemoryPublisher(self.broker)
        self.settler = Settler(self.publisher, Metrics())
        self.channel = self.broker.channel(prefetch=PREFETCH)
        self.inbox: asyncio.Queue[Taken] = asyncio.Queue()

    async def open(self) -> None:
        inbox: asyncio.Queue[Taken] = asyncio.Queue()  # what the last channel's consumer got is gone with it
        self.inbox = inbox
        if self.consume:

            async def on_message(message: MemoryDelivered) -> None:
                inbox.put_nowait(taken(message))

            await self.channel.basic_consume(self.queue, on_message)

    async def send(self, body: bytes, **properties: Any) -> None:
        properties.setdefault("content_type", "application/json")
        await self.publisher.publish(
            body,
            exchange=topology.EXCHANGE,
            routing_key=self.dead_letter_key,  # each lane's routing key is also its dead letters' key
            properties=Basic.Properties(**properties),
            mandatory=True,
        )

    async def take(self) -> Taken:
        if self.consume:
            return await asyncio.wait_for(self.inbox.get(), TIMEOUT)
        message = await self.channel.basic_get(self.queue)
        if isinstance(message.delivery, Basic.GetEmpty):
            pytest.fail(f"nothing to take from {self.queue}")
        return taken(message)

    async def parked(self) -> Parked:
        waiting = self.broker.queues[self.dlq]
        if not waiting:
            pytest.fail(f"nothing in {self.dlq}")
        message = waiting.popleft()
        return Parked(message.body, message.properties)

    async def reconnect(self) -> None:
        self.channel.close()
        self.channel = self.broker.channel(prefetch=PREFETCH)
        await self.open()

    async def channel_open(self) -> bool:
        return not self.channel.is_closed

    async def ack_frame(self, tag: int) -> None:
        with contextlib.suppress(PreconditionFailed):  # and the channel is closed, as RabbitMQ closes it
            await self.channel.basic_ack(tag)


def taken(message: MemoryDelivered) -> Taken:
    assert not isinstance(message.delivery, Basic.GetEmpty)
    return Taken(AmqpDelivery(message), bool(message.delivery.redelivered))


class TestSettleOnMemory(SettleCases):
    @pytest.fixture(params=LANES)
    async def lane(self, request: pytest.FixtureRequest) -> AsyncIterator[MemoryLane]:
        lane = MemoryLane(request.param)
        await lane.open()
        yield lane
        await lane.settler.drain()
