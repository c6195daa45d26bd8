"""When the deferred lane drains, and what a flush request is told.

The lane wakes on its flush interval, on a flush request, or when a poll finds ``wake_depth`` messages waiting;
then it drains round after round until the queue is empty, hands each round's ``Settle`` values to the queue,
and answers the flush requests that woke it (``{"flushed": N}`` or an error reply). A round that fails pauses the
lane with back-off; a Redis outage pauses it until Redis answers. Waits end early on SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Awaitable, Callable

from worker.backoff import Backoff
from worker.errors import EmbedError, ErrorCode
from worker.messages import Reply, RequestLimits, encode_error, encode_flush_reply
from worker.ports import REQUEUE, DeferredQueue, Delivery, FlushRequest, ReplyPublisher, StoreUnavailable, VectorStore

from . import DeferredConfig
from .jobs import JobRounds, attempts
from .rounds import RoundResult, SyncRounds, decode_round

log = logging.getLogger(__name__)


class DeferredLane:
    def __init__(
        self,
        queue: DeferredQueue,
        store: VectorStore,
        rounds: SyncRounds,
        replies: ReplyPublisher,
        *,
        limits: RequestLimits,
        config: DeferredConfig,
        reply_to: re.Pattern[str],
        jobs: JobRounds | None = None,
    ):
        self._queue = queue
        self._store = store
        self._rounds = rounds
        self._jobs = jobs
        self._replies = replies
        self._limits = limits
        self._reply_to = reply_to
        self.config = config
        self.wake = asyncio.Event()
        self._flush_waiters: list[FlushRequest] = []
        self._backoff = Backoff(base=0.5, cap=60.0)

    # ------------------------------------------------------------------ scheduling
    def request_flush(self, request: FlushRequest | None = None) -> None:
        """Drain now (control message or ``embed-worker flush``); answer ``request`` when done."""
        if request is not None:
            self._flush_waiters.append(request)
        self.wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        poller = asyncio.create_task(self._poll_jobs(stop)) if self._jobs is not None else None
        try:
            await self._run(stop)
        finally:
            if poller is not None:
                poller.cancel()

    async def _run(self, stop: asyncio.Event) -> None:
        failures = 0
        while not stop.is_set():
            await self._wait_for_work(stop)
            if stop.is_set():
                break
            self.wake.clear()
            waiters, self._flush_waiters = self._flush_waiters, []
            try:
                written = await self.drain()
            except Exception as exc:  # StoreUnavailable, or e.g. the broker channel went away mid-round
                failures += 1
                delay = self._backoff.delay(failures)
                code = ErrorCode.STORE_UNAVAILABLE if isinstance(exc, StoreUnavailable) else ErrorCode.INTERNAL
                if isinstance(exc, StoreUnavailable):
                    log.warning("deferred lane paused: %s; retrying in %.1fs", exc, delay)
                else:
                    log.exception("deferred round failed; retrying in %.1fs", delay)
                message = str(exc) if isinstance(exc, StoreUnavailable) else type(exc).__name__
                await self._answer(waiters, encode_error(EmbedError(message, replayable=True, code=code)))
                await _sleep_or_stop(stop, delay)
                if isinstance(exc, StoreUnavailable):
                    await self._until(stop, self._store.ping, every=delay)
                self.wake.set()  # go again at once: the work is back in the queue
                continue
            failures = 0
            await self._answer(waiters, encode_flush_reply(written))

    async def _wait_for_work(self, stop: asyncio.Event) -> None:
        """Until the interval passes, a flush request comes, a poll finds enough waiting, or we stop."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.flush_interval_s
        while not (stop.is_set() or self.wake.is_set()) and loop.time() < deadline:
            try:
                await asyncio.wait_for(_first(self.wake, stop), min(self.config.poll_s, deadline - loop.time()))
            except TimeoutError:
                if self.config.wake_depth and await self._depth() >= self.config.wake_depth:
                    return

    async def _until(self, stop: asyncio.Event, probe: Callable[[], Awaitable[bool]], every: float) -> None:
        """Redis offers no event for "back up": ask it, at the back-off interval."""
        while not stop.is_set() and not await probe():
            await _sleep_or_stop(stop, every)

    async def _depth(self) -> int:
        try:
            return await self._queue.depth()
        except Exception as exc:  # a broker hiccup must not kill the lane; the interval still fires
            log.info("could not read the deferred queue depth: %r", exc)
            return 0

    async def _answer(self, waiters: list[FlushRequest], reply: Reply) -> None:
        for request in waiters:
            if request.reply_to and self._reply_to.fullmatch(request.reply_to):
                try:
                    await self._replies.publish_reply(request.reply_to, request.correlation_id, reply)
                except Exception as exc:
                    log.info("flush reply not delivered: %r", exc)

    # ------------------------------------------------------------------ rounds
    async def drain(self) -> int:
        """Take what the queue holds, round after round, until it is empty. Returns vectors written."""
        written = 0
        while True:
            deliveries = await self._queue.get(self.config.max_messages)
            if not deliveries:
                return written
            result = await self._round(deliveries)
            try:
                for body, reason in result.parked:  # split-off items are safe in the DLQ before their message is acked
                    await self._queue.park(body, reason)
            except Exception:
                await self._queue.settle([(delivery, REQUEUE) for delivery, _ in result.settles])
                raise
            await self._queue.settle(result.settles)
            if result.store_error is not None:
                raise result.store_error
            written += result.written
            if len(deliveries) < self.config.max_messages and not self._queue.cut_short:
                return written  # the queue was empty (what a round sent back waits for the next drain)

    async def _round(self, deliveries: list[Delivery]) -> RoundResult:
        decoded, result = decode_round(deliveries, self._limits)
        if self._jobs is None:
            direct, via_jobs = decoded, []
        else:
            # Items whose Batch API jobs kept failing come back marked; they take the synchronous path.
            limit = self.config.batch_api_attempts
            via_jobs = [pair for pair in decoded if attempts(pair[0].headers) < limit]
            direct = [pair for pair in decoded if attempts(pair[0].headers) >= limit]
        if self._jobs is not None:
            _merge(result, await self._jobs.submit(via_jobs))
        _merge(result, await self._rounds.run(direct))
        return result

    async def _poll_jobs(self, stop: asyncio.Event) -> None:
        assert self._jobs is not None
        while not stop.is_set():
            try:
                await self._jobs.poll()
            except StoreUnavailable as exc:
                log.warning("Batch API jobs not polled: %s", exc)
            except Exception:  # the poller must outlive any one bad poll; the records stay in Redis
                log.exception("Batch API poll failed")
            await _sleep_or_stop(stop, self.config.batch_api_poll_s)


def _merge(into: RoundResult, part: RoundResult) -> None:
    into.settles += part.settles
    into.parked += part.parked
    into.written += part.written
    into.store_error = into.store_error or part.store_error


async def _first(*events: asyncio.Event) -> None:
    waits = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
