"""The RPC lanes' consumer: take one lane's deliveries (``embed.requests`` or ``embed.requests.bulk``) within a
window of messages and of bytes.

Each lane has a consumer of its own, on a channel of its own, with its own prefetch count; both draw on one byte
budget, of which bulk leaves a part to the default lane (``HeldBytes.share``), so ingestion's deliveries never
fill the worker so that no query can be taken.

``RpcConsumer`` consumes on aiormq's channel directly (``basic_consume``): each delivery becomes an
``AmqpDelivery``, goes to the service, and the ``Settle`` it returns goes to ``settle.py``. It alone owns whether
we consume: ``pause``/``resume`` (the circuit breaker's calls) only state what is wanted, and one task makes the
broker agree, retrying with back-off when that fails; ``ready`` is true only while the two agree. After a
reconnect the robust channel is reopened and the same task consumes again on it.

Replies go out through ``replies.RpcReplies``, on a connection of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import aiormq
from aio_pika.abc import AbstractRobustChannel, AbstractRobustConnection
from aiormq.abc import DeliveredMessage

from worker import topology, tracing
from worker.amqp.delivery import AmqpDelivery
from worker.amqp.publish import underlay
from worker.amqp.seams import Delivered
from worker.amqp.settle import Settler
from worker.backoff import Backoff
from worker.holding import HeldShare
from worker.lanes import Lane, LaneConfig
from worker.logs import safe
from worker.ports import REQUEUE, Delivery, Settle

log = logging.getLogger(__name__)

Handler = Callable[[Delivery], Awaitable[Settle]]

# Each RPC lane's queue, and the routing key its dead letters (and parked copies) take to its own DLQ.
QUEUES = {Lane.DEFAULT: (topology.QUEUE, topology.ROUTING_KEY), Lane.BULK: (topology.BULK_QUEUE, topology.BULK_KEY)}


async def handle_delivery(
    message: Delivered, handle: Handler, settler: Settler, dead_letter_key: str = topology.ROUTING_KEY
) -> None:
    """One delivery of an RPC lane: the service decides, the settler applies. Every delivery is settled: an
    unexpected error requeues it (and the quorum delivery limit parks it if it keeps failing)."""
    delivery = AmqpDelivery(message)
    try:
        settle = await handle(delivery)
    except Exception:
        log.exception("unhandled error handling correlation_id=%s", safe(delivery.correlation_id))
        settle = REQUEUE
    await settler.apply(delivery, settle, dead_letter_key)


class RpcConsumer:
    """Consumes one lane's queue within two windows: the lane's prefetch, in messages, and the bytes ``held``
    allows.

    The broker takes a count per consumer, fixed at basic.consume, so the byte budget is kept by choosing that count
    (``HeldBytes.credit``) and, when it no longer fits, by cancelling the consumer and consuming again with another
    one. Deliveries of a cancelled consumer stay ours to settle on the same channel; every decision to consume, stop
    or resize is taken by ``_target`` and carried out by the one reconciling task."""

    def __init__(
        self,
        connection: AbstractRobustConnection,
        lane: LaneConfig,
        settler: Settler,
        handle: Handler,
        held: HeldShare,
    ):
        self._connection = connection
        self.lane = lane.lane
        self._queue, self._dead_letter_key = QUEUES[lane.lane]
        self._prefetch = lane.prefetch
        self._settler = settler
        self._handle = handle
        self._held = held
        self._robust: AbstractRobustChannel | None = None
        self._channel: aiormq.Channel | None = None
        self._consumer_tag: str | None = None
        self._granted = 0  # the prefetch count of the current consumer
        self._unsettled: dict[str, int] = {}  # consumer tag -> its deliveries not settled yet
        self._want = False  # should we be consuming? (pause/resume say; stop says no, for good)
        self._stopping = False
        self._changed = asyncio.Event()
        self._reconciler: asyncio.Task[None] | None = None
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def start(self) -> None:
        self._robust = await self._connection.channel()
        self._robust.reopen_callbacks.add(self._reopened)
        self._channel = await underlay(self._robust)
        self._want = True
        await self._consume(self._target() or 1)  # the first time in the open: a start-up failure is raised
        self._reconciler = asyncio.create_task(self._reconcile())
        log.info(
            "consuming from %s (prefetch %d, holding at most %d bytes)",
            self._queue,
            self._prefetch,
            self._held.limit,
        )

    # ------------------------------------------------------------------ deliveries
    async def _on_message(self, message: DeliveredMessage) -> None:
        size = len(message.body)
        tag = getattr(message.delivery, "consumer_tag", None) or ""
        self._inflight += 1
        self._idle.clear()
        self._unsettled[tag] = self._unsettled.get(tag, 0) + 1
        self._held.take(size)
        self._check()
        try:
            with tracing.request_span(message, self._queue):  # delivery to settle; a no-op while tracing is off
                await handle_delivery(message, self._handle, self._settler, self._dead_letter_key)
        finally:
            self._held.give(size)
            left = self._unsettled.get(tag, 0) - 1  # a reconnect may have forgotten the tag
            if left > 0:
                self._unsettled[tag] = left
            else:
                self._unsettled.pop(tag, None)
            self._inflight -= 1
            if not self._inflight:
                self._idle.set()
            self._check()

    def _check(self) -> None:
        if not self._changed.is_set() and self._target() is not None:
            self._changed.set()

    @property
    def inflight(self) -> int:
        return self._inflight

    async def wait_idle(self) -> None:
        await self._idle.wait()

    # ------------------------------------------------------------------ consuming or not: one owner
    def pause(self) -> None:
        """Stop taking new deliveries for now (the upstream is failing); those in hand carry on."""
        self._want = False
        self._changed.set()

    def resume(self) -> None:
        if not self._stopping:
            self._want = True
            self._changed.set()

    @property
    def paused(self) -> bool:
        return not self._want and not self._stopping

    @property
    def ready(self) -> bool:
        """Connected, and consuming exactly when we want to (a breaker pause, or a spent byte budget, counts: both
        end by themselves)."""
        connected = self._channel is not None and not self._channel.is_closed and not self._connection.is_closed
        return connected and not self._stopping and self._target() is None

    def _target(self) -> int | None:
        """What the consumer should become now: None to stay as it is, 0 to stop, n to consume with a count of n."""
        consuming = self._consumer_tag is not None
        if not self._want:
            return 0 if consuming else None
        room = self._prefetch - self._inflight
        if not consuming:
            credit = min(self._held.credit(room), self._prefetch)
            return credit or None  # nothing affordable: wait for a settle
        if self._held.spent:
            return 0
        outstanding = self._unsettled.get(self._consumer_tag or "", 0)
        estimate = self._held.estimate()
        if (self._granted - outstanding - 1) * estimate > self._held.limit - self._held.held:
            return self._held.credit(room)  # granted more than the bytes can take: shrink
        if outstanding >= self._granted and self._granted < self._prefetch:
            grown = min(self._held.credit(room), 2 * self._granted)  # all of it in hand: grow, twofold at most
            return grown if grown > self._granted else None
        return None

    async def _reopened(self, _: object) -> None:
        """The robust connection reopened our channel on a new connection: no consumer there yet."""
        assert self._robust is not None
        self._channel = await underlay(self._robust)
        self._consumer_tag = None
        self._unsettled.clear()  # the old channel's deliveries are the broker's again
        log.warning("reconnected to the broker; unacked deliveries from the old channel will be redelivered")
        self._changed.set()

    async def _reconcile(self) -> None:
        backoff = Backoff(base=0.2, cap=10.0)
        failures = 0
        while True:
            await self._changed.wait()
            self._changed.clear()
            target = self._target()
            try:
                if target is not None:
                    await self._cancel()
                    if target:
                        await self._consume(target)
                failures = 0
            except Exception as exc:  # not consuming as wanted: /readyz says so until a retry works
                failures += 1
                delay = backoff.delay(failures)
                log.warning("could not %s (%r); retrying in %.1fs", "consume" if self._want else "pause", exc, delay)
                await asyncio.sleep(delay)
                self._changed.set()

    async def _consume(self, credit: int) -> None:
        assert self._channel is not None
        await self._channel.basic_qos(prefetch_count=credit)  # per consumer: quorum queues refuse global QoS
        ok = await self._channel.basic_consume(self._queue, self._on_message)
        self._consumer_tag, self._granted = ok.consumer_tag, credit

    async def _cancel(self) -> None:
        """basic.cancel: the broker stops sending; deliveries already here are still ours to settle."""
        tag, self._consumer_tag = self._consumer_tag, None
        if tag is not None and self._channel is not None and not self._channel.is_closed:
            await self._channel.basic_cancel(tag)

    async def stop(self) -> None:
        """For shutdown: cancel the consumer and never resume."""
        self._stopping = True
        self._want = False
        if self._reconciler is not None:
            self._reconciler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reconciler
        try:
            await self._cancel()
        except Exception as exc:
            log.info("consumer cancel failed (%r); closing the channel will stop it", exc)
