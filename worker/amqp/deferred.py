"""The deferred lane's side of the broker (``ports.DeferredQueue``) and the flush-control listener.

``get`` takes waiting messages with basic.get on a channel of its own, so nothing sits unacked in a consumer's
prefetch window for minutes (RabbitMQ's consumer timeout would close the channel). Settling goes through
``settle.py`` like the RPC lane's.
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
from worker.amqp.publish import Publisher, underlay
from worker.amqp.settle import Settler
from worker.messages import JSON_CONTENT_TYPE
from worker.ports import Delivery, FlushRequest, Settle


class AmqpDeferredQueue:
    def __init__(self, connection: AbstractRobustConnection, settler: Settler, publisher: Publisher):
        self._connection = connection
        self._settler = settler
        self._publisher = publisher
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
        out: list[Delivery] = []
        while len(out) < max_messages:
            message = await channel.basic_get(topology.DEFERRED_QUEUE, no_ack=False)
            if isinstance(message.delivery, spec.Basic.GetEmpty):
                break
            out.append(AmqpDelivery(message))
        return out

    async def depth(self) -> int:
        assert self._channel is not None
        ok = await self._channel.queue_declare(topology.DEFERRED_QUEUE, passive=True)
        return int(ok.message_count or 0)

    async def settle(self, outcomes: Sequence[tuple[Delivery, Settle]]) -> None:
        await self._settler.apply_all(outcomes, topology.DEFERRED_KEY)

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
