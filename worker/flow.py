"""Flow control towards a paid, rate-limited API: pure asyncio, no transport or SDK imports.

- ``RateLimiter``: client-side requests-, tokens- and dollars-per-window budgets over exact sliding windows, and
  the API's cool-downs, for one process (``redis_quota.FleetLimiter`` shares the same budget across a fleet).
- ``AdaptiveConcurrency``: how many upstream calls may run at once, found from their latency (after Netflix's
  Gradient2): it grows while latency stays flat, settles where it starts to rise, and halves on a 429
  (``admission.py`` waits for a slot under it, in lane order).
- ``CircuitBreaker``: after ``threshold`` consecutive failed calls it *opens* (the worker pauses
  consuming, so the queue keeps the work instead of draining it into errors); after ``cooldown``
  it lets traffic through again, and a success closes it while a failure reopens it for twice as long.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable

from worker.ports import Unaffordable

log = logging.getLogger(__name__)

MICRO_USD = 1_000_000  # a spend budget counts millionths of a dollar, as whole "tokens" of its window


def call_rule(calls: float, window: float) -> tuple[int, float]:
    """A budget of ``calls`` per ``window`` (any positive number) as whole calls per window that never exceed its
    rate: from one call up, ``floor(calls)`` per ``window`` (2.5 per minute: 2 per minute; no rolling window ever
    holds more than the budget); below one call, one call per ``window / calls`` (half a call per 2 s: one per 4 s).
    0 = no limit. ``redis_quota`` applies the same rule to the fleet's budget."""
    if calls <= 0:
        return 0, window
    if calls < 1:
        return 1, window / calls
    return math.floor(calls), window


class SlidingWindow:
    """The calls of the last ``window`` seconds and their tokens, exactly. A token bucket that starts full lets
    nearly twice its budget through in its first window; this log never lets any rolling window hold more.
    Call budgets follow ``call_rule``; a call larger than the whole token budget counts as the whole budget (it waits
    for an empty window instead of forever)."""

    def __init__(
        self, calls: float, tokens: float, window: float, *, on_error: Callable[[], None] | None = None
    ) -> None:
        self.calls, self.calls_window = call_rule(calls, window)  # 0 = no limit
        self.tokens = tokens  # 0 = no limit
        self.window = window
        self.horizon = max(window, self.calls_window)  # how long a call stays in the log
        self._on_error = on_error
        self._log: deque[tuple[float, float]] = deque()  # (time, tokens), oldest first
        self._used = 0.0  # tokens in the log

    def clamp(self, tokens: float) -> float:
        return min(tokens, self.tokens) if self.tokens else tokens

    def wait_time(self, now: float, tokens: float) -> float:
        """Seconds until one more call of ``tokens`` fits; 0 if it fits now. Never raises: after an internal error
        the log starts afresh once every call it held has left (``horizon`` seconds), so the budget still holds."""
        try:
            return self._wait_time(now, tokens)
        except Exception:
            log.exception("rate limit: internal error; the window starts afresh in %.1fs", self.horizon)
            if self._on_error is not None:
                self._on_error()
            self._log.clear()
            self._used = 0.0
            return self.horizon

    def _wait_time(self, now: float, tokens: float) -> float:
        entries = self._log
        while entries and entries[0][0] <= now - self.horizon:
            self._used -= entries.popleft()[1]
        if not entries:
            self._used = 0.0  # no float drift carried into the next window
        return max(0.0, self._calls_wait(now), self._tokens_wait(now, tokens))

    def _calls_wait(self, now: float) -> float:
        """Every call in the log is within ``calls_window`` (the horizon, when calls are limited)."""
        if not self.calls or len(self._log) < self.calls:
            return 0.0
        return self._log[len(self._log) - self.calls][0] + self.calls_window - now  # until enough have left

    def _tokens_wait(self, now: float, tokens: float) -> float:
        if not self.tokens:
            return 0.0
        older = 0  # calls in the log but out of the token window (the horizon is longer when calls < 1)
        used = self._used
        for stamp, spent in self._log:
            if stamp > now - self.window:
                break
            used -= spent
            older += 1
        excess = used + self.clamp(tokens) - self.tokens
        wait = 0.0
        for stamp, spent in itertools.islice(self._log, older, None):  # the oldest must leave until the excess has
            if excess <= 0:
                break
            excess -= spent
            wait = stamp + self.window - now
        return wait

    def record(self, now: float, tokens: float) -> None:
        tokens = self.clamp(tokens)
        self._log.append((now, tokens))
        self._used += tokens

    def seed(self, calls: Iterable[tuple[float, float]]) -> None:
        """Calls made before this log existed (``(time, tokens)``), so that a window straddling its start counts
        them too."""
        merged = sorted([*self._log, *((at, self.clamp(tokens)) for at, tokens in calls)])
        self._log = deque(merged)
        self._used = sum(tokens for _, tokens in merged)


class RateLimiter:
    """``ports.Limiter`` for one process: UPSTREAM_RPM/UPSTREAM_TPM over a sliding window, UPSTREAM_USD_LIMIT over
    a window of its own (``usd``, ``usd_window``), and the API's cool-downs. Callers are served in arrival order;
    the order between lanes is ``admission.Admission``'s, which lets one call at a time wait here and withdraws a
    bulk call (cancelling its wait, nothing counted) when a query comes. ``on_error`` is told of each internal
    error (logged, and survived: see ``SlidingWindow.wait_time``)."""

    def __init__(
        self,
        requests_per_window: float = 0,
        tokens_per_window: float = 0,
        *,
        window: float = 60.0,
        usd: float = 0.0,
        usd_window: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        on_error: Callable[[], None] | None = None,
    ):
        limited = requests_per_window > 0 or tokens_per_window > 0
        self._window = (
            SlidingWindow(requests_per_window, tokens_per_window, window, on_error=on_error) if limited else None
        )
        # Spend as "tokens" of a window of its own, in millionths of a dollar (as redis_quota counts it).
        self._spend = SlidingWindow(0, usd * MICRO_USD, usd_window, on_error=on_error) if usd > 0 else None
        self._clock = clock
        self._sleep = sleep
        self._lock = asyncio.Lock()
        self._cool_until = 0.0

    async def acquire(
        self, tokens: int, *, usd: float = 0.0, urgent: bool = True, deadline: float | None = None
    ) -> None:
        if self._window is None and self._spend is None and self._cool_until <= self._clock():
            return
        micro = round(usd * MICRO_USD)
        async with self._lock:
            while True:
                now = self._clock()
                wait = max(
                    self._cool_until - now,
                    self._window.wait_time(now, tokens) if self._window else 0.0,
                    self._spend.wait_time(now, micro) if self._spend else 0.0,
                )
                if wait <= 0:
                    break
                if deadline is not None and now + wait > deadline:
                    raise Unaffordable(wait)
                await self._sleep(wait)
            now = self._clock()
            if self._window is not None:
                self._window.record(now, tokens)
            if self._spend is not None:
                self._spend.record(now, micro)

    async def cool_down(self, seconds: float) -> None:
        """The API asked for a pause (a 429's RetryInfo): no call of this process starts before it ends."""
        self._cool_until = max(self._cool_until, self._clock() + seconds)


class AdaptiveConcurrency:
    """How many upstream calls may run at once (``admission.Admission`` keeps to it), found from measured latency.

    After Netflix concurrency-limits' Gradient2 (``Gradient2Limit._update``): each successful call's latency is a
    sample; the long-term latency is its exponential average over ``long_window`` samples (a plain mean over the
    first 10; it rises ten times slower than it falls, our one change), the short-term one the sample itself.
    ``gradient = clamp(long / short, 0.5, 1)``: 1 while latency stays flat, below 1 as calls start to queue
    upstream (or in this process). The limit moves towards
    ``limit x gradient + queue_size``, by ``smoothing`` of the way per sample, so it grows by about
    ``smoothing x queue_size`` per call while latency is flat and settles where queueing begins (the knee). As in
    Gradient2, it does not grow while fewer than half of its calls are in flight (nothing to learn, the load is
    too light), and a long average far above the short one (a past overload) decays faster.
    Beside latency, a 429 or a 503 (the API saying slow down) halves the limit at once, as AIMD and Vegas do.
    ``max_limit`` is MAX_CONCURRENT_BATCHES, a ceiling; the RPM/TPM/spend budgets still bound the calls."""

    def __init__(
        self,
        max_limit: int,
        *,
        initial: int = 4,
        min_limit: int = 1,
        smoothing: float = 0.2,
        queue_size: float = 4.0,
        long_window: int = 600,
    ):
        self.max_limit = max_limit
        self.min_limit = min(min_limit, max_limit)
        self.limit = float(max(self.min_limit, min(initial, max_limit)))
        self.long_rtt = 0.0  # seconds; 0 until the first sample
        self._samples = 0
        self._smoothing = smoothing
        self._queue_size = queue_size
        self._long_window = long_window

    def on_rate_limited(self) -> None:
        before = int(self.limit)
        self._set(self.limit / 2)
        if before != int(self.limit):
            log.warning("the API asks to slow down: upstream concurrency lowered to %d", int(self.limit))

    def on_success(self, rtt: float | None = None, in_flight: int | None = None) -> None:
        """A call succeeded after ``rtt`` seconds, with ``in_flight`` calls running (itself included) when it
        started. Without a measurement (a test, a cached answer), nothing is learnt."""
        if rtt is None or rtt <= 0:
            return
        self._samples += 1
        warmup = 10
        if self._samples <= warmup:
            self.long_rtt += (rtt - self.long_rtt) / self._samples
        else:
            weight = 2 / (self._long_window + 1)
            if rtt > self.long_rtt:
                # Gradient2's baseline follows every sample, so the queueing it allows raises its own baseline and
                # the limit creeps up with it (measured against a saturating emulator: the baseline 78 -> 170 ms and
                # the limit 16 -> 32 over 1,200 calls). Rising ten times slower than it falls keeps the knee in view
                # and still lets a lasting change of the upstream's latency in, over a few thousand calls.
                weight /= 10
            self.long_rtt += (rtt - self.long_rtt) * weight
        if self.long_rtt / rtt > 2:  # latency is back to normal after an overload: let the baseline follow
            self.long_rtt *= 0.9
        if in_flight is not None and in_flight < self.limit / 2:
            return  # app-limited: the load, not the upstream, keeps calls few
        gradient = max(0.5, min(1.0, self.long_rtt / rtt))
        target = self.limit * gradient + self._queue_size
        self._set(self.limit * (1 - self._smoothing) + target * self._smoothing)

    def _set(self, limit: float) -> None:
        self.limit = max(float(self.min_limit), min(float(self.max_limit), limit))


class CircuitBreaker:
    def __init__(
        self,
        threshold: int,
        cooldown: float,
        on_open: Callable[[], None],
        on_close: Callable[[], None],
        max_cooldown: float = 300.0,
    ):
        self.threshold = threshold
        self.base_cooldown = cooldown
        self.cooldown = cooldown
        self.max_cooldown = max_cooldown
        self._on_open = on_open
        self._on_close = on_close
        self.failures = 0
        self.is_open = False
        self._probe: asyncio.TimerHandle | None = None

    def success(self) -> None:
        self.failures = 0
        self.cooldown = self.base_cooldown
        if self.is_open:
            self._close()

    def failure(self) -> None:
        self.failures += 1
        if self.threshold and self.failures >= self.threshold and not self.is_open and self._probe is None:
            self.is_open = True
            log.warning(
                "upstream failing (%d calls in a row): pausing consumption for %.1fs", self.failures, self.cooldown
            )
            self._on_open()
            self._probe = asyncio.get_running_loop().call_later(self.cooldown, self._half_open)

    def trip(self) -> None:
        """Open now, whatever the count: the failure is one that every next call would repeat."""
        self.failures = max(self.failures, self.threshold - 1)
        self.failure()

    def _half_open(self) -> None:
        """Let traffic through again; the next call decides. One more failure re-opens at once."""
        self._probe = None
        self.cooldown = min(self.max_cooldown, self.cooldown * 2)
        self.failures = self.threshold - 1
        self._close()

    def _close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            self._probe = None
        if self.is_open:
            self.is_open = False
            log.warning("resuming consumption")
            self._on_close()
