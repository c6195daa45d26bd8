"""Composition root: build every part from one ``Settings`` and run the worker until told to stop.

The only module that knows every other one. Start order: the embedder (without google-genai: its fast path
imports the SDK on a thread after its first call, gemini.py; the import was most of the CPU of starting); the
health endpoints, bound before the broker connection is made (a port in use fails the start before any delivery
is taken); then at once the topology and the reply connection; then the RPC lanes (a consumer each). Deliveries
are taken from there on; only then, all at once, the deferred lane and the fleet limiter's announcement:
nothing before consuming waits for Redis or the SDK.
``ready`` (and the "ready:" line) still come once all of it has started. On SIGTERM, ``_drain`` stops them in
the reverse order of the work's flow (stop taking, flush, answer, settle) within SHUTDOWN_GRACE_S.

What a start needs is imported here; what only some settings need (Redis, the deferred lane, the Batch API, the
bundled emulator) is imported where it is built.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from worker.amqp.connection import AmqpConfig, PlainConnector, connect, declare_topology
from worker.amqp.publish import Publisher
from worker.amqp.replies import RpcReplies
from worker.amqp.rpc import RpcConsumer
from worker.amqp.settle import Settler
from worker.budgets import BatchingConfig
from worker.deferred import DeferredConfig
from worker.errors import ConfigurationError
from worker.flow import AdaptiveConcurrency, CircuitBreaker, RateLimiter
from worker.frugal import Frugal
from worker.holding import HeldBytes, tune_allocator
from worker.lanes import Lane, LaneConfig
from worker.messages import RequestLimits
from worker.metrics import Metrics
from worker.service import EmbedService
from worker.upstream import RetryPolicy, UpstreamCaller

if TYPE_CHECKING:
    from aio_pika.abc import AbstractRobustConnection

    from worker.admission import Admission
    from worker.embedders.gemini import GeminiEmbedder
    from worker.ports import Limiter
    from worker.redis_quota import FleetLimiter
    from worker.redis_store import RedisVectorStore
    from worker.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class _Running:
    consumers: list[RpcConsumer]
    service: EmbedService
    settler: Settler
    lane_task: asyncio.Task[None] | None


@dataclass(frozen=True, slots=True)
class _Values:
    """Every value object the parts take, built once from the settings."""

    amqp: AmqpConfig
    request_limits: RequestLimits
    batching: BatchingConfig
    retry: RetryPolicy
    deferred: DeferredConfig
    lanes: tuple[LaneConfig, ...]  # the RPC lanes' consumers: the default lane first
    # Bytes of MAX_HELD_BYTES that ingestion (bulk, deferred) leaves to queries: a quarter. Their deliveries never
    # fill the worker so that no query can be taken (README, "Lanes").
    ingest_reserve: int

    @classmethod
    def of(cls, settings: Settings) -> _Values:
        reserve = settings.max_held_bytes // 4
        return cls(
            amqp=AmqpConfig.from_settings(settings),
            request_limits=RequestLimits.from_settings(settings),
            batching=BatchingConfig.from_settings(settings),
            retry=RetryPolicy.from_settings(settings),
            deferred=DeferredConfig.from_settings(settings),
            lanes=(
                LaneConfig(Lane.DEFAULT, settings.effective_prefetch),
                LaneConfig(Lane.BULK, settings.effective_bulk_prefetch, reserve),
            ),
            ingest_reserve=reserve,
        )


async def run_worker(settings: Settings, stop: asyncio.Event | None = None, ready: asyncio.Event | None = None) -> None:
    """Run until ``stop`` is set (or SIGTERM/SIGINT), then drain within SHUTDOWN_GRACE_S.

    ``ready`` is set once the worker is connected, has declared its topology and is consuming.
    """
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    lane_stop = asyncio.Event()
    async with contextlib.AsyncExitStack() as stack:
        running = await _start(settings, _Values.of(settings), stack, lane_stop)
        log.info(
            "ready: batch size %d, max wait %.0f ms (bulk %.0f ms), %d concurrent batches, prefetch %d (bulk %d), "
            "model %s, event loop %s",
            settings.batch_max_size,
            settings.batch_max_wait_ms,
            settings.bulk_max_wait_ms,
            settings.max_concurrent_batches,
            settings.effective_prefetch,
            settings.effective_bulk_prefetch,
            settings.gemini_model,
            type(asyncio.get_running_loop()).__module__.split(".")[0],
        )
        if ready is not None:
            ready.set()
        await stop.wait()
        lane_stop.set()
        await _drain(settings, running)
    log.info("stopped")


async def _start(
    settings: Settings, values: _Values, stack: contextlib.AsyncExitStack, lane_stop: asyncio.Event
) -> _Running:
    """Build and start everything; ``stack`` closes it all again, in reverse order."""
    metrics = Metrics()
    if not tune_allocator():
        log.info("not glibc: memory freed after a burst of large messages may stay with the process")
    held = HeldBytes(settings.max_held_bytes, largest=settings.max_body_bytes)
    embedder = _embedder(settings, stack)
    stack.push_async_callback(embedder.aclose)
    consumers: list[RpcConsumer] = []

    async def health() -> None:
        """/healthz, /readyz and /metrics: bound before we connect, so that a port in use fails the start before
        any delivery is taken (/readyz says 503 until the consumers run)."""
        if settings.metrics_port is None:
            return
        from worker.metrics_server import serve as serve_metrics

        try:
            server = await serve_metrics(
                metrics, lambda: _ready(consumers), settings.metrics_host, settings.metrics_port
            )
        except OSError as exc:
            where = f"{settings.metrics_host}:{settings.metrics_port}"
            raise ConfigurationError(f"METRICS_PORT: cannot serve metrics on {where}: {exc.strerror or exc}") from exc
        stack.push_async_callback(server.aclose)

    # Bound first (a local bind: no wait): cancelling a robust connection's first attempt leaves it reconnecting.
    await health()
    log.info("connecting to %s", settings.amqp_url_redacted)
    connection = await connect(values.amqp)  # waits for a broker that is not up yet, logging each attempt
    stack.push_async_callback(_close_connection, connection)

    async def publishing() -> Publisher:
        # Replies (and parked copies) on a connection of their own, caller probes on a third (amqp/replies.py).
        publish_connection = await connect(dataclasses.replace(values.amqp, connection_name="embed-worker-publish"))
        stack.push_async_callback(_close_connection, publish_connection)
        return await Publisher.open(publish_connection)

    # On a robust channel: the topology is declared again after a reconnect.
    _, publisher = await _all(declare_topology(connection, values.amqp), publishing())
    settler = Settler(publisher, metrics)
    probe = PlainConnector(values.amqp, "embed-worker-probe") if settings.check_callers else None
    replies = RpcReplies(publisher, probe)
    stack.push_async_callback(replies.aclose)

    def pause() -> None:
        for consumer in consumers:
            consumer.pause()

    def resume() -> None:
        for consumer in consumers:
            consumer.resume()

    breaker = CircuitBreaker(settings.breaker_failures, settings.breaker_cooldown_s, on_open=pause, on_close=resume)
    limiter, announce = _limiter(settings, stack, metrics)
    upstream = UpstreamCaller(
        embedder,
        values.retry,
        metrics=metrics,
        rate_limiter=limiter,
        concurrency=AdaptiveConcurrency(settings.max_concurrent_batches),
        breaker=breaker,
        bulk_min_share=settings.bulk_min_share,
    )
    frugal = _frugal(settings, stack, upstream, metrics)
    service = EmbedService(
        frugal,
        replies,
        limits=values.request_limits,
        batching=values.batching,
        reply_to=settings.reply_to_regex,
        metrics=metrics,
        check_callers=settings.check_callers,
        reply_max_bytes=settings.reply_max_bytes,
        bulk_max_wait_s=settings.bulk_max_wait_ms / 1000,
    )
    for warning in settings.prefetch_warnings():
        log.warning(warning)
    consumers += [
        RpcConsumer(connection, lane, settler, service.handler(lane.lane), held.share(lane.reserve_bytes))
        for lane in values.lanes
    ]
    await _all(*(consumer.start() for consumer in consumers))
    metrics.inflight.set_function(lambda: sum(consumer.inflight for consumer in consumers))
    metrics.held_bytes.set_function(lambda: held.held)
    metrics.held_bytes_max.set_function(lambda: held.most)
    metrics.paused.set_function(lambda: int(any(consumer.paused for consumer in consumers)))
    metrics.ready.set_function(lambda: int(_ready(consumers)))

    # Consuming: deliveries are taken from here on. Nothing above
    # waited for Redis or the SDK; what is left starts all at once.
    lane_task, *_ = await _all(
        _start_lane(
            settings,
            values,
            stack,
            connection=connection,
            settler=settler,
            publisher=publisher,
            replies=replies,
            upstream=frugal,
            admission=upstream.admission,
            metrics=metrics,
            embedder=embedder,
            lane_stop=lane_stop,
            held=held,
        ),
        announce(),
    )
    return _Running(consumers, service, settler, lane_task)


async def _all(*steps: Awaitable[Any]) -> list[Any]:
    """``asyncio.gather``, except that the first failure cancels the other steps (and is the one raised)."""
    tasks = [asyncio.ensure_future(step) for step in steps]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def _ready(consumers: list[RpcConsumer]) -> bool:
    """/readyz: every lane's consumer connected and consuming as it wants to (none yet while connecting)."""
    return bool(consumers) and all(consumer.ready for consumer in consumers)


def _limiter(
    settings: Settings, stack: contextlib.AsyncExitStack, metrics: Metrics
) -> tuple[Limiter, Callable[[], Awaitable[None]]]:
    """The API budget: this process's own, or the fleet's through Redis; and what to do once consuming (announce
    this worker's budget to the fleet, for the warning when live workers declare others; every call is counted in
    Redis whether or not it came before the announcement, so nothing waits for it)."""
    if settings.upstream_limit_scope == "process" or not settings.limited:
        limiter = RateLimiter(
            settings.upstream_rpm,
            settings.upstream_tpm,
            window=settings.upstream_window_s,
            usd=settings.upstream_usd_limit,
            usd_window=settings.upstream_usd_window_s,
            on_error=metrics.ratelimit_errors.inc,
        )
        return limiter, _nothing
    from worker.redis_quota import FleetLimiter

    assert settings.redis_url is not None  # the settings validator says so
    fleet = FleetLimiter(
        settings.redis_url.get_secret_value(),
        prefix=settings.redis_key_prefix,
        calls=settings.upstream_rpm,
        tokens=settings.upstream_tpm,
        window_s=settings.upstream_window_s,
        metrics=metrics,
        on_error=metrics.ratelimit_errors.inc,
        usd=settings.upstream_usd_limit,
        usd_window_s=settings.upstream_usd_window_s,
    )
    stack.push_async_callback(fleet.aclose)
    return fleet, functools.partial(_announce, settings, fleet)


async def _nothing() -> None:
    return None


async def _announce(settings: Settings, fleet: FleetLimiter) -> None:
    await fleet.announce()  # declares this worker's budget beside the log; warns if others differ; never raises
    log.info(
        "fleet rate limit: %g calls, %g tokens per %gs; $%g per %gs",
        settings.upstream_rpm,
        settings.upstream_tpm,
        settings.upstream_window_s,
        settings.upstream_usd_limit,
        settings.upstream_usd_window_s,
    )


def _frugal(settings: Settings, stack: contextlib.AsyncExitStack, upstream: UpstreamCaller, metrics: Metrics) -> Frugal:
    """Duplicate inputs of a call are always sent once; with CACHE_TTL_S, repeated inputs cost no call at all."""
    cache = None
    if settings.cache_ttl_s > 0:
        from worker.redis_cache import RedisVectorCache

        assert settings.cache_redis is not None
        cache = RedisVectorCache(
            settings.cache_redis.get_secret_value(),
            ttl_s=settings.cache_ttl_s,
            timeout_s=settings.cache_timeout_ms / 1000,
        )
        stack.push_async_callback(cache.aclose)
        where = "CACHE_REDIS_URL" if settings.cache_redis_url is not None else "REDIS_URL"
        log.info("embedding cache on, in %s's Redis: entries kept %gs", where, settings.cache_ttl_s)
    frugal = Frugal(upstream, metrics=metrics, cache=cache, cache_prefix=settings.redis_key_prefix)
    stack.push_async_callback(frugal.close)
    return frugal


def _embedder(settings: Settings, stack: contextlib.AsyncExitStack) -> GeminiEmbedder:
    """Built at once: its fast path needs nothing of google-genai before its first error answer (gemini.py)."""
    from worker.embedders.gemini import GeminiEmbedder

    api_key, base_url = settings.gemini_api_key, settings.gemini_base_url
    if settings.embed_backend == "emulator":
        from pydantic import SecretStr

        from worker.emulator import EmulatorThread

        emulator = EmulatorThread()
        base_url = emulator.start()
        stack.callback(emulator.stop)
        api_key = SecretStr("emulator")
        log.warning("EMBED_BACKEND=emulator: vectors are synthetic, served by the bundled emulator at %s", base_url)
    assert api_key is not None
    return GeminiEmbedder(
        api_key=api_key,
        base_url=base_url,
        timeout_s=settings.upstream_timeout_s,
        fast_path=settings.gemini_fast_path,
        max_connections=settings.max_concurrent_batches * 4,
    )


async def _start_lane(
    settings: Settings,
    values: _Values,
    stack: contextlib.AsyncExitStack,
    *,
    connection: AbstractRobustConnection,
    settler: Settler,
    publisher: Publisher,
    replies: RpcReplies,
    upstream: Frugal,
    admission: Admission,
    metrics: Metrics,
    embedder: GeminiEmbedder,
    lane_stop: asyncio.Event,
    held: HeldBytes,
) -> asyncio.Task[None] | None:
    """The deferred lane, when REDIS_URL turns it on."""
    if settings.redis_url is None or not settings.deferred_enabled:
        return None
    from worker.amqp.deferred import AmqpDeferredQueue
    from worker.deferred.rounds import SyncRounds
    from worker.deferred.scheduler import DeferredLane
    from worker.redis_store import RedisVectorStore

    config = values.deferred
    store = RedisVectorStore(
        settings.redis_url.get_secret_value(),
        settings.batch_jobs_key,
        probe_key=f"{settings.redis_key_prefix}store-probe",
    )
    stack.push_async_callback(store.aclose)
    queue = AmqpDeferredQueue(connection, settler, publisher, held.share(values.ingest_reserve))
    await _all(_warn_if_evicting(store), queue.open())
    rounds = SyncRounds(
        store,
        upstream,
        batch_max_size=config.batch_max_size,
        max_concurrent=config.max_concurrent,
        skip_unchanged=config.skip_unchanged,
        reserved_prefix=settings.redis_key_prefix,
        # What a round paid for and Redis refused waits for the retry in memory: at most half the byte budget the
        # bodies of held messages are bounded by (MAX_HELD_BYTES), on top of it.
        paid_bytes=settings.max_held_bytes // 2,
        batching=values.batching,
    )
    jobs = None
    if config.batch_api:
        from worker.deferred.jobs import JobRounds

        client = embedder.client  # the SDK's client, built now: the Batch API path needs it (it imports the SDK)
        from worker.embedders.gemini_batch import GeminiBatchJobs

        jobs = JobRounds(
            GeminiBatchJobs(client),
            store,
            queue,
            skip_unchanged=config.skip_unchanged,
            reserved_prefix=settings.redis_key_prefix,
            admission=admission,
            metrics=metrics,
        )
    lane = DeferredLane(
        queue,
        store,
        rounds,
        replies,
        limits=values.request_limits,
        config=config,
        reply_to=settings.reply_to_regex,
        jobs=jobs,
    )
    await queue.listen_for_flush(lane.request_flush)
    task = asyncio.create_task(lane.run(lane_stop))

    async def cancel() -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task

    stack.push_async_callback(cancel)
    log.info(
        "deferred lane on: flush every %.0fs or at %d messages",
        settings.deferred_flush_interval_s,
        settings.deferred_wake_messages,
    )
    return task


async def _warn_if_evicting(store: RedisVectorStore) -> None:
    """One line at start when REDIS_URL's Redis may evict keys without a TTL: the lane's job records and the hashes
    it wrote. Silent when Redis does not say (CONFIG and INFO both refused, or no answer)."""
    policy = await store.eviction_policy()
    if policy is not None and policy.startswith("allkeys-"):
        log.warning(
            "REDIS_URL's Redis has maxmemory-policy %s: when full it evicts any key, Batch API job records and the "
            "hashes the deferred lane wrote included, and that acked work is lost; give it noeviction (or "
            "volatile-lru) and an evicting cache a Redis of its own (CACHE_REDIS_URL)",
            policy,
        )


async def _drain(settings: Settings, running: _Running) -> None:
    """Stop taking work, send partial batches now, publish, settle what we hold, within the grace.

    Every step is bounded by what is left of the grace period, so a worker whose broker is unreachable
    still exits on time (the broker requeues whatever was unacked)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settings.shutdown_grace_s

    def left() -> float:
        return max(0.0, deadline - loop.time())

    consumers = running.consumers
    held = sum(consumer.inflight for consumer in consumers)
    log.info("stopping: %d requests in hand, grace %.1fs", held, settings.shutdown_grace_s)
    try:
        await asyncio.wait_for(asyncio.gather(*(c.stop() for c in consumers)), min(5.0, left()))
    except TimeoutError:
        log.warning("could not cancel the consumers in time (broker unreachable?); closing anyway")
    await running.service.close(timeout=left())
    try:
        await asyncio.wait_for(asyncio.gather(*(c.wait_idle() for c in consumers)), left())
    except TimeoutError:
        held = sum(consumer.inflight for consumer in consumers)
        log.warning("grace period over with %d requests unanswered; the broker will redeliver them", held)
    if running.lane_task is not None:
        # A round in progress finishes (write, settle); otherwise its messages go back to the queue.
        await asyncio.wait({running.lane_task}, timeout=left())
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(running.settler.drain(), max(left(), 1.0))  # the last acks, before the connection closes


async def _close_connection(connection: AbstractRobustConnection, timeout: float = 5.0) -> None:
    try:
        await asyncio.wait_for(connection.close(), timeout)
    except Exception as exc:
        log.warning("broker connection did not close cleanly (%r)", exc)
