"""The fire-and-forget lane: (key, text) items embedded when convenient, vectors written to Redis.

The durable queue ``embed.deferred`` is the buffer, not worker memory: the lane wakes on its flush
interval, on a flush request, or when the queue holds enough messages, then *takes what is there*
(basic.get, so nothing waits unacked in a consumer's prefetch for minutes and runs into RabbitMQ's
consumer timeout), embeds it, writes it, and acks. A round holds messages only for the seconds it
takes to embed and write them.

Settle rules, per message:
| outcome                                              | settle       |
|------------------------------------------------------|--------------|
| every item written (or unchanged, or superseded)     | ack          |
| the message is invalid, or an item is bad input      | dead-letter  |
| the upstream failed after its retry budget           | requeue (the quorum delivery limit parks it eventually) |
| Redis unavailable                                    | requeue the whole round, pause until Redis answers |

Savings: within a round a key is embedded once (its latest text wins), identical texts of one
configuration share one upstream slot, and (``DEFERRED_SKIP_UNCHANGED``) keys whose hash already holds
an embedding of the same text, model and dimension are skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from worker.batcher import Batcher
from worker.embedders.base import JobResult
from worker.errors import EmbedError, InvalidRequest
from worker.messages import DeferredRequest, EmbedConfig, Reply, RequestLimits, decode_deferred
from worker.redis_store import Existing, StoredVector, StoreUnavailable
from worker.service import Delivery, ReplyPublisher
from worker.upstream import Outcome, UpstreamCaller

log = logging.getLogger(__name__)


class DeferredSource(Protocol):
    async def fetch_deferred(self, max_messages: int) -> list[Delivery]: ...

    async def deferred_depth(self) -> int: ...


class VectorStore(Protocol):
    async def write(self, entries: Sequence[StoredVector]) -> None: ...

    async def save_job(self, name: str, record: bytes) -> None: ...

    async def jobs(self) -> dict[str, bytes]: ...

    async def complete_job(self, name: str, entries: Sequence[StoredVector]) -> None: ...

    async def drop_job(self, name: str) -> None: ...

    async def existing(self, keys: Sequence[str]) -> list[Existing]: ...

    async def ping(self) -> bool: ...


class DeferredPublisher(ReplyPublisher, Protocol):
    async def publish_deferred(self, body: bytes, headers: dict[str, Any]) -> None:
        """Put items back on ``embed.deferred``."""

    async def park_deferred(self, body: bytes, reason: str) -> None:
        """Put items in ``embed.deferred.dlq`` with the reason in a header."""


class BatchJobs(Protocol):
    async def submit(self, texts: Sequence[str], config: EmbedConfig, display_name: str) -> str: ...

    async def result(self, name: str, config: EmbedConfig, count: int) -> JobResult | None: ...


BATCH_ATTEMPTS_HEADER = "x-batch-attempts"


def _config_dict(cfg: EmbedConfig) -> dict[str, Any]:
    return {"model": cfg.model, "task_type": cfg.task_type, "output_dimensionality": cfg.output_dimensionality}


def _deferred_body(cfg: EmbedConfig, items: Sequence[tuple[str, str]]) -> bytes:
    body: dict[str, Any] = {"items": [{"key": k, "text": t} for k, t in items], "model": cfg.model}
    if cfg.task_type:
        body["task_type"] = cfg.task_type
    if cfg.output_dimensionality:
        body["output_dimensionality"] = cfg.output_dimensionality
    return orjson.dumps(body)


@dataclass(frozen=True, slots=True)
class DeferredConfig:
    batch_max_size: int = 100
    max_concurrent: int = 2
    max_messages: int = 1000  # per round
    flush_interval_s: float = 300.0
    wake_depth: int = 1000  # drain early once this many messages wait (0 = never)
    poll_s: float = 5.0
    skip_unchanged: bool = True
    batch_api: bool = False  # submit Batch API jobs instead of synchronous calls
    batch_api_poll_s: float = 60.0
    batch_api_attempts: int = 3  # failed jobs before items take the synchronous path


def text_hash(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


class DeferredLane:
    def __init__(
        self,
        source: DeferredSource,
        store: VectorStore,
        upstream: UpstreamCaller,
        publisher: DeferredPublisher,
        *,
        limits: RequestLimits,
        config: DeferredConfig,
        reply_to: re.Pattern[str],
        jobs: BatchJobs | None = None,
    ):
        self._jobs = jobs if config.batch_api else None
        self._reply_to = reply_to
        self._source = source
        self._store = store
        self._upstream = upstream
        self._publisher = publisher
        self._limits = limits
        self.config = config
        self._batcher: Batcher[EmbedConfig, str, Outcome] = Batcher(
            self._upstream.embed_batch, max_size=config.batch_max_size, max_wait=0, max_concurrent=config.max_concurrent
        )
        self.wake = asyncio.Event()
        self._flush_waiters: list[Delivery] = []
        self.rounds = 0

    # ------------------------------------------------------------------ scheduling
    def request_flush(self, control: Delivery | None = None) -> None:
        """Drain now (control message or ``embed-worker flush``); answer ``control`` when done."""
        if control is not None:
            self._flush_waiters.append(control)
        self.wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        poller = asyncio.create_task(self._poll_forever(stop)) if self._jobs is not None else None
        try:
            await self._run(stop)
        finally:
            if poller is not None:
                poller.cancel()

    async def _poll_forever(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.poll_jobs()
            except StoreUnavailable as exc:
                log.warning("Batch API jobs not polled: %s", exc)
            except Exception:  # the poller must outlive any one bad poll; the records stay in Redis
                log.exception("Batch API poll failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.config.batch_api_poll_s)

    async def _run(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        backoff = 0.5
        while not stop.is_set():
            deadline = loop.time() + self.config.flush_interval_s
            while not (stop.is_set() or self.wake.is_set()) and loop.time() < deadline:
                try:
                    await asyncio.wait_for(self._wait_any(stop), min(self.config.poll_s, deadline - loop.time()))
                except TimeoutError:
                    if self.config.wake_depth and await self._depth() >= self.config.wake_depth:
                        break
            if stop.is_set():
                break
            self.wake.clear()
            waiters, self._flush_waiters = self._flush_waiters, []
            try:
                written = await self.drain()
                backoff = 0.5
            except StoreUnavailable as exc:
                log.warning("deferred lane paused: %s; retrying in %.1fs", exc, backoff)
                await self._answer(
                    waiters, {"error": {"code": "store_unavailable", "message": str(exc), "retryable": True}}
                )
                await asyncio.sleep(backoff)
                backoff = min(60.0, backoff * 2)
                await self._until_store_answers(stop, backoff)
                self.wake.set()  # go again at once: the work is back in the queue
                continue
            except Exception as exc:  # e.g. the broker channel went away mid-round: unacked work returns
                log.exception("deferred round failed; retrying in %.1fs", backoff)
                await self._answer(
                    waiters, {"error": {"code": "internal", "message": type(exc).__name__, "retryable": True}}
                )
                await asyncio.sleep(backoff)
                backoff = min(60.0, backoff * 2)
                self.wake.set()
                continue
            await self._answer(waiters, {"flushed": written})

    async def _until_store_answers(self, stop: asyncio.Event, every: float) -> None:
        """Redis offers no event for "back up": ask it, at the back-off interval."""
        while not stop.is_set():
            if await self._store.ping():
                return
            await asyncio.sleep(every)

    async def _wait_any(self, stop: asyncio.Event) -> None:
        waits = [asyncio.ensure_future(self.wake.wait()), asyncio.ensure_future(stop.wait())]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()

    async def _depth(self) -> int:
        try:
            return await self._source.deferred_depth()
        except Exception as exc:  # a broker hiccup must not kill the lane; the interval still fires
            log.info("could not read the deferred queue depth: %r", exc)
            return 0

    async def _answer(self, waiters: list[Delivery], body: dict[str, object]) -> None:
        for control in waiters:
            if control.reply_to and self._reply_to.fullmatch(control.reply_to):
                try:
                    await self._publisher.publish_reply(
                        control.reply_to, control.correlation_id, Reply(orjson.dumps(body))
                    )
                except Exception as exc:
                    log.info("flush reply not delivered: %r", exc)
            await control.ack()

    # ------------------------------------------------------------------ one drain
    async def drain(self) -> int:
        """Take what the queue holds, round after round, until it is empty. Returns vectors written."""
        written = 0
        while True:
            deliveries = await self._source.fetch_deferred(self.config.max_messages)
            if not deliveries:
                return written
            written += await self._round(deliveries)
            self.rounds += 1
            if len(deliveries) < self.config.max_messages:
                return written

    async def _round(self, deliveries: list[Delivery]) -> int:
        decoded: list[tuple[Delivery, DeferredRequest]] = []
        for delivery in deliveries:
            try:
                request = decode_deferred(delivery.body, content_type=delivery.content_type, limits_=self._limits)
            except InvalidRequest as exc:
                log.warning(
                    "invalid deferred request (message_id=%s): %s; dead-lettering", delivery.message_id, exc.message
                )
                await delivery.reject(requeue=False)
                continue
            decoded.append((delivery, request))
        if self._jobs is None:
            return await self._sync_round(decoded)
        # Items whose Batch API jobs kept failing come back marked; they take the synchronous path.
        tries = [int(d.headers.get(BATCH_ATTEMPTS_HEADER, 0) or 0) for d, _ in decoded]
        via_jobs = [pair for pair, n in zip(decoded, tries, strict=True) if n < self.config.batch_api_attempts]
        direct = [pair for pair, n in zip(decoded, tries, strict=True) if n >= self.config.batch_api_attempts]
        await self._job_round(via_jobs)
        return await self._sync_round(direct)

    @staticmethod
    def _latest(decoded: list[tuple[Delivery, DeferredRequest]]) -> dict[tuple[EmbedConfig, str], str]:
        """The latest text for each key wins; earlier ones are superseded, not embedded."""
        latest: dict[tuple[EmbedConfig, str], str] = {}
        for _, request in decoded:
            for key, text in zip(request.keys, request.texts, strict=True):
                latest[(request.config, key)] = text
        return latest

    async def _sync_round(self, decoded: list[tuple[Delivery, DeferredRequest]]) -> int:
        if not decoded:
            return 0
        latest = self._latest(decoded)
        try:
            pending = await self._without_unchanged(latest)
            outcomes = await self._embed(pending)
            entries = [
                StoredVector(key=key, vector=vec, model=cfg.model, text_hash=text_hash(text))
                for (cfg, key), text in pending.items()
                if not isinstance(vec := outcomes[(cfg, text)], EmbedError)
            ]
            if entries:
                await self._store.write(entries)
        except StoreUnavailable:
            for delivery, _ in decoded:
                await delivery.reject(requeue=True)
            raise

        for delivery, request in decoded:
            errors = [
                outcome
                for key, text in zip(request.keys, request.texts, strict=True)
                if (request.config, key) in pending
                and latest[(request.config, key)] == text
                and isinstance(outcome := outcomes[(request.config, text)], EmbedError)
            ]
            if any(isinstance(e, InvalidRequest) or not e.retryable for e in errors):
                log.warning(
                    "deferred message %s has bad items (%s); dead-lettering", delivery.message_id, errors[0].message
                )
                await delivery.reject(requeue=False)
            elif errors:
                await delivery.reject(requeue=True)
            else:
                await delivery.ack()
        log.info("deferred round: %d messages, %d keys, %d written", len(decoded), len(latest), len(entries))
        return len(entries)

    # ------------------------------------------------------------------ Batch API jobs
    async def _job_round(self, decoded: list[tuple[Delivery, DeferredRequest]]) -> None:
        """Submit one Batch API job per configuration, record it in Redis, then ack the messages."""
        assert self._jobs is not None
        if not decoded:
            return
        latest = self._latest(decoded)
        attempts = max(int(d.headers.get(BATCH_ATTEMPTS_HEADER, 0) or 0) for d, _ in decoded)
        try:
            pending = await self._without_unchanged(latest)
            by_config: dict[EmbedConfig, list[tuple[str, str]]] = {}
            for (cfg, key), text in pending.items():
                by_config.setdefault(cfg, []).append((key, text))
            for cfg, items in by_config.items():
                texts = list(dict.fromkeys(text for _, text in items))
                name = await self._jobs.submit(texts, cfg, display_name=f"embed-worker {len(texts)} texts")
                record = {"config": _config_dict(cfg), "texts": texts, "items": items, "attempts": attempts}
                await self._store.save_job(name, orjson.dumps(record))
                log.info("Batch API job %s submitted: %d texts for %d keys", name, len(texts), len(items))
        except (StoreUnavailable, EmbedError) as exc:
            # Nothing acked: the messages come back; a job submitted without its record is only a cost.
            log.warning("Batch API round failed (%s); requeueing its messages", exc)
            for delivery, _ in decoded:
                await delivery.reject(requeue=True)
            if isinstance(exc, StoreUnavailable):
                raise
            return
        for delivery, _ in decoded:
            await delivery.ack()

    async def poll_jobs(self) -> int:
        """Collect finished jobs: write their vectors and forget them in one transaction. Returns vectors written."""
        if self._jobs is None:
            return 0
        written = 0
        for name, raw in (await self._store.jobs()).items():
            record = orjson.loads(raw)
            cfg = EmbedConfig(**record["config"])
            texts: list[str] = record["texts"]
            try:
                result = await self._jobs.result(name, cfg, len(texts))
            except EmbedError as exc:
                log.info("could not read Batch API job %s: %s", name, exc.message)
                continue
            if result is None:
                continue
            items: list[tuple[str, str]] = [(k, t) for k, t in record["items"]]
            if not result.succeeded:
                log.warning(
                    "Batch API job %s ended %s; its %d items go back to the queue", name, result.state, len(items)
                )
                await self._publisher.publish_deferred(
                    _deferred_body(cfg, items), {BATCH_ATTEMPTS_HEADER: record["attempts"] + 1}
                )
                await self._store.drop_job(name)
                continue
            outcome = dict(zip(texts, result.outcomes, strict=True))
            entries = [
                StoredVector(key=key, vector=vec, model=cfg.model, text_hash=text_hash(text))
                for key, text in items
                if not isinstance(vec := outcome[text], EmbedError)
            ]
            bad = [(key, text) for key, text in items if isinstance(outcome[text], EmbedError)]
            if bad:
                await self._publisher.park_deferred(_deferred_body(cfg, bad), "rejected by the Batch API")
            await self._store.complete_job(name, entries)
            log.info("Batch API job %s done: %d written, %d parked", name, len(entries), len(bad))
            written += len(entries)
        return written

    async def _without_unchanged(
        self, latest: dict[tuple[EmbedConfig, str], str]
    ) -> dict[tuple[EmbedConfig, str], str]:
        if not self.config.skip_unchanged or not latest:
            return latest
        items = list(latest.items())
        existing = await self._store.existing([key for (_, key), _ in items])
        return {
            (cfg, key): text
            for ((cfg, key), text), have in zip(items, existing, strict=True)
            if not (have.text_hash == text_hash(text) and have.model == cfg.model and have.dimensions == cfg.dimensions)
        }

    async def _embed(self, pending: dict[tuple[EmbedConfig, str], str]) -> dict[tuple[EmbedConfig, str], Outcome]:
        """One upstream slot per distinct text of each configuration."""
        by_config: dict[EmbedConfig, list[str]] = {}
        for (cfg, _), text in pending.items():
            by_config.setdefault(cfg, [])
            by_config[cfg].append(text)
        configs = list(by_config)
        texts = [list(dict.fromkeys(by_config[cfg])) for cfg in configs]
        results = await asyncio.gather(*(self._batcher.submit(cfg, t) for cfg, t in zip(configs, texts, strict=True)))
        return {
            (cfg, text): outcome
            for cfg, cfg_texts, outcomes in zip(configs, texts, results, strict=True)
            for text, outcome in zip(cfg_texts, outcomes, strict=True)
        }
