"""Flow control towards a paid, rate-limited API: pure asyncio, no transport or SDK imports.

- ``RateLimiter``: client-side requests- and tokens-per-window budgets over an exact sliding window, and the
  API's cool-downs, for one process (``redis_quota.FleetLimiter`` shares the same budget across a fleet).
- ``AdaptiveConcurrency``: additive-increase / multiplicative-decrease of concurrent upstream calls;
  each 429 halves the limit, each success grows it back by about one per round of calls.
- ``CircuitBreaker``: after ``threshold`` consecutive failed calls it *opens* (the worker pauses
  consuming, so the queue keeps the work instead of draining it into errors); after ``cooldown``
  it lets traffic through again, and a success closes it while a failure reopens it for twice as long.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from types import TracebackType

log = logging.getLogger(__name__)


class SlidingWindow:
    """The calls of the last ``window`` seconds and their tokens, exactly. A token bucket that starts full lets
    nearly twice its budget through in its first window; this log never lets any rolling window hold more."""

    def __init__(self, calls: float, tokens: float, window: float):
        self.calls = calls  # 0 = no limit
        self.tokens = tokens  # 0 = no limit
        self.window = window
        self._log: deque[tuple[float, int]] = deque()  # (time, tokens), oldest first
        self._used = 0

    def clamp(self, tokens: int) -> int:
        """A single call larger than the whole token budget counts as the whole budget (it waits for an empty
        window instead of forever)."""
        return min(tokens, int(self.tokens)) if self.tokens else tokens

    def wait_time(self, now: float, tokens: int) -> float:
        """Seconds until one more call of ``tokens`` fits; 0 if it fits now."""
        log = self._log
        while log and log[0][0] <= now - self.window:
            self._used -= log.popleft()[1]
        wait = 0.0
        if self.calls and len(log) >= self.calls:  # fits once the (len - calls + 1) oldest have left the window
            wait = log[len(log) - int(self.calls)][0] + self.window - now
        tokens = self.clamp(tokens)
        if self.tokens and self._used + tokens > self.tokens:
            excess = self._used + tokens - self.tokens
            for stamp, spent in log:  # the oldest calls must leave until the excess has
                excess -= spent
                if excess <= 0:
                    wait = max(wait, stamp + self.window - now)
                    break
        return max(0.0, wait)

    def record(self, now: float, tokens: int) -> None:
        tokens = self.clamp(tokens)
        self._log.append((now, tokens))
        self._used += tokens


class RateLimiter:
    """``ports.Limiter`` for one process: UPSTREAM_RPM/UPSTREAM_TPM over a sliding window, and the API's cool-downs."""

    def __init__(
        self,
        requests_per_window: float = 0,
        tokens_per_window: float = 0,
        *,
        window: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ):
        limited = requests_per_window > 0 or tokens_per_window > 0
        self._window = SlidingWindow(requests_per_window, tokens_per_window, window) if limited else None
        self._clock = clock
        self._sleep = sleep
        self._lock = asyncio.Lock()
        self._cool_until = 0.0
        self.waited = 0.0

    async def acquire(self, tokens: int) -> None:
        if self._window is None and self._cool_until <= self._clock():
            return
        async with self._lock:  # FIFO: callers are served in arrival order
            while True:
                now = self._clock()
                wait = max(self._cool_until - now, self._window.wait_time(now, tokens) if self._window else 0.0)
                if wait <= 0:
                    break
                self.waited += wait
                await self._sleep(wait)
            if self._window is not None:
                self._window.record(self._clock(), tokens)

    async def cool_down(self, seconds: float) -> None:
        """The API asked for a pause (a 429's RetryInfo): no call of this process starts before it ends."""
        self._cool_until = max(self._cool_until, self._clock() + seconds)


class AdaptiveConcurrency:
    def __init__(self, max_limit: int):
        self.max_limit = max_limit
        self.limit = float(max_limit)
        self.inflight = 0
        self._cond = asyncio.Condition()

    async def __aenter__(self) -> None:
        async with self._cond:
            await self._cond.wait_for(lambda: self.inflight < max(1, int(self.limit)))
            self.inflight += 1

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        async with self._cond:
            self.inflight -= 1
            self._cond.notify_all()

    def on_rate_limited(self) -> None:
        before = self.limit
        self.limit = max(1.0, self.limit / 2)
        if int(before) != int(self.limit):
            log.warning("rate limited: upstream concurrency lowered to %d", int(self.limit))

    def on_success(self) -> None:
        self.limit = min(float(self.max_limit), self.limit + 1.0 / self.limit)


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
