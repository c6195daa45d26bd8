"""The settle table applied: ``worker.amqp.settle`` on the in-memory broker, which keeps RabbitMQ's ack rules."""

from __future__ import annotations

import asyncio

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.memory import MemoryBroker, MemoryChannel, MemoryPublisher
from worker import topology
from worker.amqp.delivery import AmqpDelivery
from worker.amqp.settle import AckTracker, Settler
from worker.metrics import Metrics
from worker.ports import ACK, REQUEUE, Settle, dead_letter


async def take(channel: MemoryChannel, n: int) -> list[AmqpDelivery]:
    return [AmqpDelivery(await channel.basic_get(topology.QUEUE)) for _ in range(n)]


def test_tracker_names_the_highest_acked_tag_of_the_contiguous_prefix() -> None:
    tracker = AckTracker()
    tracker.settle(2, ack=True)
    assert tracker.advance() is None  # 1 is still being worked on
    tracker.settle(1, ack=True)
    tracker.settle(3, ack=False)  # rejected: gone from the broker, must never be named
    assert tracker.advance() == 2
    tracker.settle(5, ack=True)
    tracker.settle(4, ack=False)
    assert tracker.advance() == 5
    assert tracker.advance() is None


def test_acks_stranded_behind_a_slow_delivery_go_out_one_by_one() -> None:
    tracker = AckTracker()
    for tag in range(2, 10):
        tracker.settle(tag, ack=True)
    assert tracker.stranded(limit=10) == []
    assert tracker.stranded(limit=4) == list(range(2, 10))
    tracker.settle(1, ack=True)
    assert tracker.advance() == 1  # the ones sent alone are not named again


@settings(max_examples=200, deadline=None)
@given(
    order=st.permutations(list(range(30))),
    kinds=st.lists(st.sampled_from(["ack", "ack", "ack", "requeue", "dead"]), min_size=30, max_size=30),
    flush_every=st.integers(1, 8),
)
def test_any_settle_order_is_applied_exactly_and_never_breaks_the_channel(
    order: list[int], kinds: list[str], flush_every: int
) -> None:
    """The broker closes the channel on a bad multiple ack; here it must stay open and settle each message once,
    as decided, whatever order the deliveries finish in."""

    async def run() -> None:
        broker = MemoryBroker(delivery_limit=100)
        for i in range(30):
            broker.send(orjson.dumps({"i": i}), correlation_id=str(i), reply_to="amq.gen-x")
        channel = broker.channel()
        deliveries = await take(channel, 30)
        settler = Settler(MemoryPublisher(broker), Metrics())
        decisions = {"ack": ACK, "requeue": REQUEUE, "dead": dead_letter("test", "why")}
        for n, i in enumerate(order):
            await settler.apply(deliveries[i], decisions[kinds[i]], topology.QUEUE)
            if n % flush_every == 0:
                await asyncio.sleep(0)  # let a flush happen mid-way, sometimes
        await settler.drain()
        assert not channel.is_closed and channel.unacked == 0
        requeued = {orjson.loads(m.body)["i"] for m in broker.queues[topology.QUEUE]}
        parked = {orjson.loads(m.body)["i"] for m in broker.queues[topology.DLQ]}
        assert requeued == {i for i, k in enumerate(kinds) if k == "requeue"}
        assert parked == {i for i, k in enumerate(kinds) if k == "dead"}
        assert all(m.properties.headers["x-embed-error"] == "why" for m in broker.queues[topology.DLQ])

    asyncio.run(run())


async def test_a_batch_of_acks_is_one_frame_and_requeues_are_single_rejects() -> None:
    broker = MemoryBroker()
    for i in range(100):
        broker.send(b"{}", correlation_id=str(i), reply_to="amq.gen-x")
    channel = broker.channel()
    deliveries = await take(channel, 100)
    settler = Settler(MemoryPublisher(broker), Metrics())
    settles: list[Settle] = [REQUEUE if i in (10, 50) else ACK for i in range(100)]
    await asyncio.gather(*(settler.apply(d, s, topology.QUEUE) for d, s in zip(deliveries, settles, strict=True)))
    await settler.drain()
    assert channel.frames == [("reject", 11, True), ("reject", 51, True), ("ack", 100, True)]
    # basic.reject, never nack: since RabbitMQ 4.3 only reject counts towards a quorum delivery limit
    assert all(kind in ("ack", "reject") for kind, _, _ in channel.frames)


async def test_a_dead_letter_that_cannot_be_parked_is_rejected_to_the_broker_dead_letter_exchange() -> None:
    broker = MemoryBroker()
    broker.send(b"{}", correlation_id="x", reply_to="amq.gen-x")
    channel = broker.channel()
    [delivery] = await take(channel, 1)
    publisher = MemoryPublisher(broker)
    publisher.fail = RuntimeError("confirm channel gone")
    await Settler(publisher, Metrics()).apply(delivery, dead_letter("t", "why"), topology.QUEUE)
    assert channel.frames == [("reject", 1, False)]
    [parked] = broker.queues[topology.DLQ]
    assert parked.properties.headers["x-death"][0]["reason"] == "rejected"


async def test_deliveries_of_a_closed_channel_are_never_acked_elsewhere() -> None:
    broker = MemoryBroker()
    for i in range(3):
        broker.send(b"{}", correlation_id=str(i), reply_to="amq.gen-x")
    old = broker.channel()
    deliveries = await take(old, 3)
    old.close()  # a reconnect: the broker has requeued them
    settler = Settler(MemoryPublisher(broker), Metrics())
    for delivery in deliveries:
        await settler.apply(delivery, ACK, topology.QUEUE)
    await settler.drain()
    assert old.frames == [] and len(broker.queues[topology.QUEUE]) == 3
