"""Where every delivery of every lane is settled: the one file that sends basic.ack and basic.reject.

The core decides (``service.py`` for the RPC lanes, ``deferred/`` for the fire-and-forget lane) and returns a
``ports.Settle`` per delivery; this module applies it:

| Settle       | frames                                                                                   |
|--------------|------------------------------------------------------------------------------------------|
| ACK          | counted; one basic.ack(multiple=true) acks the contiguous prefix of settled deliveries   |
| REQUEUE      | basic.reject(requeue=true) at once, one by one (quorum queues count it, see below)        |
| DEAD_LETTER  | a copy with ``x-embed-error`` into the DLX (confirmed), then counted as ACK; if the copy   |
|              | cannot be published, basic.reject(requeue=false) and the broker dead-letters it            |

Why one frame for many acks is safe (RabbitMQ ``rabbit_channel.erl``, ``collect_acks``): basic.ack(multiple=true,
delivery_tag=N) acks every unacked delivery up to N on that channel, and fails the channel with "unknown delivery
tag" unless N itself is still unacked. So the frame names the highest *acked* tag of the contiguous prefix of
settled tags: never past a delivery still being worked on (its reply may not be confirmed yet), never a tag that
was rejected. Rejects are written before any ack that could cover them (same channel, frames in order).
Tags belong to their channel: a channel that closed takes its unsettled deliveries with it (the broker
redelivers them) and nothing is ever acked on another channel.

Requeues stay ``basic.reject``, never ``basic.nack``: since RabbitMQ 4.3 only reject counts towards a quorum
queue's delivery limit, which is what parks a message that fails every worker.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Sequence

import aiormq

from worker.amqp.delivery import parked_copy
from worker.amqp.seams import ConfirmedPublisher, SettleableDelivery, SettlingChannel
from worker.logs import safe
from worker.metrics import Metrics
from worker.ports import Settle, SettleAction
from worker.topology import DLX

log = logging.getLogger(__name__)

# Acks held back behind one delivery still in progress (a slow retrying batch, a long request): past this many,
# they go out one by one so the prefetch window does not fill with finished work.
STRANDED_LIMIT = 64


class AckTracker:
    """The settled delivery tags of one channel, and how far one multiple ack may reach. Pure bookkeeping."""

    __slots__ = ("_done", "_low", "_waiting")

    def __init__(self) -> None:
        self._low = 1  # AMQP delivery tags start at 1 on every channel; every tag below _low is finished
        self._done: dict[int, bool] = {}  # settled tags >= _low: True = awaits an ack frame, False = gone already
        self._waiting = 0

    def settle(self, tag: int, *, ack: bool) -> None:
        self._done[tag] = ack
        self._waiting += ack

    def advance(self) -> int | None:
        """Move past the contiguous settled prefix; the tag one multiple ack should name for it, or None."""
        target = None
        done = self._done
        while (acked := done.pop(self._low, None)) is not None:
            if acked:
                target = self._low
                self._waiting -= 1
            self._low += 1
        return target

    def stranded(self, limit: int) -> list[int]:
        """When more than ``limit`` acks wait behind an unsettled delivery, hand them out to be sent one by one."""
        if self._waiting <= limit:
            return []
        tags = [tag for tag, acked in self._done.items() if acked]
        for tag in tags:
            self._done[tag] = False
        self._waiting = 0
        return tags


class Settler:
    """Applies ``Settle`` values to deliveries (any ``seams.SettleableDelivery``: ``AmqpDelivery`` on aiormq's
    channel, or on tests/memory.py's), parking copies through a ``seams.ConfirmedPublisher``."""

    def __init__(self, publisher: ConfirmedPublisher, metrics: Metrics, *, stranded_limit: int = STRANDED_LIMIT):
        self._publisher = publisher
        self._metrics = metrics
        self._stranded_limit = stranded_limit
        self._trackers: dict[SettlingChannel, AckTracker] = {}
        self._flush_pending = False
        self._sending: set[asyncio.Task[None]] = set()

    async def apply(self, delivery: SettleableDelivery, settle: Settle, dead_letter_key: str) -> None:
        if settle.action is SettleAction.ACK:
            self._acked(delivery)
        elif settle.action is SettleAction.REQUEUE:
            await self._reject(delivery, requeue=True)
        else:
            await self._dead_letter(delivery, settle, dead_letter_key)

    async def apply_all(self, outcomes: Sequence[tuple[SettleableDelivery, Settle]], dead_letter_key: str) -> None:
        for delivery, settle in outcomes:
            await self.apply(delivery, settle, dead_letter_key)

    # ------------------------------------------------------------------ the three actions
    def _acked(self, delivery: SettleableDelivery) -> None:
        tracker = self._trackers.get(delivery.channel)
        if tracker is None:
            if delivery.channel.is_closed:
                log.info("ack of correlation_id=%s skipped: its channel is closed", safe(delivery.correlation_id))
                return
            tracker = self._trackers[delivery.channel] = AckTracker()
        tracker.settle(delivery.tag, ack=True)
        if not self._flush_pending:  # every settle of this turn of the event loop shares one frame
            self._flush_pending = True
            asyncio.get_running_loop().call_soon(self._flush)

    async def _reject(self, delivery: SettleableDelivery, *, requeue: bool) -> None:
        try:
            await delivery.channel.basic_reject(delivery.tag, requeue=requeue, wait=False)
        except (aiormq.exceptions.AMQPError, RuntimeError) as exc:
            log.info("reject of correlation_id=%s skipped: %r", safe(delivery.correlation_id), exc)
            return
        tracker = self._trackers.setdefault(delivery.channel, AckTracker())
        tracker.settle(delivery.tag, ack=False)  # only now: the reject frame is ahead of any ack covering it
        if not self._flush_pending:
            self._flush_pending = True
            asyncio.get_running_loop().call_soon(self._flush)

    async def _dead_letter(self, delivery: SettleableDelivery, settle: Settle, dead_letter_key: str) -> None:
        self._metrics.dead_lettered.labels(settle.label or "other").inc()
        try:
            await self._publisher.publish(
                delivery.body,
                exchange=DLX,
                routing_key=dead_letter_key,
                properties=parked_copy(delivery, settle.reason),
                mandatory=True,
            )
        except Exception as exc:
            log.warning("could not park a copy with its reason (%r); rejecting it to the dead-letter queue", exc)
            await self._reject(delivery, requeue=False)
            return
        self._acked(delivery)

    # ------------------------------------------------------------------ frames
    def _flush(self) -> None:
        self._flush_pending = False
        for channel, tracker in list(self._trackers.items()):
            if channel.is_closed:
                del self._trackers[channel]
                continue
            target = tracker.advance()
            if target is not None:
                self._send(channel.basic_ack(target, multiple=True, wait=False))
            for tag in tracker.stranded(self._stranded_limit):
                self._send(channel.basic_ack(tag, multiple=False, wait=False))

    def _send(self, frame: Awaitable[None]) -> None:
        task = asyncio.ensure_future(frame)
        self._sending.add(task)
        task.add_done_callback(self._sent)

    def _sent(self, task: asyncio.Task[None]) -> None:
        self._sending.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            # The channel closed under us: the broker redelivers what this frame would have acked.
            log.info("ack frame not sent: %r", exc)

    async def drain(self) -> None:
        """Send what is pending now and wait for it (at shutdown, before the connection closes)."""
        if self._flush_pending:
            self._flush()
        if self._sending:
            await asyncio.gather(*self._sending, return_exceptions=True)
