"""Flow control: adaptive concurrency, the sliding-window rate limit, circuit breaker transitions."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.flow import AdaptiveConcurrency, CircuitBreaker, RateLimiter


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


async def test_unlimited_rate_limiter_never_waits() -> None:
    limiter = RateLimiter()
    for _ in range(1000):
        await limiter.acquire(2048)
    assert limiter.waited == 0


async def test_a_full_window_waits_until_its_oldest_call_leaves() -> None:
    t = FakeTime()
    limiter = RateLimiter(3, 1000, window=60, clock=t.clock, sleep=t.sleep)
    for at in (0, 10, 20):
        t.now = at
        await limiter.acquire(100)
    t.now = 30
    await limiter.acquire(100)  # a 4th call in [0, 60): it waits for the one at 0 to leave
    assert t.sleeps == [pytest.approx(30)] and t.now == pytest.approx(60)
    await limiter.acquire(800)  # the window holds 10, 20, 60 (300 tokens): 800 more fit once the call at 10 leaves
    assert t.sleeps[-1] == pytest.approx(10)
    await limiter.acquire(1000)  # the whole budget: it waits for an empty window (until 70 has left: 60 s)
    assert t.sleeps[-1] == pytest.approx(60)


async def test_a_cool_down_holds_every_call() -> None:
    t = FakeTime()
    limiter = RateLimiter(clock=t.clock, sleep=t.sleep)
    await limiter.cool_down(7)
    await limiter.acquire(1)
    assert t.sleeps == [pytest.approx(7)]


@settings(max_examples=150, deadline=None)
@given(
    calls=st.integers(1, 8),
    budget=st.integers(50, 400),
    arrivals=st.lists(st.tuples(st.floats(0, 5), st.integers(1, 500)), min_size=1, max_size=40),
)
def test_no_rolling_window_ever_holds_more_than_the_budget(
    calls: int, budget: int, arrivals: list[tuple[float, int]]
) -> None:
    """The issue's rule, for any arrival pattern: at most ``calls`` calls and ``budget`` tokens in any window
    (a call larger than the whole budget counts as the whole budget); and no call waits longer than it must."""

    async def run() -> None:
        t = FakeTime()
        limiter = RateLimiter(calls, budget, window=10, clock=t.clock, sleep=t.sleep)
        admitted: list[tuple[float, int]] = []
        for gap, tokens in arrivals:
            t.now += gap
            await limiter.acquire(tokens)
            admitted.append((t.now, min(tokens, budget)))
        for start, _ in admitted:
            inside = [k for at, k in admitted if start <= at < start + 10]
            assert len(inside) <= calls and sum(inside) <= budget
        assert t.now <= sum(g for g, _ in arrivals) + 10 * len(arrivals)  # bounded: nobody waits forever

    asyncio.run(run())


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
