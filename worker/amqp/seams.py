"""The seams inside ``worker/amqp``: what the settler, the reply publisher and the deferred queue need from a
publisher and from a delivery, as protocols.

The real adapters satisfy them (``publish.Publisher``; aiormq's channel and ``DeliveredMessage``, through
``delivery.AmqpDelivery``), and so do the test doubles of ``tests/memory.py``, structurally, with no
``type: ignore``: as httpx's ``MockTransport`` is a transport. ``tests/cases/settle_cases.py`` runs one set of
cases through ``Settler.apply`` on both, so that what the fake claims is what RabbitMQ does.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Protocol

from pamqp.commands import Basic
from pamqp.header import ContentHeader


class ConfirmedPublisher(Protocol):
    """Publishes and returns once the broker has confirmed (what the settler and the deferred queue call)."""

    async def publish(
        self, body: bytes, *, exchange: str, routing_key: str, properties: Basic.Properties, mandatory: bool
    ) -> None:
        """Raises ``ReplyUndeliverable`` (returned), ``ReplyRefused`` (nacked), ``ReplyTooLarge``, or the broker
        client's errors when the channel or connection is gone."""


class ReopeningPublisher(ConfirmedPublisher, Protocol):
    """A confirmed publisher whose channel the robust connection reopens after a loss (what ``RpcReplies`` needs to
    send a reply again, alone)."""

    @property
    def generation(self) -> int:
        """How many times the channel has been reopened."""

    async def reopened_since(self, generation: int, timeout: float) -> bool:
        """True once the channel has been reopened after ``generation``; False if not within ``timeout``."""


class SettlingChannel(Protocol):
    """The part of a channel that settles deliveries (aiormq's ``AbstractChannel`` has it). Hashable: the settler
    keeps one ack tracker per channel."""

    @property
    def is_closed(self) -> bool: ...

    def basic_ack(self, delivery_tag: int, multiple: bool = False, wait: bool = True) -> Awaitable[None]: ...

    def basic_reject(self, delivery_tag: int, *, requeue: bool = True, wait: bool = True) -> Awaitable[None]: ...


class Delivered(Protocol):
    """A message as the broker client hands it over (aiormq's ``DeliveredMessage``), the channel it came on
    included: what ``AmqpDelivery`` is built from."""

    @property
    def delivery(self) -> Basic.Deliver | Basic.Return | Basic.GetOk | Basic.GetEmpty: ...

    @property
    def header(self) -> ContentHeader: ...

    @property
    def body(self) -> bytes: ...

    @property
    def channel(self) -> SettlingChannel: ...


class SettleableDelivery(Protocol):
    """What the settler needs from a delivery: its tag on the channel it came on, and what a parked copy of it
    carries (``delivery.parked_copy``)."""

    @property
    def tag(self) -> int: ...

    @property
    def channel(self) -> SettlingChannel: ...

    @property
    def body(self) -> bytes: ...

    @property
    def properties(self) -> Basic.Properties: ...

    @property
    def correlation_id(self) -> str | None: ...
