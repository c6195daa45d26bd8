"""Publishing with publisher confirms, on one channel of its own (a publish problem never closes the consumer).

Publishes go straight to aiormq's channel: ``basic_publish(wait=False)`` queues the frames without waiting
for the socket to drain, and the caller awaits only the broker's confirm. Many replies published in one turn
of the event loop therefore leave together and are confirmed together (RabbitMQ confirms with multiple=true
when it can).
"""

from __future__ import annotations

from typing import cast

import aio_pika
import aiormq
from aio_pika.abc import AbstractRobustChannel, AbstractRobustConnection
from pamqp.commands import Basic

from worker.ports import ReplyUndeliverable


async def underlay(channel: AbstractRobustChannel) -> aiormq.Channel:
    """The aiormq channel behind a robust channel, now. The base class's method: the robust one first waits for
    the connection to be ready, which never happens inside the channel's own reopen callbacks."""
    return cast(aiormq.Channel, await aio_pika.Channel.get_underlay_channel(cast(aio_pika.Channel, channel)))


class Publisher:
    def __init__(self, robust: AbstractRobustChannel, channel: aiormq.Channel):
        self._robust = robust
        self._channel = channel
        robust.reopen_callbacks.add(self._reopened)

    @classmethod
    async def open(cls, connection: AbstractRobustConnection) -> Publisher:
        robust = await connection.channel(publisher_confirms=True)
        return cls(robust, await underlay(robust))

    async def _reopened(self, _: object) -> None:
        self._channel = await underlay(self._robust)

    async def publish(
        self, body: bytes, *, exchange: str, routing_key: str, properties: Basic.Properties, mandatory: bool
    ) -> None:
        """Returns once the broker has confirmed; raises ReplyUndeliverable if it returned the message
        (mandatory, no queue bound), aiormq's errors if the channel is gone or the broker refused it."""
        try:
            result = await self._channel.basic_publish(
                body,
                exchange=exchange,
                routing_key=routing_key,
                properties=properties,
                mandatory=mandatory,
                wait=False,
            )
        except aiormq.exceptions.PublishError as exc:
            raise ReplyUndeliverable(routing_key) from exc
        if not isinstance(result, Basic.Ack):  # a returned message resolves the confirm with the message itself
            raise ReplyUndeliverable(routing_key)

    async def close(self) -> None:
        await self._robust.close()
