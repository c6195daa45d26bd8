"""Deliveries -> batcher -> embedder -> replies -> acks. Every settle decision lives in this file.

The service depends on two small protocols, ``Delivery`` and ``ReplyPublisher``; ``worker.amqp``
implements them over aio-pika. The rule for every message: publish its reply (confirmed by the
broker), then ack. What cannot be answered is dead-lettered, where an operator can see it.

| outcome                                  | reply                          | settle                         |
|------------------------------------------|--------------------------------|--------------------------------|
| embeddings                               | vectors                        | ack                            |
| invalid request, deadline passed          | error, retryable=false         | ack                            |
| upstream failed after the retry budget    | error, retryable=true          | dead-letter                    |
| no reply_to, or reply_to not allowed      | none (nowhere safe to send it) | dead-letter                    |
| caller gone (reply returned unroutable)   | dropped by the broker          | ack                            |
| Direct Reply-to caller gone before batching| none, no upstream call         | ack                            |
| reply could not be published              | -                              | requeue (redelivered later)    |
| worker shutting down before the batch ran | -                              | requeue                        |
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from worker.batcher import Batcher, BatcherClosed, BatchStats
from worker.errors import DeadlineExceeded, EmbedError, UpstreamError
from worker.messages import (
    EmbedConfig,
    Reply,
    RequestLimits,
    decode_request,
    encode_error,
    encode_vectors,
)
from worker.metrics import Metrics
from worker.upstream import Outcome, UpstreamCaller

log = logging.getLogger(__name__)


class Delivery(Protocol):
    body: bytes
    content_type: str | None
    headers: Mapping[str, Any]
    reply_to: str | None
    correlation_id: str | None
    message_id: str | None
    redelivered: bool

    async def ack(self) -> None: ...

    async def reject(self, *, requeue: bool) -> None:
        """requeue=False dead-letters the message (the queue has a dead-letter exchange)."""


class ReplyUndeliverable(Exception):
    """The broker returned the reply: no queue by that name (the caller is gone)."""


class ReplyPublisher(Protocol):
    async def publish_reply(self, reply_to: str, correlation_id: str | None, reply: Reply) -> None:
        """Publish and wait for the broker's confirm; raise ReplyUndeliverable if it was returned."""

    async def caller_alive(self, reply_to: str) -> bool:
        """False only when the broker says a Direct Reply-to caller has gone."""


DIRECT_REPLY_TO_PREFIX = "amq.rabbitmq.reply-to."


@dataclass(frozen=True, slots=True)
class _Item:
    text: str
    deadline: float | None


@dataclass(frozen=True, slots=True)
class BatchingConfig:
    max_size: int
    max_wait_s: float
    max_concurrent: int


class EmbedService:
    def __init__(
        self,
        upstream: UpstreamCaller,
        publisher: ReplyPublisher,
        *,
        limits: RequestLimits,
        batching: BatchingConfig,
        reply_to: re.Pattern[str],
        metrics: Metrics | None = None,
        check_callers: bool = True,
    ):
        self._check_callers = check_callers
        self.metrics = metrics or Metrics()
        self._upstream = upstream
        self._publisher = publisher
        self._limits = limits
        self._reply_to = reply_to
        self.batcher: Batcher[EmbedConfig, _Item, Outcome] = Batcher(
            self._embed_batch,
            max_size=batching.max_size,
            max_wait=batching.max_wait_s,
            max_concurrent=batching.max_concurrent,
            on_batch=self._log_batch,
        )

    # ------------------------------------------------------------------ one delivery
    async def handle(self, delivery: Delivery) -> None:
        cid = delivery.correlation_id
        ctx = {"correlation_id": cid}  # structured field for JSON logs
        reply_to = delivery.reply_to
        self.metrics.requests.inc()
        if not reply_to:
            log.warning(
                "request without reply_to (correlation_id=%s, message_id=%s): dead-lettering",
                cid,
                delivery.message_id,
                extra=ctx,
            )
            await self._dead_letter(delivery, "no_reply_to")
            return
        if not self._reply_to.fullmatch(reply_to):
            log.warning(
                "reply_to %r is not an allowed reply queue (correlation_id=%s): dead-lettering",
                reply_to[:200],
                cid,
                extra=ctx,
            )
            await self._dead_letter(delivery, "reply_to_refused")
            return

        try:
            request = decode_request(
                delivery.body, content_type=delivery.content_type, headers=delivery.headers, limits_=self._limits
            )
        except EmbedError as exc:
            log.info("invalid request (correlation_id=%s): %s", cid, exc.message, extra=ctx)
            await self._reply(delivery, encode_error(exc), code=exc.code)
            return
        self.metrics.texts.inc(len(request.texts))
        if (
            self._check_callers
            and reply_to.startswith(DIRECT_REPLY_TO_PREFIX)
            and not await self._publisher.caller_alive(reply_to)
        ):
            # Its reply would be dropped by the broker anyway: spend no upstream slot on it.
            log.info("caller of correlation_id=%s has gone; dropping the request", cid, extra=ctx)
            self.metrics.replies.labels("dropped", "caller_gone").inc()
            await delivery.ack()
            return

        try:
            outcomes = await self.batcher.submit(
                request.config, [_Item(text, request.deadline) for text in request.texts]
            )
        except BatcherClosed:
            # Shutting down before this request's batch ran: let another worker take it.
            await delivery.reject(requeue=True)
            return
        except Exception as exc:
            log.exception("internal error (correlation_id=%s)", cid, extra=ctx)
            internal = EmbedError(f"internal error: {type(exc).__name__}")
            await self._reply(delivery, encode_error(internal), code=internal.code, dead_letter="internal")
            return

        error = next((o for o in outcomes if isinstance(o, EmbedError)), None)
        if error is not None:
            log.info("request failed (correlation_id=%s): %s %s", cid, error.code, error.message, extra=ctx)
            # A transient upstream failure that outlived the retry budget is parked for replay.
            parked = isinstance(error, UpstreamError) and error.retryable
            await self._reply(
                delivery, encode_error(error), code=error.code, dead_letter="upstream_failed" if parked else None
            )
            return
        vectors = np.stack(outcomes)  # type: ignore[arg-type]  # no errors left, checked above
        reply = encode_vectors(vectors, request.config.model, request.reply_encoding)
        await self._reply(delivery, reply, code="ok")

    async def _reply(self, delivery: Delivery, reply: Reply, *, code: str, dead_letter: str | None = None) -> None:
        """Publish, then settle: ack, or dead-letter with ``dead_letter`` as the metrics reason."""
        assert delivery.reply_to is not None
        ctx = {"correlation_id": delivery.correlation_id}
        try:
            await self._publisher.publish_reply(delivery.reply_to, delivery.correlation_id, reply)
        except ReplyUndeliverable:
            log.info(
                "reply to %s returned: caller is gone (correlation_id=%s)",
                delivery.reply_to[:200],
                delivery.correlation_id,
                extra=ctx,
            )
        except Exception as exc:
            log.warning(
                "could not publish reply (correlation_id=%s): %r; requeueing", delivery.correlation_id, exc, extra=ctx
            )
            await delivery.reject(requeue=True)
            return
        else:
            self.metrics.replies.labels("ok" if code == "ok" else "error", str(code)).inc()
        if dead_letter:
            await self._dead_letter(delivery, dead_letter)
        else:
            await delivery.ack()

    async def _dead_letter(self, delivery: Delivery, reason: str) -> None:
        self.metrics.dead_lettered.labels(reason).inc()
        await delivery.reject(requeue=False)

    # ------------------------------------------------------------------ one batch
    async def _embed_batch(self, config: EmbedConfig, items: list[_Item]) -> list[Outcome]:
        """Drop items whose deadline passed (no upstream cost), embed the rest in one call."""
        now = time.time()
        outcomes: list[Outcome | None] = [None] * len(items)
        live: list[int] = []
        for i, item in enumerate(items):
            if item.deadline is not None and item.deadline <= now:
                outcomes[i] = DeadlineExceeded("the request's x-deadline passed before it was sent upstream")
            else:
                live.append(i)
        if live:
            results = await self._upstream.embed([items[i].text for i in live], config)
            for i, result in zip(live, results, strict=True):
                outcomes[i] = result
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
        await self.batcher.close(timeout=timeout)
