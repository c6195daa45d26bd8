"""Composition root: build every part from one ``Settings`` and run the worker until told to stop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

from pydantic import SecretStr

from worker.amqp import AmqpConfig, AmqpTransport
from worker.deferred import DeferredConfig, DeferredLane
from worker.embedders.gemini import GeminiEmbedder
from worker.embedders.gemini_batch import GeminiBatchJobs
from worker.emulator import EmulatorThread
from worker.flow import AdaptiveConcurrency, CircuitBreaker, RateLimiter
from worker.messages import RequestLimits
from worker.metrics import Metrics
from worker.metrics import serve as serve_metrics
from worker.redis_store import RedisVectorStore
from worker.service import BatchingConfig, EmbedService
from worker.settings import Settings
from worker.upstream import RetryPolicy, UpstreamCaller

log = logging.getLogger(__name__)


def amqp_config(settings: Settings, name: str = "embed-worker") -> AmqpConfig:
    return AmqpConfig(
        url=settings.amqp_url.get_secret_value(),
        prefetch=settings.effective_prefetch,
        queue_type=settings.queue_type,
        delivery_limit=settings.delivery_limit,
        ca_file=settings.amqp_ca_file,
        cert_file=settings.amqp_cert_file,
        key_file=settings.amqp_key_file,
        connection_name=name,
        reconnect_interval=settings.amqp_reconnect_interval_s,
    )


def request_limits(settings: Settings) -> RequestLimits:
    return RequestLimits(
        default_model=settings.gemini_model,
        models=settings.models,
        max_body_bytes=settings.max_body_bytes,
        max_texts=settings.max_texts_per_request,
        max_tokens_per_text=settings.max_tokens_per_text,
    )


def deferred_config(settings: Settings) -> DeferredConfig:
    return DeferredConfig(
        batch_max_size=settings.deferred_batch_max_size,
        max_concurrent=settings.deferred_max_concurrent_batches,
        max_messages=settings.deferred_max_messages,
        flush_interval_s=settings.deferred_flush_interval_s,
        wake_depth=settings.deferred_wake_messages,
        poll_s=settings.deferred_poll_s,
        skip_unchanged=settings.deferred_skip_unchanged,
        batch_api=settings.deferred_batch_api,
        batch_api_poll_s=settings.deferred_batch_api_poll_s,
    )


def build_service(
    settings: Settings, upstream: UpstreamCaller, transport: AmqpTransport, metrics: Metrics
) -> EmbedService:
    return EmbedService(
        upstream,
        transport,
        limits=request_limits(settings),
        batching=BatchingConfig(
            max_size=settings.batch_max_size,
            max_wait_s=settings.batch_max_wait_ms / 1000,
            max_concurrent=settings.max_concurrent_batches,
        ),
        reply_to=settings.reply_to_regex,
        metrics=metrics,
        check_callers=settings.check_callers,
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

    emulator: EmulatorThread | None = None
    api_key, base_url = settings.gemini_api_key, settings.gemini_base_url
    if settings.embed_backend == "emulator":
        emulator = EmulatorThread()
        base_url = emulator.start()
        api_key = SecretStr("emulator")
        log.warning("EMBED_BACKEND=emulator: vectors are synthetic, served by the bundled emulator at %s", base_url)
    assert api_key is not None
    embedder = GeminiEmbedder(
        api_key=api_key,
        base_url=base_url,
        timeout_s=settings.upstream_timeout_s,
        fast_path=settings.gemini_fast_path,
        max_connections=settings.max_concurrent_batches * 4,
    )
    transport = AmqpTransport(amqp_config(settings))
    metrics = Metrics()
    metrics.inflight.set_function(lambda: transport.inflight)
    metrics.paused.set_function(lambda: int(transport.paused))
    metrics.ready.set_function(lambda: int(transport.ready))
    upstream = UpstreamCaller(
        embedder,
        RetryPolicy(
            max_attempts=settings.retry_max_attempts,
            base_delay=settings.retry_base_delay_ms / 1000,
            max_delay=settings.retry_max_delay_ms / 1000,
        ),
        rate_limiter=RateLimiter(settings.upstream_rpm, settings.upstream_tpm),
        concurrency=AdaptiveConcurrency(settings.max_concurrent_batches),
        breaker=CircuitBreaker(
            settings.breaker_failures, settings.breaker_cooldown_s, on_open=transport.pause, on_close=transport.resume
        ),
        metrics=metrics,
    )
    service = build_service(settings, upstream, transport, metrics)
    health = None
    if settings.metrics_port is not None:
        health = await serve_metrics(metrics, lambda: transport.ready, settings.metrics_host, settings.metrics_port)
    for warning in settings.prefetch_warnings():
        log.warning(warning)
    lane, store, lane_task = None, None, None
    lane_stop = asyncio.Event()
    if settings.redis_url is not None and settings.deferred_enabled:
        store = RedisVectorStore(settings.redis_url.get_secret_value(), settings.deferred_batch_api_jobs_key)
        lane = DeferredLane(
            transport,
            store,
            upstream,
            transport,
            limits=request_limits(settings),
            config=deferred_config(settings),
            reply_to=settings.reply_to_regex,
            jobs=GeminiBatchJobs(embedder.client) if settings.deferred_batch_api else None,
        )
    try:
        log.info("connecting to %s", settings.amqp_url_redacted)
        await transport.connect()
        await transport.start_consuming(service.handle)
        if lane is not None:
            await transport.consume_flush_requests(lane.request_flush)
            lane_task = asyncio.create_task(lane.run(lane_stop))
            log.info(
                "deferred lane on: flush every %.0fs or at %d messages",
                settings.deferred_flush_interval_s,
                settings.deferred_wake_messages,
            )
        log.info(
            "ready: batch size %d, max wait %.0f ms, %d concurrent batches, prefetch %d, model %s",
            settings.batch_max_size,
            settings.batch_max_wait_ms,
            settings.max_concurrent_batches,
            settings.effective_prefetch,
            settings.gemini_model,
        )
        if ready is not None:
            ready.set()
        await stop.wait()
        lane_stop.set()
        await _drain(settings, transport, service)
        if lane_task is not None:
            # A round in progress finishes (write, ack); otherwise its messages go back to the queue.
            await asyncio.wait({lane_task}, timeout=settings.shutdown_grace_s)
    finally:
        if lane_task is not None and not lane_task.done():
            lane_task.cancel()
        if store is not None:
            await store.aclose()
        if health is not None:
            health.close()
        await transport.close()
        await embedder.aclose()
        if emulator is not None:
            emulator.stop()
        log.info("stopped")


async def _drain(settings: Settings, transport: AmqpTransport, service: EmbedService) -> None:
    """Stop taking work, send partial batches now, publish and ack what we hold, within the grace.

    Every step is bounded by what is left of the grace period, so a worker whose broker is unreachable
    still exits on time (the broker requeues whatever was unacked)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settings.shutdown_grace_s

    def left() -> float:
        return max(0.0, deadline - loop.time())

    log.info("stopping: %d requests in hand, grace %.1fs", transport.inflight, settings.shutdown_grace_s)
    try:
        await asyncio.wait_for(transport.stop_consuming(), min(5.0, left()))
    except TimeoutError:
        log.warning("could not cancel the consumer in time (broker unreachable?); closing anyway")
    await service.close(timeout=left())
    try:
        await asyncio.wait_for(transport.wait_idle(), left())
    except TimeoutError:
        log.warning("grace period over with %d requests unanswered; the broker will redeliver them", transport.inflight)
