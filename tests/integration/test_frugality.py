"""Spending the quota once, against real Redis and RabbitMQ: one rate limit for a fleet, a shared cool-down,
a fallback when Redis is away, the embedding cache in both lanes, and no duplicate input in a call."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from tests.conftest import OwnRedis
from tests.fakes import FakeEmbedder
from tests.integration.helpers import RawCaller, assert_right_vectors
from worker.backoff import Backoff
from worker.client import EmbedClient
from worker.emulator import EmulatorState
from worker.frugal import Frugal, cache_key
from worker.messages import EmbedConfig
from worker.metrics import Metrics
from worker.redis_cache import RedisVectorCache
from worker.redis_quota import FleetLimiter
from worker.upstream import RetryPolicy, UpstreamCaller

pytestmark = pytest.mark.integration


def fleet(
    redis_url: str, prefix: str, calls: float, window_s: float, *, tokens: float = 0, admitted: list[int] | None = None
) -> FleetLimiter:
    return FleetLimiter(
        redis_url,
        prefix=prefix,
        calls=calls,
        tokens=tokens,
        window_s=window_s,
        metrics=Metrics(),
        on_admit=admitted.append if admitted is not None else None,
    )


async def test_two_processes_share_one_budget(redis_url: str) -> None:
    """Two limiters (two processes' worth) drawing from one window: together never more than the budget."""
    prefix = f"test:{uuid.uuid4().hex[:8]}:"
    admitted: list[int] = []  # the Redis server's own time (ms) of each admission: no clock of ours involved
    a = fleet(redis_url, prefix, calls=4, window_s=1.0, admitted=admitted)
    b = fleet(redis_url, prefix, calls=4, window_s=1.0, admitted=admitted)
    await asyncio.gather(*(limiter.acquire(10) for limiter in [a, b] * 6))
    admitted.sort()
    assert len(admitted) == 12
    assert all(admitted[i + 4] - admitted[i] >= 1000 for i in range(len(admitted) - 4)), admitted  # 5 never fit
    await a.aclose()
    await b.aclose()


async def test_a_token_budget_is_shared_too(redis_url: str) -> None:
    prefix = f"test:{uuid.uuid4().hex[:8]}:"
    a, b = fleet(redis_url, prefix, 0, 1.0, tokens=100), fleet(redis_url, prefix, 0, 1.0, tokens=100)
    started = time.monotonic()
    await asyncio.gather(a.acquire(60), b.acquire(60))  # 120 tokens: the second waits for the first to leave
    assert time.monotonic() - started >= 0.95
    await a.aclose()
    await b.aclose()


async def test_a_cool_down_seen_by_one_pauses_all(redis_url: str) -> None:
    prefix = f"test:{uuid.uuid4().hex[:8]}:"
    a, b = fleet(redis_url, prefix, calls=100, window_s=60), fleet(redis_url, prefix, calls=100, window_s=60)
    await a.cool_down(0.6)  # a 429 with RetryInfo, seen by a
    started = time.monotonic()
    await b.acquire(1)
    assert time.monotonic() - started >= 0.55
    await a.aclose()
    await b.aclose()


async def test_without_redis_a_process_keeps_to_its_share_and_keeps_working() -> None:
    metrics = Metrics()
    limiter = FleetLimiter(
        "redis://127.0.0.1:9/0", prefix="x:", calls=3, tokens=0, window_s=60, metrics=metrics, timeout_s=0.1
    )
    for _ in range(3):
        await asyncio.wait_for(limiter.acquire(1), 5)  # falls back at once, the whole budget (no fleet size seen)
    assert metrics.ratelimit_fallback._value.get() == 1
    with pytest.raises(TimeoutError):  # the fourth call in the window waits, as the share says
        await asyncio.wait_for(limiter.acquire(1), 0.5)
    await limiter.aclose()


async def test_repeated_and_duplicate_texts_cost_no_calls(
    start_worker: Any, vhost: str, redis_url: str, emulator_state: EmulatorState
) -> None:
    prefix = f"test:{uuid.uuid4().hex[:8]}:"
    # A batch waits 2 s for company: the 60 requests are published well within it, so they share one call however
    # loaded the machine is (at 50 ms, a busy CI split them over two calls, the second before the cache held it).
    await start_worker(redis_url=redis_url, redis_key_prefix=prefix, cache_ttl_s=60, batch_max_wait_ms=2000)
    async with RawCaller(vhost) as caller:
        cids = [await caller.send({"text": "what is retrieval augmented generation?"}) for _ in range(60)]
        for cid in cids:
            assert_right_vectors(await caller.reply(cid), ["what is retrieval augmented generation?"])
        assert emulator_state.texts == 1  # 60 identical requests arriving together: one input upstream
        texts = [f"rag query {i}" for i in range(10)]
        first = await asyncio.gather(*[caller.call({"texts": texts[:5]}), caller.call({"texts": texts})])
        sent = emulator_state.texts
        again = await caller.call({"texts": texts})  # a minute later, say: all from the cache
        other = await caller.call({"texts": texts[:2], "task_type": "RETRIEVAL_QUERY"})  # another config: no hit
    assert_right_vectors(first[1], texts) and assert_right_vectors(again, texts)
    assert_right_vectors(other, texts[:2], task_type="RETRIEVAL_QUERY")
    assert sent == 11 and emulator_state.texts == 13


async def test_the_deferred_lane_uses_the_same_cache(
    start_worker: Any, vhost: str, redis_url: str, emulator_state: EmulatorState
) -> None:
    prefix = f"test:{uuid.uuid4().hex[:8]}:"
    await start_worker(
        redis_url=redis_url,
        redis_key_prefix=prefix,
        cache_ttl_s=60,
        deferred_flush_interval_s=3600,
        deferred_wake_messages=0,
    )
    async with EmbedClient(vhost, timeout=30) as client:
        await client.embed(["shared text"], task_type="RETRIEVAL_DOCUMENT")  # the RPC lane pays for it once
        calls = emulator_state.calls
        await client.defer([(f"doc:{uuid.uuid4().hex}", "shared text")], task_type="RETRIEVAL_DOCUMENT")
        assert await client.flush() == 1
    assert emulator_state.calls == calls  # the deferred lane found it in the cache


async def test_a_dead_cache_never_fails_a_request(
    start_worker: Any, vhost: str, emulator_state: EmulatorState, redis_url: str
) -> None:
    worker = await start_worker(
        redis_url="redis://127.0.0.1:9/0", cache_ttl_s=60, deferred_enabled=False, cache_timeout_ms=50
    )
    async with RawCaller(vhost) as caller:
        assert_right_vectors(await caller.call({"text": "no cache today"}), ["no cache today"])
        assert_right_vectors(await caller.call({"text": "no cache today"}), ["no cache today"])
    assert emulator_state.texts == 2 and worker.settings.cache_ttl_s == 60


async def test_an_oversized_cache_value_is_a_miss_and_the_cache_stays_on(own_redis: Callable[..., OwnRedis]) -> None:
    """64 MB at one input's key: the read fetches no more than a vector's worth of it and calls it a miss, on time,
    so the cache is not turned off for everyone else (it was: every read timed out). So is a key of another type."""
    server = own_redis()  # a Redis of this test's own: it writes a 64 MB value, which is no one else's business
    config = EmbedConfig("gemini-embedding-001", None, 256)
    metrics = Metrics()
    upstream = UpstreamCaller(FakeEmbedder(), RetryPolicy(2, Backoff(0.001, 0.002)), metrics=metrics)
    cache = RedisVectorCache(server.url, ttl_s=60, timeout_s=0.5)
    layer = Frugal(upstream, metrics=metrics, cache=cache, cache_prefix="t:")
    server.client().set(cache_key("t:", config, "huge"), b"\x00" * (64 << 20))
    server.client().rpush(cache_key("t:", config, "a list"), b"x")
    texts = ["huge", "a list", "fine"]
    await layer.embed(["fine"], config)
    await layer.close()  # "fine" is cached now
    assert await cache.get_many([cache_key("t:", config, t) for t in texts[:2]]) == [None, None]
    outcomes = await layer.embed(texts, config)
    assert all(isinstance(o, np.ndarray) and o.shape == (256,) for o in outcomes)
    assert metrics.cache_errors._value.get() == 0 and metrics.cache_hits._value.get() == 1
    await layer.close()
    await cache.aclose()
