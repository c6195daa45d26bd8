"""Publishing with publisher confirms, on one channel of its own (a publish problem never closes the consumer).

Publishes go straight to aiormq's channel: ``basic_publish(wait=False)`` queues the frames without waiting
for the socket to drain, and the caller awaits only the broker's confirm. Many replies published in one turn
of the event loop therefore leave together and are confirmed together (RabbitMQ confirms with multiple=true
when it can).

What the broker answers, and what it becomes here:
- ``basic.ack``: published. ``basic.return`` (mandatory, no queue): ``ReplyUndeliverable``.
- ``basic.nack``: ``ReplyRefused`` (a queue with ``x-overflow: reject-publish`` that is full, or one that could
  not take it): final, a second try would be refused the same way.
- 406 PRECONDITION_FAILED naming this message's size (RabbitMQ 4.x ``max_message_size``, 16 MiB by default):
  ``ReplyTooLarge``. The broker closes the channel for it, and fails every confirm still pending on the channel
  with the same error; the size in its text says which publish it was, and the others get aiormq's error, as for
  any channel that is lost.
"""

from __future__ import annotations

import asyncio
import re
from typing import cast

import aio_pika
import aiormq
from aio_pika.abc import AbstractRobustChannel, AbstractRobustConnection
from pamqp.commands import Basic

from worker.ports import ReplyRefused, ReplyTooLarge, ReplyUndeliverable

# RabbitMQ's text for it (rabbit_channel.erl, check_msg_size): "message size 39845123 is larger than configured
# max size 16777216".
_TOO_LARGE = re.compile(r"message size (\d+) is larger than (?:configured )?max size (\d+)")

# What a publish meets when its channel or connection is gone (closed by the broker, or lost): worth another try
# once the robust connection has reopened the channel.
LOST = (
    aiormq.exceptions.AMQPConnectionError,
    aiormq.exceptions.ChannelClosed,
    aiormq.exceptions.ChannelInvalidStateError,
)


async def underlay(channel: AbstractRobustChannel) -> aiormq.Channel:
    """The aiormq channel behind a robust channel, now. The base class's method: the robust one first waits for
    the connection to be ready, which never happens inside the channel's own reopen callbacks."""
    return cast(aiormq.Channel, await aio_pika.Channel.get_underlay_channel(cast(aio_pika.Channel, channel)))


class Publisher:
    """``seams.ReopeningPublisher`` on a robust channel with publisher confirms."""

    def __init__(self, robust: AbstractRobustChannel, channel: aiormq.Channel):
        self._robust = robust
        self._channel = channel
        self._reopened_event = asyncio.Event()
        self.generation = 0  # how many times the channel was reopened
        robust.reopen_callbacks.add(self._reopened)

    @classmethod
    async def open(cls, connection: AbstractRobustConnection) -> Publisher:
        robust = await connection.channel(publisher_confirms=True)
        return cls(robust, await underlay(robust))

    async def _reopened(self, _: object) -> None:
        self._channel = await underlay(self._robust)
        self.generation += 1
        self._reopened_event.set()

    async def reopened_since(self, generation: int, timeout: float) -> bool:
        """Wait until the channel has been reopened after ``generation`` (the robust connection does it after a
        loss); False if not within ``timeout``."""
        try:
            async with asyncio.timeout(timeout):
                while self.generation == generation:
                    self._reopened_event.clear()
                    await self._reopened_event.wait()
        except TimeoutError:
            return False
        return True

    async def publish(
        self, body: bytes, *, exchange: str, routing_key: str, properties: Basic.Properties, mandatory: bool
    ) -> None:
        """Returns once the broker has confirmed; raises as the module docstring says, or aiormq's errors (``LOST``)
        if the channel or connection is gone."""
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
        except aiormq.exceptions.DeliveryError as exc:  # basic.nack
            raise ReplyRefused(
                "the broker refused the message (basic.nack): its queue is full or cannot take it"
            ) from exc
        except aiormq.exceptions.ChannelPreconditionFailed as exc:
            match = _TOO_LARGE.search(str(exc))
            if match is not None and int(match.group(1)) == len(body):
                raise ReplyTooLarge(len(body), int(match.group(2))) from exc
            raise
        if not isinstance(result, Basic.Ack):  # a returned message resolves the confirm with the message itself
            raise ReplyUndeliverable(routing_key)

    async def close(self) -> None:
        await self._robust.close()
