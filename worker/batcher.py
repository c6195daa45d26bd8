"""A pure-asyncio micro-batcher: submit items, await their results.

Items are grouped per *key* (callers use it for "what configuration does this call need"); a key's
open batch is sent when it holds ``max_size`` items or when its oldest item has waited ``max_wait``
seconds. With ``weigh`` and ``budgets``, a batch is also sent when the next item would take any of its
weights (bytes, tokens...) past its budget; that item starts the next batch. At most ``max_concurrent``
batches are processed at once, so a slow call does not stop the next batch from forming. A batch that
timed out while every slot was busy stays open and keeps taking items until a slot frees, so under
saturation batches go out full.

A submission larger than the room left is split over several batches and answered once, in order.
If any batch carrying part of a submission fails, the submission fails with that exception and its
parts that were not sent yet are withdrawn. Cancelling a waiting ``submit`` withdraws its unsent items.

This module imports nothing else from the package and nothing about AMQP: it is usable as a library
to batch calls to any async function.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")
R = TypeVar("R")

__all__ = ["BatchStats", "Batcher", "BatcherClosed", "Clock", "MonotonicClock"]


class Clock(Protocol):
    """Time source for the flush timers; tests drive a manual one."""

    def now(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class MonotonicClock:
    def now(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class BatcherClosed(RuntimeError):
    """Raised by ``submit`` after ``close`` began, and to waiters whose batch was cancelled."""


@dataclass(frozen=True, slots=True)
class BatchStats:
    key: Hashable
    size: int
    reason: str  # "size", "budget", "timeout" or "flush"
    waited: float  # seconds from the batch's first item to its send
    duration: float  # seconds the process function took
    error: BaseException | None


class _Job(Generic[R]):
    """One ``submit`` call: where its results go and which batches hold its items."""

    __slots__ = ("buckets", "future", "remaining", "results")

    def __init__(self, size: int, future: asyncio.Future[list[R]]):
        self.future = future
        self.results: list[R | None] = [None] * size
        self.remaining = size
        self.buckets: list[_Bucket[R]] = []


class _Bucket(Generic[R]):
    """One batch in the making: entries are (job, index in that job's items, item)."""

    __slots__ = ("created", "due", "entries", "key", "load", "open", "reason", "started", "timer")

    def __init__(self, key: Any, created: float, budgets: int):
        self.key = key
        self.created = created
        self.entries: list[tuple[_Job[R], int, object]] = []
        self.load = [0] * budgets  # the sum of its items' weights, per budget
        self.timer: asyncio.Task[None] | None = None
        self.open = True  # still takes items
        self.due = False  # queued for sending
        self.started = False
        self.reason = "size"


class Batcher(Generic[K, T, R]):
    def __init__(
        self,
        process: Callable[[K, list[T]], Awaitable[Sequence[R]]],
        *,
        max_size: int,
        max_wait: float,
        max_concurrent: int = 1,
        clock: Clock | None = None,
        on_batch: Callable[[BatchStats], None] | None = None,
        weigh: Callable[[K], Callable[[T], Sequence[int]] | None] | None = None,
        budgets: Sequence[int] = (),
    ):
        if max_size < 1 or max_concurrent < 1 or max_wait < 0:
            raise ValueError("max_size and max_concurrent must be >= 1, max_wait >= 0")
        self._process = process
        # weigh(key): how to weigh that key's items, or None when no budget can bind for it (then it costs nothing)
        self._weigh = weigh if weigh is not None and any(budgets) else None
        self._budgets = tuple(budget or 2**62 for budget in budgets)  # 0: no limit
        self.max_size = max_size
        self.max_wait = max_wait
        self.max_concurrent = max_concurrent
        self._clock = clock or MonotonicClock()
        self._on_batch = on_batch
        self._open: dict[K, _Bucket[R]] = {}
        self._due: deque[_Bucket[R]] = deque()
        self._running: set[asyncio.Task[None]] = set()
        self._closed = False
        self._idle = asyncio.Event()
        self._idle.set()

    # ------------------------------------------------------------------ public API
    @property
    def active_batches(self) -> int:
        return len(self._running)

    @property
    def pending_items(self) -> int:
        """Items accepted but not yet sent."""
        waiting = {id(b): b for b in self._open.values()}
        waiting.update((id(b), b) for b in self._due)
        return sum(len(b.entries) for b in waiting.values())

    async def submit(self, key: K, items: Sequence[T]) -> list[R]:
        """Queue ``items`` under ``key``; return their results in the same order."""
        if self._closed:
            raise BatcherClosed("batcher is closed")
        if not items:
            return []
        job: _Job[R] = _Job(len(items), asyncio.get_running_loop().create_future())
        weigh = self._weigh(key) if self._weigh is not None else None
        if weigh is not None:
            self._place_weighed(key, items, job, weigh)
        offset = len(items) if weigh is not None else 0
        while offset < len(items):
            bucket = self._open.get(key)
            if bucket is None:
                bucket = self._new_bucket(key)
            take = items[offset : offset + self.max_size - len(bucket.entries)]
            bucket.entries.extend((job, offset + i, item) for i, item in enumerate(take))
            job.buckets.append(bucket)
            offset += len(take)
            if len(bucket.entries) >= self.max_size:
                self._close_bucket(bucket)
                self._make_due(bucket, "size")
        self._pump()
        try:
            return await job.future
        except asyncio.CancelledError:
            self._withdraw(job)
            raise

    def _place_weighed(self, key: K, items: Sequence[T], job: _Job[R], weigh: Callable[[T], Sequence[int]]) -> None:
        """Item by item: a batch closes when the next item would take it past any budget (or past ``max_size``).
        An item over a budget on its own still goes, alone: refusing it is the caller's decision."""
        for index, item in enumerate(items):
            weights = weigh(item)
            bucket = self._open.get(key)
            if (
                bucket is not None
                and bucket.entries
                and any(
                    load + weight > budget
                    for load, weight, budget in zip(bucket.load, weights, self._budgets, strict=True)
                )
            ):
                self._close_bucket(bucket)
                self._make_due(bucket, "budget")
                bucket = None
            if bucket is None:
                bucket = self._new_bucket(key)
            bucket.entries.append((job, index, item))
            bucket.load = [load + weight for load, weight in zip(bucket.load, weights, strict=True)]
            if not job.buckets or job.buckets[-1] is not bucket:
                job.buckets.append(bucket)
            if len(bucket.entries) >= self.max_size:
                self._close_bucket(bucket)
                self._make_due(bucket, "size")

    def flush(self) -> None:
        """Send every open batch now, without waiting for size or age."""
        for bucket in list(self._open.values()):
            self._make_due(bucket, "flush")
        self._pump()

    async def join(self) -> None:
        """Wait until nothing is pending or in flight."""
        await self._idle.wait()

    async def close(self, *, timeout: float | None = None) -> None:
        """Refuse new work, flush what is pending, and wait for it (then cancel what is left)."""
        self._closed = True
        self.flush()
        try:
            await asyncio.wait_for(self.join(), timeout)
        except TimeoutError:
            for task in list(self._running):
                task.cancel()
            await asyncio.gather(*self._running, return_exceptions=True)

    # ------------------------------------------------------------------ internals
    def _new_bucket(self, key: K) -> _Bucket[R]:
        bucket: _Bucket[R] = _Bucket(key, self._clock.now(), len(self._budgets))
        self._open[key] = bucket
        self._idle.clear()
        if self.max_wait == 0:
            self._make_due(bucket, "timeout")
        else:
            bucket.timer = asyncio.create_task(self._expire(bucket))
        return bucket

    async def _expire(self, bucket: _Bucket[R]) -> None:
        await self._clock.sleep(self.max_wait)
        bucket.timer = None
        self._make_due(bucket, "timeout")
        self._pump()

    def _close_bucket(self, bucket: _Bucket[R]) -> None:
        """Stop the bucket from taking more items (it is full or about to be sent)."""
        if bucket.open:
            bucket.open = False
            if self._open.get(bucket.key) is bucket:
                del self._open[bucket.key]
        if bucket.timer is not None:
            bucket.timer.cancel()
            bucket.timer = None

    def _make_due(self, bucket: _Bucket[R], reason: str) -> None:
        if not bucket.due:
            bucket.due = True
            bucket.reason = reason
            self._due.append(bucket)

    def _pump(self) -> None:
        while self._due and len(self._running) < self.max_concurrent:
            bucket = self._due.popleft()
            self._close_bucket(bucket)
            if not bucket.entries:
                continue
            bucket.started = True
            task = asyncio.create_task(self._run(bucket))
            self._running.add(task)
        self._check_idle()

    def _check_idle(self) -> None:
        if not self._open and not self._due and not self._running:
            self._idle.set()

    async def _run(self, bucket: _Bucket[R]) -> None:
        items: list[T] = [item for _, _, item in bucket.entries]  # type: ignore[misc]
        waited = self._clock.now() - bucket.created
        started = time.perf_counter()
        error: BaseException | None = None
        try:
            results = await self._process(bucket.key, items)
            if len(results) != len(items):
                raise RuntimeError(f"process returned {len(results)} results for {len(items)} items")
        except asyncio.CancelledError:
            error = BatcherClosed("batch cancelled before it finished")
            self._fail(bucket, error)
        except Exception as exc:
            error = exc
            self._fail(bucket, exc)
        else:
            for (job, index, _), result in zip(bucket.entries, results, strict=True):
                if job.future.done():
                    continue
                job.results[index] = result
                job.remaining -= 1
                if job.remaining == 0:
                    job.future.set_result(job.results)  # type: ignore[arg-type]
                    job.buckets.clear()
        finally:
            # Job and bucket point at each other; breaking the cycle here lets reference counting free them at
            # once instead of leaving them to the cyclic GC (measured: most of the worker's GC time went there).
            bucket.entries = []
            self._running.discard(asyncio.current_task())
            if self._on_batch is not None:
                self._on_batch(
                    BatchStats(
                        key=bucket.key,
                        size=len(items),
                        reason=bucket.reason,
                        waited=waited,
                        duration=time.perf_counter() - started,
                        error=error,
                    )
                )
            self._pump()

    def _fail(self, bucket: _Bucket[R], exc: BaseException) -> None:
        for job in {id(job): job for job, _, _ in bucket.entries}.values():
            if not job.future.done():
                job.future.set_exception(exc)
                self._withdraw(job)

    def _withdraw(self, job: _Job[R]) -> None:
        """Take a finished or abandoned job's unsent items out of their batches."""
        for bucket in job.buckets:
            if bucket.started:
                continue
            bucket.entries = [entry for entry in bucket.entries if entry[0] is not job]
            if not bucket.entries:
                self._close_bucket(bucket)
                if bucket.due:
                    self._due.remove(bucket)
        job.buckets.clear()
        self._check_idle()
