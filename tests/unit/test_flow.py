"""Flow control: adaptive concurrency, the sliding-window rate limit, circuit breaker transitions."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.clock import JumpingTime
from worker.admission import Admission
from worker.flow import AdaptiveConcurrency, CircuitBreaker, RateLimiter
from worker.lanes import Lane


async def test_adaptive_concurrency_halves_on_429_and_bounds_inflight() -> None:
    limit = AdaptiveConcurrency(8, initial=8)
    limit.on_rate_limited()
    limit.on_rate_limited()
    assert int(limit.limit) == 2
    admission = Admission(lambda: int(limit.limit), RateLimiter(), bulk_min_share=0)
    entered = 0
    release = asyncio.Event()

    async def call() -> None:
        nonlocal entered
        async with admission.call(Lane.BULK, 1):
            entered += 1
            await release.wait()

    tasks = [asyncio.create_task(call()) for _ in range(5)]
    for _ in range(20):
        await asyncio.sleep(0)
    assert entered == 2 and admission.inflight[False] == 2
    release.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 1)
    for _ in range(100):
        limit.on_success(0.1, in_flight=int(limit.limit))
    assert limit.limit == 8  # recovers while latency stays flat, never past the configured maximum


def _closed_loop(limit: AdaptiveConcurrency, latency: Callable[[int], float], calls: int) -> list[int]:
    """Calls made back to back at the limit (as a busy worker makes them): each sees the latency of as many in
    flight as the limit allows. The limit after each call."""
    seen = []
    for _ in range(calls):
        in_flight = int(limit.limit)
        limit.on_success(latency(in_flight), in_flight)
        seen.append(int(limit.limit))
    return seen


def test_with_flat_latency_the_limit_grows_to_its_ceiling() -> None:
    limit = AdaptiveConcurrency(32)
    assert int(limit.limit) == 4  # starts modest: a paid API is not probed at the ceiling
    seen = _closed_loop(limit, lambda _: 0.2, 100)
    assert seen[-1] == 32
    assert seen.index(32) < 60  # grows by about smoothing x queue_size (0.8) a call


def test_with_latency_that_rises_past_a_knee_the_limit_stays_near_it() -> None:
    """An upstream that serves 6 calls at once at full speed and shares itself past that (processor sharing):
    past the knee more calls only queue. The limit must stop well short of the ceiling, above the knee."""
    knee, base = 6, 0.1
    limit = AdaptiveConcurrency(64)
    seen = _closed_loop(limit, lambda c: base * max(1.0, c / knee), 300)
    settled = seen[100:]
    assert knee <= min(settled) and max(settled) <= 3 * knee, (min(settled), max(settled))
    assert max(seen) < 64


def test_a_light_load_teaches_the_limit_nothing() -> None:
    limit = AdaptiveConcurrency(32, initial=8)
    for _ in range(200):
        limit.on_success(0.1, in_flight=2)  # under half the limit in flight: the load keeps calls few
    assert limit.limit == 8


def test_when_the_upstream_saturates_the_limit_comes_down_and_recovers_after() -> None:
    limit = AdaptiveConcurrency(32)
    assert _closed_loop(limit, lambda _: 0.1, 100)[-1] == 32  # flat: up to the ceiling
    seen = _closed_loop(limit, lambda c: 0.1 * max(1.0, c / 4), 200)  # now it serves 4 at once at full speed
    low = min(seen)
    assert low <= 12, seen
    seen = _closed_loop(limit, lambda _: 0.1, 300)  # the saturation ends: flat again at any concurrency
    assert seen[-1] == 32


async def test_unlimited_rate_limiter_never_waits() -> None:
    t = JumpingTime()
    limiter = RateLimiter(clock=t.clock, sleep=t.sleep)
    for _ in range(1000):
        await limiter.acquire(2048)
    assert t.sleeps == []


async def test_a_full_window_waits_until_its_oldest_call_leaves() -> None:
    t = JumpingTime()
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
    t = JumpingTime()
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
        t = JumpingTime()
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


# ---------------------------------------------------------------- fractional budgets (issue 17, item 1)
def most_in_any_window(times: list[float], window: float) -> int:
    """The most of ``times`` in any half-open window ``[t, t + window)`` (1 ms of float slack)."""
    return max((sum(1 for u in times if t <= u < t + window - 1e-3) for t in times), default=0)


async def limited(limiter: RateLimiter, t: JumpingTime, calls: int, tokens: int = 1) -> list[float]:
    admitted = []
    for _ in range(calls):
        await limiter.acquire(tokens)
        admitted.append(t.now)
    return admitted


async def test_a_budget_below_one_call_admits_one_call_per_stretched_window() -> None:
    """Half a call per 2 s (a fleet's 10 shared by 20 workers) is one call per 4 s: the same rate, never a crash."""
    t = JumpingTime()
    limiter = RateLimiter(0.5, window=2, clock=t.clock, sleep=t.sleep)
    assert await limited(limiter, t, 3) == [0, pytest.approx(4), pytest.approx(8)]


async def test_a_fractional_budget_above_one_keeps_every_window_within_it() -> None:
    """2.5 calls per 60 s: never 3 in a window (the fraction is given up, never overshot)."""
    t = JumpingTime()
    limiter = RateLimiter(2.5, window=60, clock=t.clock, sleep=t.sleep)
    admitted = await limited(limiter, t, 5)
    assert most_in_any_window(admitted, 60) == 2 and admitted[-1] == pytest.approx(120)


async def test_a_token_budget_below_one_call_still_limits() -> None:
    """A share of half a token per window (TPM 10 over 20 workers): each call counts as the whole budget and waits
    for an empty window, instead of counting as nothing."""
    t = JumpingTime()
    limiter = RateLimiter(0, 0.5, window=2, clock=t.clock, sleep=t.sleep)
    assert await limited(limiter, t, 3, tokens=10) == [0, pytest.approx(2), pytest.approx(4)]


@settings(max_examples=200, deadline=None)
@given(
    calls=st.one_of(st.just(0.0), st.floats(0.05, 8)),
    budget=st.one_of(st.just(0.0), st.floats(0.5, 400)),
    arrivals=st.lists(st.tuples(st.floats(0, 5), st.integers(1, 500)), min_size=1, max_size=30),
)
def test_fractional_budgets_hold_in_every_window(
    calls: float, budget: float, arrivals: list[tuple[float, int]]
) -> None:
    """At most floor(calls) calls in any window from one call up; below one, at most one call in any window of
    ``window / calls``; at most ``budget`` tokens in any window (a call counts as at most the whole budget)."""

    async def run() -> None:
        t = JumpingTime()
        limiter = RateLimiter(calls, budget, window=10, clock=t.clock, sleep=t.sleep)
        admitted: list[tuple[float, float]] = []
        for gap, tokens in arrivals:
            t.now += gap
            await limiter.acquire(tokens)
            admitted.append((t.now, min(tokens, budget) if budget else tokens))
        times = [at for at, _ in admitted]
        if calls >= 1:
            assert most_in_any_window(times, 10) <= int(calls)
        elif calls > 0:
            assert most_in_any_window(times, 10 / calls) <= 1
        if budget:
            for start in times:
                assert sum(k for at, k in admitted if start <= at < start + 10 - 1e-3) <= budget + 1e-6
        longest = max(10.0, 10 / calls if calls else 0.0)
        assert t.now <= sum(g for g, _ in arrivals) + longest * len(arrivals)  # nobody waits forever

    asyncio.run(run())


async def test_an_internal_failure_never_reaches_the_caller(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A bug in the window's arithmetic is logged and counted; the window starts afresh once every call it held has
    left (so the budget still holds), and the call goes ahead."""
    t = JumpingTime()
    errors: list[None] = []
    limiter = RateLimiter(2, window=10, clock=t.clock, sleep=t.sleep, on_error=lambda: errors.append(None))
    await limiter.acquire(1)
    from worker.flow import SlidingWindow

    def broken(self: SlidingWindow, now: float, tokens: float) -> float:
        monkeypatch.undo()  # fails once
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(SlidingWindow, "_wait_time", broken)
    await limiter.acquire(1)
    assert t.sleeps == [pytest.approx(10)] and len(errors) == 1
    assert "rate limit" in caplog.text and "ZeroDivisionError" in caplog.text


# ---------------------------------------------------------------- budget settings are checked at start
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"upstream_rpm": float("inf")}, "finite"),
        ({"upstream_tpm": float("inf")}, "finite"),
        ({"upstream_window_s": float("inf")}, "finite"),
        ({"upstream_window_s": 100_000}, "UPSTREAM_WINDOW_S"),
        ({"upstream_tpm": 0.5}, "UPSTREAM_TPM"),
        ({"upstream_rpm": 0.001}, "UPSTREAM_RPM"),  # one call every 16 hours: an outage, not a budget
    ],
)
def test_budgets_that_make_no_sense_are_refused_at_start(overrides: dict[str, float], message: str) -> None:
    from pydantic import ValidationError

    from worker.settings import Settings

    with pytest.raises(ValidationError, match=message):
        Settings.model_validate({"embed_backend": "emulator", **overrides})  # the values alone: no env, no .env


def test_fractional_budgets_are_accepted() -> None:
    from worker.settings import Settings

    for rpm in (2.5, 0.5):
        assert Settings(_env_file=None, embed_backend="emulator", upstream_rpm=rpm).upstream_rpm == rpm  # type: ignore[call-arg]
