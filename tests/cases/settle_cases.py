"""The settle cases, written once and run twice: on the memory broker (tests/unit/test_settle_memory.py) and on
RabbitMQ's quorum queues (tests/integration/test_settle_rabbitmq.py), as faststream runs one base suite
(tests/brokers/base/consume.py) against each of its brokers. Every case settles through the real ``Settler.apply``
and checks a rule tests/memory.py claims to keep; passing on both is what makes the fake honest about it.

A runner gives a ``lane`` fixture: a ``SettleLane`` for each way the worker takes deliveries (``LANES``): ``rpc``
consumes them within a prefetch window (``RpcConsumer``), ``deferred`` takes them with basic.get
(``AmqpDeferredQueue``).

What the broker still holds is read by ``left_over``: the lane's channel closes (the broker takes back whatever it
was not told to settle), a sentinel is sent behind, and what comes before the sentinel was left over. A quorum queue
hands out messages given back before the ones waiting, so a delivery the settler failed to ack comes out first.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Protocol

from pamqp.commands import Basic

from worker.amqp.delivery import AmqpDelivery
from worker.amqp.seams import ConfirmedPublisher
from worker.amqp.settle import Settler
from worker.metrics import Metrics
from worker.ports import ACK, REQUEUE, Settle, dead_letter
from worker.topology import ERROR_HEADER

LANES = ("rpc", "deferred")
DELIVERY_LIMIT = 3  # the x-delivery-limit of every queue under test
SENTINEL = b"sentinel"
UNROUTABLE_KEY = "settle-cases.nowhere"  # no queue is bound to the dead-letter exchange with this key


@dataclass(frozen=True)
class Taken:
    delivery: AmqpDelivery
    redelivered: bool

    @property
    def body(self) -> bytes:
        return self.delivery.body


@dataclass(frozen=True)
class Parked:
    """A message that reached the lane's dead-letter queue."""

    body: bytes
    properties: Basic.Properties

    @property
    def headers(self) -> dict[str, Any]:
        return dict(self.properties.headers or {})

    def death(self) -> dict[str, Any]:
        """The one ``x-death`` entry: the broker dead-lettered this message, once."""
        [entry] = self.headers["x-death"]
        return dict(entry)


class SettleLane(Protocol):
    """One lane's queue (``DELIVERY_LIMIT``, dead letters to its dead-letter queue) on one broker, with the real
    ``Settler`` in front of it."""

    queue: str
    dead_letter_key: str  # what the lane gives Settler.apply: routes a parked copy to the lane's dead-letter queue
    settler: Settler

    @property
    def publisher(self) -> ConfirmedPublisher:
        """The one ``settler`` parks copies through."""

    async def send(self, body: bytes, **properties: Any) -> None:
        """Into the lane's queue, confirmed."""

    async def take(self) -> Taken:
        """The next delivery, as the lane takes them; fails if none comes within a few seconds."""

    async def parked(self) -> Parked:
        """The next message of the lane's dead-letter queue; fails if none comes within a few seconds."""

    async def reconnect(self) -> None:
        """The lane's channel closes (the broker takes back what it held unsettled) and a new one takes over."""

    async def channel_open(self) -> bool:
        """A round trip on the lane's channel: False once the broker has closed it."""

    async def ack_frame(self, tag: int) -> None:
        """A basic.ack of ``tag`` sent by hand, not by the settler."""


async def settle(lane: SettleLane, taken: Taken, decision: Settle, settler: Settler | None = None) -> None:
    await (settler or lane.settler).apply(taken.delivery, decision, lane.dead_letter_key)


async def take(lane: SettleLane, n: int) -> list[Taken]:
    return [await lane.take() for _ in range(n)]


async def left_over(lane: SettleLane) -> list[bytes]:
    """What the broker still held for the lane, in the order it hands it out again; all of it acked now."""
    await lane.settler.drain()
    await lane.reconnect()
    await lane.send(SENTINEL)
    left = []
    while (taken := await lane.take()).body != SENTINEL:
        left.append(taken.body)
        await settle(lane, taken, ACK)
    await settle(lane, taken, ACK)
    await lane.settler.drain()
    return left


class SettleCases:
    """Subclasses named ``Test...`` run these, each with a ``lane`` fixture parametrised over ``LANES``."""

    async def test_an_acked_delivery_is_gone_for_good(self, lane: SettleLane) -> None:
        await lane.send(b"a")
        taken = await lane.take()
        assert (taken.body, taken.redelivered) == (b"a", False)
        await settle(lane, taken, ACK)
        await lane.settler.drain()
        assert await lane.channel_open()
        assert await left_over(lane) == []

    async def test_acks_in_any_order_are_exact_and_never_close_the_channel(self, lane: SettleLane) -> None:
        bodies = [str(i).encode() for i in range(6)]
        for body in bodies:
            await lane.send(body)
        taken = await take(lane, len(bodies))
        assert [t.body for t in taken] == bodies
        for n, i in enumerate((3, 0, 5, 1, 4, 2)):
            await settle(lane, taken[i], ACK)
            if n % 2:
                await asyncio.sleep(0)  # one turn of the loop: the settler sends a multiple ack mid-way
        await lane.settler.drain()
        assert await lane.channel_open()  # no ack named a tag that was gone
        assert await left_over(lane) == []

    async def test_acks_behind_an_unsettled_delivery_wait_for_it(self, lane: SettleLane) -> None:
        """An ack that could only go out as multiple=true past ``b`` (still in progress) is held back: when the
        channel goes, ``b`` and ``c`` come back, and nothing ever acked ``b`` unsettled."""
        for body in (b"a", b"b", b"c"):
            await lane.send(body)
        a, _, c = await take(lane, 3)
        await settle(lane, a, ACK)
        await settle(lane, c, ACK)
        await lane.settler.drain()
        assert await lane.channel_open()
        assert sorted(await left_over(lane)) == [b"b", b"c"]

    async def test_acks_stranded_behind_a_slow_delivery_go_out_one_by_one(self, lane: SettleLane) -> None:
        settler = Settler(lane.publisher, Metrics(), stranded_limit=2)
        for i in range(5):
            await lane.send(str(i).encode())
        slow, *rest = await take(lane, 5)
        for taken in rest[:3]:
            await settle(lane, taken, ACK, settler)
        await settler.drain()  # three acks wait behind the slow one, past the limit: sent alone, multiple=false
        assert await lane.channel_open()
        await settle(lane, slow, ACK, settler)  # then one multiple ack for the slow one, naming no tag sent alone
        await settle(lane, rest[3], ACK, settler)
        await settler.drain()
        assert await lane.channel_open()
        assert await left_over(lane) == []

    async def test_a_requeued_delivery_is_delivered_again(self, lane: SettleLane) -> None:
        await lane.send(b"again", correlation_id="r")
        first = await lane.take()
        await settle(lane, first, REQUEUE)
        second = await lane.take()
        assert (first.redelivered, second.redelivered) == (False, True)
        assert (second.body, second.delivery.correlation_id) == (b"again", "r")
        await settle(lane, second, ACK)
        assert await left_over(lane) == []

    async def test_the_delivery_limit_allows_limit_plus_one_deliveries(self, lane: SettleLane) -> None:
        """``x-delivery-limit`` N: the first delivery and N redeliveries (rabbit_fifo dead-letters once the count of
        deliveries given back is greater than N), then the broker dead-letters it, reason ``delivery_limit``."""
        await lane.send(b"crashy", correlation_id="crashy")
        for n in range(DELIVERY_LIMIT + 1):
            taken = await lane.take()
            assert (taken.body, taken.redelivered) == (b"crashy", n > 0)
            await settle(lane, taken, REQUEUE)
        parked = await lane.parked()
        assert (parked.body, parked.properties.correlation_id) == (b"crashy", "crashy")
        death = parked.death()
        assert (death["reason"], death["queue"], death["count"]) == ("delivery_limit", lane.queue, 1)
        assert ERROR_HEADER not in parked.headers
        assert await left_over(lane) == []  # not delivered a time more

    async def test_a_dead_letter_is_parked_as_a_copy_with_its_reason(self, lane: SettleLane) -> None:
        body = b'{"text": "x"}'
        await lane.send(body, correlation_id="p", reply_to="amq.gen-caller", headers={"x-trace": "t-1"})
        taken = await lane.take()
        await settle(lane, taken, dead_letter("test", "why it was parked"))
        parked = await lane.parked()
        assert parked.body == body
        assert parked.headers[ERROR_HEADER] == "why it was parked" and parked.headers["x-trace"] == "t-1"
        assert (parked.properties.correlation_id, parked.properties.reply_to) == ("p", "amq.gen-caller")
        assert parked.properties.delivery_mode == 2
        assert "x-death" not in parked.headers  # a copy the settler published, not a message the broker moved
        assert await left_over(lane) == []  # and the original was acked

    async def test_a_copy_that_cannot_be_parked_is_rejected_to_the_dead_letter_queue(self, lane: SettleLane) -> None:
        await lane.send(b"unparkable", correlation_id="u")
        taken = await lane.take()
        await lane.settler.apply(taken.delivery, dead_letter("test", "why"), UNROUTABLE_KEY)  # the copy is returned
        parked = await lane.parked()
        assert (parked.body, parked.properties.correlation_id) == (b"unparkable", "u")
        assert ERROR_HEADER not in parked.headers
        death = parked.death()
        assert (death["reason"], death["queue"], death["count"]) == ("rejected", lane.queue, 1)
        assert await left_over(lane) == []

    async def test_deliveries_of_a_closed_channel_come_back_and_are_never_acked_elsewhere(
        self, lane: SettleLane
    ) -> None:
        for body in (b"a", b"b"):
            await lane.send(body)
        held = await take(lane, 2)
        await lane.reconnect()  # their channel closes under them: the broker takes them back
        for taken in held:
            await settle(lane, taken, ACK)  # nothing to send these acks on: skipped
        await lane.settler.drain()
        again = await take(lane, 2)
        assert sorted(t.body for t in again) == [b"a", b"b"] and all(t.redelivered for t in again)
        for taken in again:
            await settle(lane, taken, ACK)
        await lane.settler.drain()
        assert await lane.channel_open()
        assert await left_over(lane) == []

    async def test_a_mixed_round_settles_each_delivery_as_decided(self, lane: SettleLane) -> None:
        """Rejects go out one by one ahead of the acks that could cover them; nothing closes the channel."""
        decisions = {
            b"0": ACK,
            b"1": REQUEUE,
            b"2": dead_letter("test", "two"),
            b"3": ACK,
            b"4": REQUEUE,
            b"5": dead_letter("test", "five"),
        }
        for body in decisions:
            await lane.send(body)
        taken = {t.body: t for t in await take(lane, len(decisions))}
        for n, body in enumerate((b"5", b"1", b"2", b"0", b"4", b"3")):
            await settle(lane, taken[body], decisions[body])
            if n % 2:
                await asyncio.sleep(0)  # one turn of the loop: some acks go out mid-way
        await lane.settler.drain()
        assert await lane.channel_open()
        parked = [await lane.parked() for _ in range(2)]
        assert {p.body: p.headers[ERROR_HEADER] for p in parked} == {b"2": "two", b"5": "five"}
        assert sorted(await left_over(lane)) == [b"1", b"4"]

    async def test_an_ack_of_a_tag_that_is_gone_closes_the_channel(self, lane: SettleLane) -> None:
        """What the settler never sends: RabbitMQ answers it with PRECONDITION_FAILED (unknown delivery tag)."""
        await lane.send(b"once")
        taken = await lane.take()
        await settle(lane, taken, ACK)
        await lane.settler.drain()
        assert await lane.channel_open()
        await lane.ack_frame(taken.delivery.tag)
        assert not await lane.channel_open()
