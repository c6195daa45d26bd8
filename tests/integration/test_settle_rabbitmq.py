"""The shared settle cases (tests/cases/settle_cases.py) on RabbitMQ; tests/unit/test_settle_memory.py runs the same
cases on the memory broker.

Each test has a quorum queue of its own, declared with the worker's arguments (``topology.queue_arguments``:
``x-delivery-limit``, dead letters to ``embed.requests.dlx`` under the queue's name) and a dead-letter queue bound
there under that name, in one vhost for the module: a vhost costs about two seconds of rabbitmqctl, a queue a few
milliseconds. Deliveries come as the worker takes them, on an aiormq channel; parked copies go through the real
``Publisher``.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import aiormq
import pytest
from aiormq.abc import DeliveredMessage
from pamqp.commands import Basic

from tests.cases.settle_cases import DELIVERY_LIMIT, LANES, Parked, SettleCases, Taken
from worker import topology
from worker.amqp import codec
from worker.amqp.delivery import AmqpDelivery
from worker.amqp.publish import Publisher
from worker.amqp.settle import Settler
from worker.metrics import Metrics

pytestmark = pytest.mark.integration

TIMEOUT = 10.0  # for a delivery, or a dead letter, that should come
PREFETCH = 30
POLL_S = 0.005  # basic.get cannot wait: a requeued message is back in the queue a moment after its reject


class RabbitLane:
    """A ``SettleLane`` on RabbitMQ: ``rpc`` consumes (prefetch ``PREFETCH``), ``deferred`` polls with basic.get."""

    def __init__(self, lane: str, robust: aio_pika.abc.AbstractRobustConnection, amqp: aiormq.abc.AbstractConnection):
        self.consume = lane == "rpc"
        self.queue = self.dead_letter_key = f"settle-cases.{lane}.{uuid.uuid4().hex[:8]}"
        self.dlq = f"{self.queue}.dlq"
        self._robust = robust
        self._amqp = amqp
        self.inbox: asyncio.Queue[Taken] = asyncio.Queue()
        self.dead: asyncio.Queue[Parked] = asyncio.Queue()

    async def open(self) -> None:
        self.publisher = await Publisher.open(self._robust)
        self.settler = Settler(self.publisher, Metrics())
        setup = await self._amqp.channel()
        await setup.exchange_declare(topology.DLX, exchange_type="direct", durable=True)
        await setup.queue_declare(self.dlq, durable=True, arguments={"x-queue-type": "quorum"})
        await setup.queue_bind(self.dlq, topology.DLX, routing_key=self.dead_letter_key)
        arguments = topology.queue_arguments("quorum", DELIVERY_LIMIT, dead_letter_key=self.dead_letter_key)
        await setup.queue_declare(self.queue, durable=True, arguments=arguments)

        async def on_dead(message: DeliveredMessage) -> None:
            self.dead.put_nowait(Parked(message.body, message.header.properties))

        await setup.basic_consume(self.dlq, on_dead, no_ack=True)
        self.channel = await self._open_channel()

    async def _open_channel(self) -> aiormq.abc.AbstractChannel:
        channel = await self._amqp.channel()
        inbox: asyncio.Queue[Taken] = asyncio.Queue()  # what the last channel's consumer got is gone with it
        self.inbox = inbox
        if self.consume:

            async def on_message(message: DeliveredMessage) -> None:
                inbox.put_nowait(taken(message))

            await channel.basic_qos(prefetch_count=PREFETCH)
            await channel.basic_consume(self.queue, on_message)
        return channel

    async def send(self, body: bytes, **properties: Any) -> None:
        properties.setdefault("content_type", "application/json")
        await self.publisher.publish(
            body, exchange="", routing_key=self.queue, properties=Basic.Properties(**properties), mandatory=True
        )

    async def take(self) -> Taken:
        if self.consume:
            return await asyncio.wait_for(self.inbox.get(), TIMEOUT)
        async with asyncio.timeout(TIMEOUT):
            while True:
                message = await self.channel.basic_get(self.queue)
                if not isinstance(message.delivery, Basic.GetEmpty):
                    return taken(message)
                await asyncio.sleep(POLL_S)

    async def parked(self) -> Parked:
        return await asyncio.wait_for(self.dead.get(), TIMEOUT)

    async def reconnect(self) -> None:
        await self.channel.close()
        self.channel = await self._open_channel()

    async def channel_open(self) -> bool:
        try:
            await self.channel.queue_declare(self.queue, passive=True)
        except (aiormq.exceptions.AMQPError, RuntimeError):
            return False
        return True

    async def ack_frame(self, tag: int) -> None:
        await self.channel.basic_ack(tag)

    async def close(self) -> None:
        await self.settler.drain()
        cleanup = await self._amqp.channel()
        for name in (self.queue, self.dlq):
            await cleanup.queue_delete(name)


def taken(message: DeliveredMessage) -> Taken:
    assert isinstance(message.delivery, Basic.Deliver | Basic.GetOk)
    return Taken(AmqpDelivery(message), bool(message.delivery.redelivered))


class TestSettleOnRabbitMQ(SettleCases):
    @pytest.fixture(params=LANES)
    async def lane(self, request: pytest.FixtureRequest, module_vhost: str) -> AsyncIterator[RabbitLane]:
        codec.install()  # as the worker reads deliveries
        robust = await aio_pika.connect_robust(module_vhost)
        amqp = await aiormq.connect(module_vhost)
        try:
            lane = RabbitLane(request.param, robust, amqp)
            await lane.open()
            yield lane
            await lane.close()
        finally:
            await amqp.close()
            await robust.close()
