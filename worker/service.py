"""The RPC lanes: a delivery -> batcher -> upstream -> its reply -> a ``Settle`` value. No AMQP here.

Both RPC lanes (``lanes.Lane``: the default lane and bulk) take the same requests and get the same replies; each
has a batcher of its own (bulk may wait longer for full batches), and no call mixes the two, so a query's call
never waits for bulk's longer wait and carries only queries. Which lane's call goes upstream first is
``admission.py``'s choice.

``EmbedService.handle`` publishes the reply (confirmed by the broker) and returns what should become of the
delivery; ``amqp/settle.py`` applies it. The decisions, in the order they are taken:

| outcome                                                | reply                           | settle                  |
|--------------------------------------------------------|---------------------------------|-------------------------|
| a property is not valid UTF-8, reply_to usable          | error invalid_request           | ack                     |
| reply_to missing, not valid UTF-8, or not allowed       | none (nowhere safe to send it)  | dead-letter             |
| invalid request, or an input over a call's budget       | error invalid_request           | ack                     |
| Direct Reply-to caller gone before batching             | none, no upstream call          | ack                     |
| its reply would exceed REPLY_MAX_BYTES (estimated)      | error invalid_request           | ack                     |
| embeddings                                              | vectors                         | ack                     |
| deadline passed before the call, or bad input           | error, retryable=false          | ack                     |
| API budget has no room before the deadline (OverBudget) | error rate_limited, retryable=true | ack                  |
| upstream failed but the request is good (retryable)     | error, retryable=true           | dead-letter for replay  |
| internal error                                          | error internal, retryable=true  | dead-letter for replay  |
| worker shutting down before the batch ran               | none                            | requeue                 |
| caller gone (reply returned, or 541 over its name alone) | dropped, counted               | as decided above        |
| reply refused by the broker (basic.nack)                | -                               | dead-letter, the reason |
| reply over the broker's message size (406)              | error invalid_request instead   | as decided above        |
| broker unreachable while publishing the reply           | -                               | requeue                 |

A refused reply is final: requeueing it would embed the request again, and be refused again.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from worker import tracing
from worker.batcher import Batcher, BatcherClosed, BatchStats
from worker.budgets import BatchingConfig, weigh
from worker.errors import DeadlineExceeded, EmbedError, ErrorCode, InvalidRequest, OverBudget
from worker.inputs import EmbedInput
from worker.lanes import Call, Lane
from worker.logs import context, safe
from worker.messages import (
    EmbedConfig,
    Reply,
    RequestLimits,
    decode_request,
    encode_error,
    encode_vectors,
    reply_bytes,
)
from worker.metrics import Metrics
from worker.ports import (
    ACK,
    REQUEUE,
    BatchEmbedder,
    Delivery,
    ReplyPublisher,
    ReplyRefused,
    ReplyTooLarge,
    ReplyUndeliverable,
    Settle,
    Unaffordable,
    dead_letter,
)
from worker.topology import DIRECT_REPLY_TO_PREFIX
from worker.upstream import Outcome

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------- the decisions, as pure functions
def refuse_before_decoding(delivery: Delivery, allowed: re.Pattern[str]) -> tuple[Reply | None, Settle] | None:
    """What to do with a delivery we will not even decode, or None to go on."""
    reply_to = delivery.reply_to
    usable = bool(reply_to) and delivery.invalid_property != "reply_to" and bool(allowed.fullmatch(reply_to or ""))
    if delivery.invalid_property is not None:
        what = f"property {delivery.invalid_property} is not valid UTF-8"
        if usable:
            return encode_error(InvalidRequest(what)), ACK
        return None, dead_letter("invalid_property", what)
    if not reply_to:
        return None, dead_letter("no_reply_to", "no reply_to: nowhere to send the reply")
    if not usable:
        return None, dead_letter("reply_to_refused", "reply_to is not an allowed reply queue")
    return None


def settle_for_error(error: EmbedError) -> Settle:
    """An error reply is always sent; a good request that failed for reasons outside it is also parked."""
    if error.retryable and error.parked:
        label = "internal" if error.code == ErrorCode.INTERNAL else "upstream_failed"
        return dead_letter(label, f"{error.code}: {error.message}")
    return ACK


def _weigh_item(item: _Item) -> tuple[int, int]:
    return weigh(item.input)


@dataclass(frozen=True, slots=True)
class _Item:
    input: EmbedInput
    deadline: float | None  # epoch seconds (x-deadline)
    received: float  # monotonic: when its request was delivered
    span: tracing.Captured = None  # its request's span, for the call span's links (None: tracing is off)


class EmbedService:
    def __init__(
        self,
        upstream: BatchEmbedder,
        publisher: ReplyPublisher,
        *,
        limits: RequestLimits,
        batching: BatchingConfig,
        reply_to: re.Pattern[str],
        metrics: Metrics,
        check_callers: bool = True,
        reply_max_bytes: int = 16 * 1024 * 1024,
        bulk_max_wait_s: float | None = None,
    ):
        """``batching.max_wait_s`` is the default lane's; bulk's is ``bulk_max_wait_s`` (BULK_MAX_WAIT_MS), the
        same when None."""
        self._check_callers = check_callers
        # The largest reply we publish: REPLY_MAX_BYTES, lowered to the broker's own limit once it has said it.
        self._reply_max = reply_max_bytes
        self.metrics = metrics
        self._upstream = upstream
        self._publisher = publisher
        self._limits = limits
        self._reply_to = reply_to
        bulk_wait = batching.max_wait_s if bulk_max_wait_s is None else bulk_max_wait_s
        waits = {Lane.DEFAULT: batching.max_wait_s, Lane.BULK: bulk_wait}
        self.batchers: dict[Lane, Batcher[EmbedConfig, _Item, Outcome]] = {
            lane: Batcher(
                functools.partial(self._embed_batch, lane),
                max_size=batching.max_size,
                max_wait=wait,
                max_concurrent=batching.max_concurrent,
                on_batch=self._log_batch,
                weigh=lambda config: _weigh_item if batching.weighing(config) else None,
                budgets=batching.budgets,
            )
            for lane, wait in waits.items()
        }
        self._batching = batching
        # Bound once per lane: a labels() lookup per reply costs.
        self._replies_ok = {lane: metrics.replies.labels(lane, "ok", "ok") for lane in waits}
        self._received = {lane: metrics.requests.labels(lane) for lane in waits}
        self._latency = {lane: metrics.request_seconds.labels(lane) for lane in waits}
        self._queue_wait = {lane: metrics.queue_wait.labels(lane) for lane in waits}

    def handler(self, lane: Lane) -> Callable[[Delivery], Awaitable[Settle]]:
        """What a lane's consumer calls for each of its deliveries."""
        return functools.partial(self.handle, lane=lane)

    # ------------------------------------------------------------------ one delivery
    async def handle(self, delivery: Delivery, lane: Lane = Lane.DEFAULT) -> Settle:
        received = time.monotonic()
        self._received[lane].inc()
        try:
            return await self._handle(delivery, lane, received)
        finally:
            self._latency[lane].observe(time.monotonic() - received)

    async def _handle(self, delivery: Delivery, lane: Lane, received: float) -> Settle:
        refused = refuse_before_decoding(delivery, self._reply_to)
        if refused is not None:
            reply, settle = refused
            log.warning(
                "request refused: %s (message_id=%s)",
                settle.reason or "invalid",
                safe(delivery.message_id),
                extra=context(delivery.correlation_id),
            )
            return await self._finish(delivery, lane, reply, settle, code="invalid_request")
        assert delivery.reply_to is not None
        try:
            request = decode_request(
                delivery.body,
                content_type=delivery.content_type,
                content_encoding=delivery.content_encoding,
                headers=delivery.headers,
                request_limits=self._limits,
            )
        except EmbedError as exc:
            log.info(
                "invalid request (correlation_id=%s): %s",
                safe(delivery.correlation_id),
                safe(exc.message),
                extra=context(delivery.correlation_id),
            )
            return await self._finish(delivery, lane, encode_error(exc), settle_for_error(exc), code=exc.code)
        self.metrics.texts.inc(len(request.inputs))
        if self._batching.weighing(request.config) is not None:  # else no input can break a budget
            for i, item in enumerate(request.inputs):
                if (why := self._batching.over_budget(item)) is not None:
                    refusal = InvalidRequest(f"input {i} is {why}")
                    return await self._finish(delivery, lane, encode_error(refusal), ACK, code=refusal.code)
        size = reply_bytes(len(request.inputs), request.config.dimensions, request.reply_encoding)
        if size > self._reply_max:  # refused before any upstream call: its vectors could never be delivered
            refusal = self._too_large(size)
            return await self._finish(delivery, lane, encode_error(refusal), ACK, code=refusal.code)
        if (
            self._check_callers
            and delivery.reply_to.startswith(DIRECT_REPLY_TO_PREFIX)
            and not await self._publisher.caller_alive(delivery.reply_to)
        ):
            # Its reply would be dropped by the broker anyway: spend no upstream slot on it.
            log.info(
                "caller of correlation_id=%s has gone; dropping the request",
                safe(delivery.correlation_id),
                extra=context(delivery.correlation_id),
            )
            self.metrics.replies.labels(lane, "dropped", "caller_gone").inc()
            return ACK

        span = tracing.capture()  # the request span of amqp/rpc.py, current here
        try:
            outcomes = await self.batchers[lane].submit(
                request.config,
                [_Item(item, request.deadline, received, span) for item in request.inputs],
            )
        except BatcherClosed:
            return REQUEUE  # shutting down before this request's batch ran: let another worker take it
        except Exception as exc:
            log.exception(
                "internal error (correlation_id=%s)",
                safe(delivery.correlation_id),
                extra=context(delivery.correlation_id),
            )
            internal = EmbedError(f"internal error: {type(exc).__name__}", retryable=True)
            return await self._finish(
                delivery, lane, encode_error(internal), settle_for_error(internal), code=internal.code
            )

        error = next((o for o in outcomes if isinstance(o, EmbedError)), None)
        if error is not None:
            log.info(
                "request failed (correlation_id=%s): %s %s",
                safe(delivery.correlation_id),
                error.code,
                safe(error.message),
                extra=context(delivery.correlation_id),
            )
            return await self._finish(delivery, lane, encode_error(error), settle_for_error(error), code=error.code)
        vectors = [o for o in outcomes if not isinstance(o, EmbedError)]  # all of them: no error, checked above
        reply = encode_vectors(
            vectors, request.config.model, request.reply_encoding, dimensions=request.config.dimensions
        )
        if len(reply.body) > self._reply_max:  # the estimate is an upper bound; this is the last line
            refusal = self._too_large(len(reply.body))
            return await self._finish(delivery, lane, encode_error(refusal), ACK, code=refusal.code)
        return await self._finish(delivery, lane, reply, ACK, code="ok")

    def _too_large(self, size: int) -> InvalidRequest:
        return InvalidRequest(
            f"the reply would be about {size} bytes, over the {self._reply_max} a reply may hold (REPLY_MAX_BYTES, "
            "or the broker's max_message_size): send fewer texts, ask for fewer dimensions (output_dimensionality), "
            'or ask for reply_encoding "float32" (4 bytes a number)'
        )

    async def _finish(
        self, delivery: Delivery, lane: Lane, reply: Reply | None, settle: Settle, *, code: str
    ) -> Settle:
        """Publish ``reply`` (if any) and wait for its confirm, then hand back ``settle``; see the table above for
        what a reply the broker would not take becomes."""
        if reply is None:
            return settle
        assert delivery.reply_to is not None
        where = context(delivery.correlation_id)
        cid = safe(delivery.correlation_id)
        try:
            await self._publisher.publish_reply(delivery.reply_to, delivery.correlation_id, reply)
        except ReplyUndeliverable:
            log.info("reply dropped: the caller is gone (correlation_id=%s)", cid, extra=where)
            self.metrics.replies.labels(lane, "dropped", "caller_gone").inc()
        except ReplyTooLarge as exc:
            self._reply_max = min(self._reply_max, exc.limit)
            log.warning("reply refused by the broker: %s (correlation_id=%s)", exc.reason, cid, extra=where)
            self.metrics.replies.labels(lane, "refused", "too_large").inc()
            refusal = self._too_large(exc.size)
            return await self._finish(delivery, lane, encode_error(refusal), settle, code=refusal.code)
        except ReplyRefused as exc:
            log.warning("reply refused by the broker: %s (correlation_id=%s); parking", exc.reason, cid, extra=where)
            self.metrics.replies.labels(lane, "refused", code).inc()
            return dead_letter("reply_refused", f"the broker refused the reply: {exc.reason}")
        except Exception as exc:
            log.warning("could not publish reply (correlation_id=%s): %r; requeueing", cid, exc, extra=where)
            return REQUEUE
        else:
            self._replied(lane, code).inc()
        return settle

    def _replied(self, lane: Lane, code: str) -> Any:
        if code == "ok":
            return self._replies_ok[lane]
        return self.metrics.replies.labels(lane, "error", str(code))

    # ------------------------------------------------------------------ one batch
    async def _embed_batch(self, lane: Lane, config: EmbedConfig, items: list[_Item]) -> list[Outcome]:
        """Drop items whose deadline passed (no upstream cost), embed the rest in one call. When the API budget
        cannot have room before the earliest deadline, the items that cannot wait that long are answered
        ``OverBudget`` at once and the rest try again (each round answers at least the earliest)."""
        now = time.time()
        outcomes: list[Outcome | None] = [None] * len(items)
        live: list[int] = []
        for i, item in enumerate(items):
            if item.deadline is not None and item.deadline <= now:
                outcomes[i] = DeadlineExceeded("the request's x-deadline passed before it was sent upstream")
            else:
                live.append(i)
        while live:
            deadlines = [d for i in live if (d := items[i].deadline) is not None]
            call = Call(lane, min(deadlines) if deadlines else None)
            try:
                with tracing.call_span((items[i].span for i in live), model=config.model, inputs=len(live)):
                    results = await self._upstream.embed([items[i].input for i in live], config, call)
            except Unaffordable as exc:
                until, refusal = time.time() + exc.wait, OverBudget(exc.wait)
                waiting = []
                for i in live:
                    deadline = items[i].deadline
                    if deadline is not None and deadline < until:
                        outcomes[i] = refusal
                    else:
                        waiting.append(i)
                live = waiting
                continue
            if call.admitted_at is not None:
                queue_wait = self._queue_wait[lane]
                for i in live:
                    queue_wait.observe(call.admitted_at - items[i].received)
                    tracing.note_wait(items[i].span, call.admitted_at - items[i].received)
            for i, result in zip(live, results, strict=True):
                outcomes[i] = result
            break
        return outcomes  # type: ignore[return-value]

    def _log_batch(self, stats: BatchStats) -> None:
        self.metrics.batch_size.observe(stats.size)
        self.metrics.batch_wait.observe(stats.waited)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "batch %s: %d texts, flushed on %s after %.1f ms, upstream %.1f ms%s",
                stats.key,
                stats.size,
                stats.reason,
                stats.waited * 1000,
                stats.duration * 1000,
                f", error {stats.error!r}" if stats.error else "",
            )

    async def close(self, timeout: float | None) -> None:
        await asyncio.gather(*(batcher.close(timeout=timeout) for batcher in self.batchers.values()))
