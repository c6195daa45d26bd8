"""The fleet's rate limit (worker/redis_quota.py) against a Redis of the test's own, on a clock the test moves
(``redis_time=False``: the log's scores come from that clock too): fractional budgets and shares, the switch to the
local share and back, a flushed log, and workers whose budgets differ. Issue 17, items 1 to 4."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable

import pytest

from tests.clock import JumpingTime
from tests.conftest import OwnRedis
from worker import redis_quota
from worker.metrics import Metrics
from worker.redis_quota import FleetLimiter

pytestmark = pytest.mark.integration

WINDOW = 2.0
PREFIX = "t:"


class Fleet:
    """Limiters of one fleet on one fake clock, and every call they admit: (limiter's name, time)."""

    def __init__(self, server: OwnRedis) -> None:
        self.server = server
        self.t = JumpingTime()
        self.admitted: list[tuple[str, float]] = []
        self.errors: list[None] = []
        self.metrics: dict[str, Metrics] = {}
        self.limiters: dict[str, FleetLimiter] = {}

    def add(self, name: str, calls: float, window: float = WINDOW, tokens: float = 0) -> FleetLimiter:
        self.metrics[name] = Metrics()
        self.limiters[name] = FleetLimiter(
            self.server.url,
            prefix=PREFIX,
            calls=calls,
            tokens=tokens,
            window_s=window,
            metrics=self.metrics[name],
            clock=self.t.clock,
            sleep=self.t.sleep,
            redis_time=False,
            on_error=lambda: self.errors.append(None),
        )
        return self.limiters[name]

    async def calls(self, pattern: str, rounds: int = 1) -> None:
        """``pattern`` names the limiters in the order they call (``"ab"``: a, then b), ``rounds`` times."""
        for _ in range(rounds):
            for name in pattern:
                await self.limiters[name].acquire(1)
                self.admitted.append((name, self.t.now))

    def most_in_any_window(self, window: float = WINDOW, since: float = 0.0, until: float = float("inf")) -> int:
        """The most calls in any window ``[t, t + window)`` (1 ms of float slack) that starts in ``[since, until)``."""
        times = [at for _, at in self.admitted]
        starts = [t for t in times if since <= t < until]
        return max(sum(1 for u in times if t <= u < t + window - 1e-3) for t in starts)

    def falling_back(self, name: str) -> float:
        return float(self.metrics[name].ratelimit_fallback._value.get())

    async def aclose(self) -> None:
        for limiter in self.limiters.values():
            await limiter.aclose()


@pytest.fixture
async def fleet(own_redis: Callable[..., OwnRedis]) -> AsyncIterator[Fleet]:
    group = Fleet(own_redis())
    yield group
    await group.aclose()


# ---------------------------------------------------------------- item 1: fractions
async def test_a_share_below_one_call_is_one_call_per_stretched_window(fleet: Fleet) -> None:
    """UPSTREAM_RPM=10, the fleet seen as 20 workers, then Redis dies: half a call per 2 s is one call per 4 s,
    counting the call made through Redis just before. (It was an IndexError, and the requests dead-lettered.)"""
    fleet.add("a", calls=10)
    fleet.server.client().zadd(f"{PREFIX}fleet", {f"ghost-{i}": 0 for i in range(19)})
    await fleet.calls("a")
    fleet.server.stop()
    await fleet.calls("a", rounds=3)
    assert [at for _, at in fleet.admitted] == [0, pytest.approx(4), pytest.approx(8), pytest.approx(12)]
    assert fleet.falling_back("a") == 1


@pytest.mark.parametrize(("calls", "times"), [(2.5, [0, 0, 2, 2, 4]), (0.5, [0, 4, 8, 12, 16])])
async def test_a_fractional_fleet_budget_is_kept_in_redis(fleet: Fleet, calls: float, times: list[float]) -> None:
    """2.5 calls per window: 2 per window; 0.5: one per two windows. Through Redis (the script used to fail on
    them, which sent every call to the local share)."""
    fleet.add("a", calls=calls)
    await fleet.calls("a", rounds=5)
    assert [at for _, at in fleet.admitted] == [pytest.approx(t) for t in times]
    assert fleet.falling_back("a") == 0 and fleet.errors == []


# ---------------------------------------------------------------- item 2: switching
async def outage(fleet: Fleet) -> None:
    """Two workers, 10 calls per 2 s: Redis dies at 1 and comes back, empty, before 6 (when they try it again)."""
    fleet.add("a", calls=10)
    fleet.add("b", calls=10)
    await fleet.calls("ab", rounds=5)  # the window is full: 10 at 0
    fleet.t.at_least(1.0)
    fleet.server.stop()
    await fleet.calls("ab", rounds=5)  # each its share, 5, once its own calls at 0 have left: 10 at 2
    fleet.t.at_least(5.0)
    await fleet.calls("ab", rounds=5)  # still alone: 10 at 5
    assert fleet.falling_back("a") == fleet.falling_back("b") == 1
    fleet.server.start()
    fleet.t.at_least(6.0)
    await fleet.calls("ab", rounds=10)
    assert fleet.falling_back("a") == fleet.falling_back("b") == 0
    assert fleet.t.now <= 12  # the budget was used: 40 calls after the first window took 4 windows, and no more


async def test_no_window_overfills_when_redis_dies(fleet: Fleet) -> None:
    """Each worker's share counts the calls it made through Redis just before (it was 20 in a window of 10)."""
    await outage(fleet)
    assert fleet.most_in_any_window(until=3.0) <= 10, fleet.admitted


async def test_no_window_overfills_when_redis_comes_back(fleet: Fleet) -> None:
    """Each worker writes the calls it made alone into the fleet's (empty) log, and keeps to its share a while
    longer, since the other's calls made alone are not in the log until it is back too (it was 20 in a window)."""
    await outage(fleet)
    assert fleet.most_in_any_window(since=3.0) <= 10, fleet.admitted


async def test_a_cool_down_asked_while_redis_is_away_still_holds_once_it_is_back(fleet: Fleet) -> None:
    fleet.add("a", calls=10)
    fleet.server.stop()
    await fleet.limiters["a"].cool_down(7)
    fleet.server.start()
    await fleet.calls("a")
    assert fleet.admitted == [("a", 7.0)] and fleet.falling_back("a") == 0


# ---------------------------------------------------------------- item 3: a vanished log
async def test_a_flushed_log_is_written_again_from_each_workers_recent_calls(fleet: Fleet) -> None:
    """FLUSHDB mid-window: A finds its latest call gone, writes its recent calls again and keeps to its share for a
    while (B's lost calls are not in the log either). It was 20 in one window against 10."""
    fleet.add("a", calls=10)
    fleet.add("b", calls=10)
    await fleet.calls("ab", rounds=5)
    fleet.t.at_least(1.0)
    fleet.server.client().flushdb()
    await fleet.calls("ab", rounds=10)
    assert fleet.most_in_any_window() <= 10, fleet.admitted
    assert fleet.falling_back("a") == 0 and fleet.errors == []


# ---------------------------------------------------------------- item 4: workers that disagree
async def test_the_strictest_budget_binds_every_worker(fleet: Fleet, caplog: pytest.LogCaptureFixture) -> None:
    """A at 4 calls per window, B at 12, on one Redis: both warn, and no window holds more than 4."""
    caplog.set_level(logging.WARNING, logger=redis_quota.__name__)
    a, b = fleet.add("a", calls=4), fleet.add("b", calls=12)
    await a.announce()
    assert "differ" not in caplog.text  # alone, A agrees with itself
    await b.announce()
    assert "budgets differ" in caplog.text and "4 calls per 2s" in caplog.text and "12 calls per 2s" in caplog.text
    await fleet.calls("bbba", rounds=6)
    assert fleet.most_in_any_window() == 4, fleet.admitted
    assert sum(1 for name, _ in fleet.admitted if name == "a") == 6  # A is served too
    assert caplog.text.count("budgets differ") == 2  # B at start, A when it first saw B's (each once)


async def test_a_worker_says_when_the_fleet_agrees_again(fleet: Fleet, caplog: pytest.LogCaptureFixture) -> None:
    a, b = fleet.add("a", calls=4), fleet.add("b", calls=12)
    await a.announce()
    await b.announce()
    await fleet.calls("a")
    fleet.t.at_least(redis_quota.HEARTBEAT_TTL_MS / 1000 + 1)  # B is gone
    caplog.clear()
    caplog.set_level(logging.WARNING, logger=redis_quota.__name__)
    await fleet.calls("a")
    assert "every live worker now declares this budget" in caplog.text


async def test_a_shorter_window_never_prunes_a_longer_ones_history(fleet: Fleet) -> None:
    """A keeps 5 calls per 10 s, B 5 per 2 s: B's calls never remove A's from the log (they did: B pruned everything
    older than 2 s, and A then admitted a sixth call within its 10 s)."""
    fleet.add("a", calls=5, window=10)
    fleet.add("b", calls=5)
    await fleet.calls("a", rounds=5)
    fleet.t.at_least(3.0)
    await fleet.calls("ba")
    assert fleet.most_in_any_window(10) <= 5, fleet.admitted
    (b_name, b_at), (a_name, a_at) = fleet.admitted[-2:]
    assert (b_name, a_name) == ("b", "a") and b_at == a_at == pytest.approx(10)


# ---------------------------------------------------------------- the limiter never raises into a request
async def test_a_refused_script_falls_back_and_is_counted(fleet: Fleet, caplog: pytest.LogCaptureFixture) -> None:
    """The log's key holds something else (WRONGTYPE): the share serves, it says so, and counts it."""
    fleet.add("a", calls=10)
    fleet.server.client().set(f"{PREFIX}ratelimit:all:log", "not a sorted set")
    await fleet.calls("a", rounds=3)
    assert fleet.falling_back("a") == 1 and len(fleet.errors) == 1
    assert "WRONGTYPE" in caplog.text


async def test_a_bug_in_reading_the_reply_falls_back_too(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(raw: object) -> redis_quota.Reply:
        raise ValueError("a bug")

    monkeypatch.setattr(redis_quota.Reply, "parse", staticmethod(broken))
    fleet.add("a", calls=10)
    await fleet.calls("a", rounds=3)
    assert fleet.falling_back("a") == 1 and len(fleet.errors) == 1
    assert "ValueError: a bug" in caplog.text
