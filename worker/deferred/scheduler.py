"""When the deferred lane drains, and what a flush request is told.

The lane wakes on its flush interval, on a flush request, or when a poll finds ``wake_depth`` messages waiting;
then it drains round after round until the queue is empty, hands each round's ``Settle`` values to the queue,
and answers the flush requests that woke it (``{"flushed": N}`` or an error reply). A round that fails pauses the
lane with back-off. Waits end early on SIGTERM.

The store must take writes, not merely answer: before each round the lane asks it (``VectorStore.writable``: a
full Redis or a read-only replica answers PING), so it takes no message, pays for no embedding and submits no
Batch API job that it could not record. While the store refuses, the lane is paused: it probes again with
back-off, and a flush request probes at once, then is answered ``store_unavailable`` if the store still refuses
(or drained, if it takes writes again). The Batch API poller collects no job meanwhile (the results wait at the
API, the records in Redis).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re

from worker.backoff import Backoff
from worker.errors import EmbedError, ErrorCode
from worker.messages import Reply, RequestLimits, encode_error, encode_flush_reply
from worker.ports import REQUEUE, DeferredQueue, Delivery, FlushRequest, ReplyPublisher, StoreUnavailable, VectorStore

from . import DeferredConfig
from .jobs import JobRounds, attempts
from .rounds import RoundResult, SyncRounds, decode_round

log = logging.getLogger(__name__)

FLUSH_PROBE_S = 1.0  # a flush during a pause asks the store at once, and waits this long for its answer


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
        self._probe_backoff = Backoff(base=0.5, cap=5.0)  # a paused lane asks the store again within seconds
        self._polls_held = False  # the poller found the store refusing writes (logged once per spell)

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
            except StoreUnavailable as exc:
                await self._answer(waiters, _store_unavailable(exc))
                await self._pause(stop, exc)
                self.wake.set()  # go again at once: the work is back in the queue
                continue
            except Exception as exc:  # e.g. the broker channel went away mid-round
                failures += 1
                delay = self._backoff.delay(failures)
                log.exception("deferred round failed; retrying in %.1fs", delay)
                error = EmbedError(type(exc).__name__, retryable=True, code=ErrorCode.INTERNAL)
                await self._answer(waiters, encode_error(error))
                await _sleep_or_stop(stop, delay)
                self.wake.set()
                continue
            failures = 0
            await self._answer(waiters, encode_flush_reply(written))

    async def _pause(self, stop: asyncio.Event, error: StoreUnavailable) -> None:
        """Until the store takes writes again: probe it with back-off, and at once on a flush request, which is
        answered ``store_unavailable`` if it still refuses (else left to the drain that follows)."""
        log.warning("deferred lane paused: %s", error)
        probes = 0
        while not stop.is_set():
            probes += 1
            flushed = await _event_or_stop(self.wake, stop, self._probe_backoff.delay(probes))
            self.wake.clear()
            refusal = await self._refusal(FLUSH_PROBE_S if flushed else None)
            if refusal is None:
                log.info("deferred lane resumed: the store takes writes again")
                return
            error = refusal
            await self._answer_waiting(_store_unavailable(error))
        await self._answer_waiting(_store_unavailable(error))

    async def _refusal(self, timeout: float | None) -> StoreUnavailable | None:
        """Why the store takes no writes now, or None when it does; no answer within ``timeout`` is a refusal."""
        try:
            async with asyncio.timeout(timeout):
                await self._store.writable()
        except StoreUnavailable as exc:
            return exc
        except TimeoutError:
            return StoreUnavailable(f"the store did not answer within {timeout:g}s")
        return None

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

    async def _depth(self) -> int:
        try:
            return await self._queue.depth()
        except Exception as exc:  # a broker hiccup must not kill the lane; the interval still fires
            log.info("could not read the deferred queue depth: %r", exc)
            return 0

    async def _answer_waiting(self, reply: Reply) -> None:
        waiters, self._flush_waiters = self._flush_waiters, []
        await self._answer(waiters, reply)

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
            await self._store.writable()  # take nothing the store could not take: no delivery counted, no call paid
            deliveries = await self._queue.get(self.config.max_messages)
            if not deliveries:
                self._rounds.drained()
                return written
            try:
                result = await self._round(deliveries)
            except Exception:  # never hold a failed round's messages until a restart
                await self._queue.settle([(delivery, REQUEUE) for delivery in deliveries])
                raise
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
                self._rounds.drained()
                return written  # the queue was empty (what a round sent back waits for the next drain)

    async def _round(self, deliveries: list[Delivery]) -> RoundResult:
        decoded, result = decode_round(deliveries, self._limits)
        if self._jobs is None:
            direct, via_jobs = decoded, []
        else:
            # Items whose Batch API jobs kept failing come back marked; they take the synchronous path.
            limit = self.config.batch_api_attempts
            via_jobs = [pair for pair in decoded if attempts(pair[0].headers, limit) < limit]
            direct = [pair for pair in decoded if attempts(pair[0].headers, limit) >= limit]
        if self._jobs is not None:
            _merge(result, await self._jobs.submit(via_jobs))
        _merge(result, await self._rounds.run(direct))
        return result

    async def _poll_jobs(self, stop: asyncio.Event) -> None:
        assert self._jobs is not None
        while not stop.is_set():
            try:
                await self._store.writable()  # a job collected into a store that refuses would be read for nothing
                await self._jobs.poll()
                self._polls_held = False
            except StoreUnavailable as exc:
                if not self._polls_held:
                    log.warning("Batch API jobs not collected while the store refuses writes: %s", exc)
                self._polls_held = True
            except Exception:  # the poller must outlive any one bad poll; the records stay in Redis
                log.exception("Batch API poll failed")
            await _sleep_or_stop(stop, self.config.batch_api_poll_s)


def _merge(into: RoundResult, part: RoundResult) -> None:
    into.settles += part.settles
    into.parked += part.parked
    into.written += part.written
    into.store_error = into.store_error or part.store_error


def _store_unavailable(error: StoreUnavailable) -> Reply:
    return encode_error(EmbedError(str(error), retryable=True, code=ErrorCode.STORE_UNAVAILABLE))


async def _event_or_stop(event: asyncio.Event, stop: asyncio.Event, seconds: float) -> bool:
    """Wait up to ``seconds`` for ``event`` or ``stop``; True if ``event`` is set."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(_first(event, stop), seconds)
    return event.is_set()


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
