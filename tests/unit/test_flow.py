"""Flow control: adaptive concurrency, rate-limit arithmetic, circuit breaker transitions."""

from __future__ import annotations

import asyncio

import pytest

from worker.flow import AdaptiveConcurrency, CircuitBreaker, RateLimiter, _Bucket


async def test_adaptive_concurrency_halves_on_429_and_bounds_inflight() -> None:
    limit = AdaptiveConcurrency(8)
    limit.on_rate_limited()
    limit.on_rate_limited()
    assert int(limit.limit) == 2
    entered = 0
    release = asyncio.Event()

    async def call() -> None:
        nonlocal entered
        async with limit:
            entered += 1
            await release.wait()

    tasks = [asyncio.create_task(call()) for _ in range(5)]
    for _ in range(5):
        await asyncio.sleep(0)
    assert entered == 2 and limit.inflight == 2
    release.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 1)
    for _ in range(100):
        limit.on_success()
    assert limit.limit == 8  # recovers, never past the configured maximum


class FakeTime:
    """Time that moves only when someone sleeps."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_token_bucket_arithmetic() -> None:
    t = FakeTime()
    bucket = _Bucket(per_minute=60, clock=t.clock)
    assert bucket.wait_time(60) == 0.0
    bucket.level -= 60
    assert bucket.wait_time(1) == pytest.approx(1.0)  # one request per second refills
    assert bucket.wait_time(1000) == pytest.approx(60.0)  # larger than capacity: a full minute
    t.now += 30
    assert bucket.wait_time(1) == 0.0


async def test_unlimited_rate_limiter_never_waits() -> None:
    limiter = RateLimiter()
    for _ in range(1000):
        await limiter.acquire(2048)
    assert limiter.waited == 0


async def test_rate_limiter_spaces_calls_once_the_budget_is_spent() -> None:
    t = FakeTime()
    limiter = RateLimiter(requests_per_minute=120, tokens_per_minute=6000, clock=t.clock, sleep=t.sleep)
    for _ in range(120):  # the first minute's budget is there at once
        await limiter.acquire(10)
    assert t.sleeps == []
    await limiter.acquire(10)  # then one request per 0.5 s
    assert t.sleeps == [pytest.approx(0.5)]
    await limiter.acquire(3000)  # 4,840 tokens left: only the request spacing waits
    assert t.sleeps == [pytest.approx(0.5), pytest.approx(0.5)]
    await limiter.acquire(3000)  # 1,890 left: 1,110 short at 100 tokens/s
    assert t.sleeps[-1] == pytest.approx(11.1)


async def test_breaker_opens_after_threshold_probes_and_closes_on_success() -> None:
    events: list[str] = []
    breaker = CircuitBreaker(
        3, cooldown=0.01, on_open=lambda: events.append("open"), on_close=lambda: events.append("close")
    )
    breaker.failure()
    breaker.failure()
    assert events == []
    breaker.failure()
    assert events == ["open"] and breaker.is_open
    breaker.failure()  # failures while open do not re-trigger
    assert events == ["open"]
    await asyncio.sleep(0.05)  # the cooldown timer fires: half-open lets traffic through
    assert events == ["open", "close"] and not breaker.is_open
    breaker.failure()  # the probe failed: open again at once, for twice as long
    assert events == ["open", "close", "open"] and breaker.cooldown == pytest.approx(0.02)
    breaker.success()
    assert events[-1] == "close" and breaker.cooldown == pytest.approx(0.01)
