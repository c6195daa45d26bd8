"""Flow control towards a paid, rate-limited API: pure asyncio, no transport or SDK imports.

- ``RateLimiter``: client-side requests- and tokens-per-minute budgets (token buckets), so a fleet
  configured with its share of the quota stays under it instead of discovering it through 429s.
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
from collections.abc import Awaitable, Callable
from types import TracebackType

log = logging.getLogger(__name__)


class _Bucket:
    def __init__(self, per_minute: float, clock: Callable[[], float] = time.monotonic):
        self.rate = per_minute / 60.0
        self.capacity = per_minute
        self.level = per_minute
        self._clock = clock
        self.stamp = clock()

    def wait_time(self, amount: float) -> float:
        now = self._clock()
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now
        amount = min(amount, self.capacity)  # a single call larger than the budget waits for a full bucket
        return 0.0 if self.level >= amount else (amount - self.level) / self.rate


class RateLimiter:
    def __init__(
        self,
        requests_per_minute: float = 0,
        tokens_per_minute: float = 0,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ):
        self._requests = _Bucket(requests_per_minute, clock) if requests_per_minute > 0 else None
        self._tokens = _Bucket(tokens_per_minute, clock) if tokens_per_minute > 0 else None
        self._sleep = sleep
        self._lock = asyncio.Lock()
        self.waited = 0.0

    async def acquire(self, tokens: int) -> None:
        if self._requests is None and self._tokens is None:
            return
        async with self._lock:  # FIFO: callers are served in arrival order
            while True:
                wait = max(
                    self._requests.wait_time(1) if self._requests else 0.0,
                    self._tokens.wait_time(tokens) if self._tokens else 0.0,
                )
                if wait <= 0:
                    break
                self.waited += wait
                await self._sleep(wait)
            if self._requests:
                self._requests.level -= 1
            if self._tokens:
                self._tokens.level -= min(tokens, self._tokens.capacity)


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
