"""The deferred lane's side of the broker (``ports.DeferredQueue``) and the flush-control listener.

``get`` takes waiting messages with basic.get on a channel of its own, so nothing sits unacked in a consumer's
prefetch window for minutes (RabbitMQ's consumer timeout would close the channel). It stops taking for the round
once its share of the worker's byte budget (``holding.HeldShare``: shared with the RPC lanes, less the room
ingestion leaves to queries) is spent, after one message at least. Settling goes through ``settle.py`` like the
RPC lanes'.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import aiormq
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustChannel, AbstractRobustConnection
from pamqp import commands as spec

from worker import topology
from worker.amqp.delivery import AmqpDelivery
from worker.amqp.publish import underlay
from worker.amqp.seams import ConfirmedPublisher
from worker.amqp.settle import Settler
from worker.holding import HeldShare
from worker.messages import JSON_CONTENT_TYPE
from worker.ports import Delivery, FlushRequest, Settle


class AmqpDeferredQueue:
    def __init__(
        self, connection: AbstractRobustConnection, settler: Settler, publisher: ConfirmedPublisher, held: HeldShare
    ):
        self._connection = connection
        self._settler = settler
        self._publisher = publisher
        self._held = held
        self._taken: dict[int, tuple[AmqpDelivery, int]] = {}  # id of a delivery taken, not settled -> it, its size
        self.cut_short = False
        self._robust: AbstractRobustChannel | None = None
        self._channel: aiormq.Channel | None = None

    async def open(self) -> None:
        self._robust = await self._connection.channel()
        self._robust.reopen_callbacks.add(self._reopened)
        self._channel = await underlay(self._robust)

    async def _reopened(self, _: object) -> None:
        assert self._robust is not None
        self._channel = await underlay(self._robust)

    async def get(self, max_messages: int) -> list[Delivery]:
        assert self._channel is not None
        channel = self._channel
        self._give_back(list(self._taken))  # a new round: whatever the last one did not settle is gone with it
        out: list[Delivery] = []
        self.cut_short = False
        while len(out) < max_messages:
            if out and self._held.spent:
                self.cut_short = True
                break
            message = await channel.basic_get(topology.DEFERRED_QUEUE, no_ack=False)
            if isinstance(message.delivery, spec.Basic.GetEmpty):
                break
            delivery = AmqpDelivery(message)
            self._held.take(len(delivery.body))
            self._taken[id(delivery)] = (delivery, len(delivery.body))
            out.append(delivery)
        return out

    def _give_back(self, ids: Sequence[int]) -> None:
        for key in ids:
            taken = self._taken.pop(key, None)
            if taken is not None:
                self._held.give(taken[1])

    async def depth(self) -> int:
        assert self._channel is not None
        ok = await self._channel.queue_declare(topology.DEFERRED_QUEUE, passive=True)
        return int(ok.message_count or 0)

    async def settle(self, outcomes: Sequence[tuple[Delivery, Settle]]) -> None:
        try:
            await self._settler.apply_all([(self._own(d), s) for d, s in outcomes], topology.DEFERRED_KEY)
        finally:
            self._give_back([id(delivery) for delivery, _ in outcomes])

    def _own(self, delivery: Delivery) -> AmqpDelivery:
        """The ``AmqpDelivery`` behind a delivery the core hands back (it sees only ``ports.Delivery``)."""
        taken = self._taken.get(id(delivery))
        if taken is None or taken[0] is not delivery:
            raise ValueError("settling a delivery this round of get() did not hand out")
        return taken[0]

    async def republish(self, body: bytes, headers: dict[str, Any]) -> None:
        await self._publish(topology.EXCHANGE, body, headers)

    async def park(self, body: bytes, reason: str) -> None:
        await self._publish(topology.DLX, body, {topology.ERROR_HEADER: reason})

    async def _publish(self, exchange: str, body: bytes, headers: dict[str, Any]) -> None:
        properties = spec.Basic.Properties(content_type=JSON_CONTENT_TYPE, headers=headers, delivery_mode=2)
        await self._publisher.publish(
            body, exchange=exchange, routing_key=topology.DEFERRED_KEY, properties=properties, mandatory=False
        )

    async def listen_for_flush(self, on_flush: Callable[[FlushRequest], None]) -> None:
        """A private queue per worker bound to ``embed.deferred.flush``: every worker hears it. Consumed without
        acks: a flush request is a nudge, not work to keep.

        Named ``embed.deferred.flush.<host>.<pid>.<random>`` (not server-named) so that a worker user whose
        permissions cover only ``embed.*`` may declare it."""
        channel = await self._connection.channel()
        name = f"{topology.FLUSH_KEY}.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        queue = await channel.declare_queue(name, exclusive=True, auto_delete=True)
        await queue.bind(topology.EXCHANGE, routing_key=topology.FLUSH_KEY)

        async def on_message(message: AbstractIncomingMessage) -> None:
            on_flush(FlushRequest(message.reply_to, message.correlation_id))

        await queue.consume(on_message, no_ack=True)
