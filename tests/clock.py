"""Clocks for tests: time that moves only when the test says (``ManualClock`` for the batcher's flush timers,
``ManualTime`` for limiters), or only when someone sleeps (``JumpingTime``)."""

from __future__ import annotations

import asyncio
import heapq
import itertools


class ManualClock:
    def __init__(self) -> None:
        self._now = 0.0
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._ids = itertools.count()

    def now(self) -> float:
        return self._now

    async def sleep(self, seconds: float) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._now + seconds, next(self._ids), future))
        await future

    @property
    def sleepers(self) -> int:
        return sum(1 for _, _, f in self._sleepers if not f.done())

    async def advance(self, seconds: float) -> None:
        """Move time forward, wake every sleeper now due, and let the woken tasks run."""
        self._now += seconds
        while self._sleepers and self._sleepers[0][0] <= self._now:
            _, _, future = heapq.heappop(self._sleepers)
            if not future.done():
                future.set_result(None)
        for _ in range(5):
            await asyncio.sleep(0)


class JumpingTime:
    """Time that moves only when someone sleeps (to the end of the sleep), or when the test says so."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    def at_least(self, when: float) -> None:
        self.now = max(self.now, when)


class ManualTime:
    """Time that moves only when the test says (``advance``), waking the sleepers it passes. Where the code under test
    also waits on real I/O (Redis), the test waits for the sleepers it expects (``sleeping``) before it moves time,
    never for a number of loop turns."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleepers = 0
        self._changed = asyncio.Condition()

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        until = self.now + seconds
        async with self._changed:
            self.sleepers += 1
            self._changed.notify_all()
            try:
                await self._changed.wait_for(lambda: self.now >= until)
            finally:
                self.sleepers -= 1

    async def sleeping(self, count: int) -> None:
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(lambda: self.sleepers >= count), 10)

    async def advance(self, seconds: float) -> None:
        async with self._changed:
            self.now += seconds
            self._changed.notify_all()

    async def run_until_done(self, *tasks: asyncio.Task[None], step: float = 1.0) -> None:
        """Move time by ``step`` each time every task still running sleeps, until all are done."""
        while pending := [task for task in tasks if not task.done()]:
            asleep = asyncio.ensure_future(self.sleeping(len(pending)))
            await asyncio.wait({asleep, *pending}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
            if asleep.done():
                asleep.result()
                await self.advance(step)
            else:
                asleep.cancel()
