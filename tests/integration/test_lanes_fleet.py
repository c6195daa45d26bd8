"""The lane order and the spend cap across a fleet (worker/redis_quota.py, issue 18): two workers' limiters on one
Redis of the test's own, on a clock the test moves (``redis_time=False``)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from tests.clock import ManualTime
from tests.conftest import OwnRedis
from worker.metrics import Metrics
from worker.redis_quota import FleetLimiter

pytestmark = pytest.mark.integration


@pytest.fixture
async def limiters(own_redis: Callable[..., OwnRedis]) -> AsyncIterator[Callable[..., FleetLimiter]]:
    server = own_redis()
    made: list[FleetLimiter] = []

    def make(t: ManualTime, on_admit: Callable[[int], None] | None = None, **budget: float) -> FleetLimiter:
        limiter = FleetLimiter(
            server.url,
            prefix="lanes:",
            calls=budget.get("calls", 0),
            tokens=0,
            window_s=10,
            usd=budget.get("usd", 0),
            usd_window_s=10,
            metrics=Metrics(),
            clock=t.clock,
            sleep=t.sleep,
            redis_time=False,
            on_admit=on_admit,
        )
        made.append(limiter)
        return limiter

    yield make
    for limiter in made:
        await limiter.aclose()


async def test_a_query_on_one_worker_goes_before_bulk_waiting_on_another(
    limiters: Callable[..., FleetLimiter],
) -> None:
    """One call per 10 s for the fleet. Worker A's bulk call waits for the window; worker B's query comes 3 s later
    and still gets the next call; A's goes in the window after."""
    t = ManualTime()
    order: list[tuple[str, float]] = []  # as Redis admitted them: (worker, the log's time)
    a = limiters(t, calls=1, on_admit=lambda ms: order.append(("a", ms / 1000)))
    b = limiters(t, calls=1, on_admit=lambda ms: order.append(("b", ms / 1000)))

    await a.acquire(1, urgent=False)
    bulk = asyncio.create_task(a.acquire(1, urgent=False))
    await t.sleeping(1)  # told to wait for the window
    await t.advance(3)
    query = asyncio.create_task(b.acquire(1, urgent=True))
    await t.sleeping(2)
    await t.run_until_done(bulk, query)
    assert [name for name, _ in order] == ["a", "b", "a"]  # the query first, though the bulk call waited longer
    assert order[1][1] >= 10 and order[2][1] >= order[1][1] + 10


async def test_the_fleets_spend_window_holds_across_workers(limiters: Callable[..., FleetLimiter]) -> None:
    """UPSTREAM_USD_LIMIT $1 per 10 s for the fleet: $0.60 on A, then $0.60 on B waits until A's has left the
    window; $0.30 more fits beside it."""
    t = ManualTime()
    a, b = limiters(t, usd=1.0), limiters(t, usd=1.0)
    admitted: list[tuple[str, float]] = []

    async def call(name: str, limiter: FleetLimiter, usd: float) -> None:
        await limiter.acquire(1, usd=usd)
        admitted.append((name, t.now))

    await call("a", a, 0.6)
    second = asyncio.create_task(call("b", b, 0.6))
    await t.sleeping(1)
    await t.advance(4)
    await t.sleeping(1)
    assert admitted == [("a", 0)]  # B waits: $1.20 would be in the window
    await t.run_until_done(second)
    await call("a-small", a, 0.3)
    assert admitted == [("a", 0), ("b", pytest.approx(10)), ("a-small", pytest.approx(10))]
