"""How one batch is sent upstream: retries with backoff, and isolating inputs the API rejects.

The result is per text: a vector, or the error that text's request should be answered with, so one
bad input or one failed sub-call never fails the other requests that shared its batch.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from worker import inputs
from worker.admission import Admission
from worker.backoff import Backoff
from worker.errors import CredentialError, InvalidRequest, RateLimited, UpstreamError, UpstreamInvalidInput
from worker.flow import AdaptiveConcurrency, CircuitBreaker, RateLimiter
from worker.inputs import EmbedInput
from worker.lanes import Call, Lane
from worker.logs import safe
from worker.messages import EmbedConfig
from worker.metrics import Metrics
from worker.ports import Embedder, Limiter, Outcome
from worker.vectors import FloatArray, JsonVector

if TYPE_CHECKING:
    from worker.settings import Settings

log = logging.getLogger(__name__)

__all__ = ["Outcome", "RetryPolicy", "UpstreamCaller"]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int
    backoff: Backoff  # full jitter, never shorter than the API's own RetryInfo hint

    @classmethod
    def from_settings(cls, settings: Settings) -> RetryPolicy:
        backoff = Backoff(base=settings.retry_base_delay_ms / 1000, cap=settings.retry_max_delay_ms / 1000)
        return cls(max_attempts=settings.retry_max_attempts, backoff=backoff)


class UpstreamCaller:
    def __init__(
        self,
        embedder: Embedder,
        policy: RetryPolicy,
        *,
        metrics: Metrics,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rate_limiter: Limiter | None = None,
        concurrency: AdaptiveConcurrency | None = None,
        breaker: CircuitBreaker | None = None,
        bulk_min_share: float = 0.25,
    ):
        self.metrics = metrics
        self._embedder = embedder
        self._policy = policy
        self._sleep = sleep
        self._rate = rate_limiter or RateLimiter()
        unlimited = 2**31 - 1
        self._concurrency = concurrency or AdaptiveConcurrency(unlimited, initial=unlimited)
        self._in_flight = 0  # calls on the wire now (the limit learns only from calls made under load)
        self.admission = Admission(
            lambda: int(self._concurrency.limit),
            self._rate,
            bulk_min_share=bulk_min_share,
            on_budget_wait=self._budget_waited,
        )
        self.breaker = breaker

    async def embed(self, texts: Sequence[EmbedInput], config: EmbedConfig, call: Call | None = None) -> list[Outcome]:
        """Per input a vector or its error. Raises ``Unaffordable`` when the API budget cannot have room before
        ``call.deadline``: nothing was sent, nothing counted."""
        call = call or Call()
        attempt = 0
        while True:
            attempt += 1
            try:
                vectors = await self._call(texts, config, call)
            except UpstreamInvalidInput as exc:
                self.metrics.upstream_errors.labels(str(exc.status)).inc()
                return await self._isolate(texts, config, call, exc)
            except CredentialError as exc:
                # Every call will fail alike until an operator fixes the key: no bisection, no retry, and
                # consumption pauses at once so the queue keeps the rest of the work.
                self.metrics.upstream_errors.labels(str(exc.status or "none")).inc()
                log.error("the API refuses our credentials (%s): pausing; fix GEMINI_API_KEY", safe(exc.message))
                if self.breaker is not None:
                    self.breaker.trip()
                return [exc] * len(texts)
            except RateLimited as exc:
                self.metrics.upstream_errors.labels("429").inc()
                self._slow_down()
                self._failed()
                if exc.retry_after:
                    await self._rate.cool_down(exc.retry_after)  # shared: with a fleet limit, every worker waits
                if exc.daily or attempt >= self._policy.max_attempts:
                    return [exc] * len(texts)
                await self._backoff(attempt, exc)
            except UpstreamError as exc:
                self.metrics.upstream_errors.labels(str(exc.status or "none")).inc()
                if exc.status == 503:  # UNAVAILABLE, "the model is overloaded": as much a request to slow down
                    self._slow_down()
                if exc.retry_now:
                    self._failed()
                if not exc.retry_now or attempt >= self._policy.max_attempts:
                    return [exc] * len(texts)
                await self._backoff(attempt, exc)
            else:
                if self.breaker is not None:
                    self.breaker.success()
                return list(vectors)

    async def _call(
        self, texts: Sequence[EmbedInput], config: EmbedConfig, call: Call
    ) -> FloatArray | list[JsonVector]:
        """One attempt: a slot and the budget, in lane order (``admission.py``), then the API call."""
        tokens = sum(inputs.tokens(t) for t in texts)
        usd = sum(inputs.usd(t, config.model) for t in texts)
        deadline = None if call.deadline is None else time.monotonic() + (call.deadline - time.time())
        async with self.admission.call(call.lane, tokens, usd=usd, deadline=deadline):
            if call.admitted_at is None:
                call.admitted_at = time.monotonic()
            vectors = await self._timed(texts, config)
            self.metrics.spend.labels(call.lane, config.model).inc(usd)
            return vectors

    def _budget_waited(self, lane: Lane, seconds: float) -> None:
        if seconds > 0.0005:  # a wait at all, not the cost of asking
            self.metrics.ratelimit_wait.labels(lane).inc(seconds)

    async def _timed(self, texts: Sequence[EmbedInput], config: EmbedConfig) -> FloatArray | list[JsonVector]:
        """The API call, timed: its latency is what the adaptive limit learns from."""
        self._in_flight += 1
        in_flight = self._in_flight
        started = time.perf_counter()
        try:
            vectors = await self._embedder.call(texts, config)
        finally:
            self._in_flight -= 1
            elapsed = time.perf_counter() - started
            self.metrics.upstream_latency.observe(elapsed)
        self._concurrency.on_success(elapsed, in_flight)
        self._show_limit()
        return vectors

    def _slow_down(self) -> None:
        self._concurrency.on_rate_limited()
        self._show_limit()

    def _show_limit(self) -> None:
        self.metrics.concurrency_limit.set(int(self._concurrency.limit))

    def _failed(self) -> None:
        if self.breaker is not None:
            self.breaker.failure()

    async def _backoff(self, attempt: int, exc: UpstreamError) -> None:
        delay = self._policy.backoff.delay(attempt, exc.retry_after)
        self.metrics.retries.inc()
        log.warning("upstream %s (attempt %d); retrying in %.2fs", safe(exc.message), attempt, delay)
        await self._sleep(delay)

    async def _isolate(
        self, texts: Sequence[EmbedInput], config: EmbedConfig, call: Call, exc: UpstreamInvalidInput
    ) -> list[Outcome]:
        """The API rejected the whole batch for some input in it: bisect until the culprit stands alone."""
        if len(texts) == 1:
            return [InvalidRequest(f"rejected by the embedding API: {exc.message}")]
        mid = len(texts) // 2
        lane = Call(call.lane)  # no deadline: once its call was made, a batch is seen through
        left, right = await asyncio.gather(self.embed(texts[:mid], config, lane), self.embed(texts[mid:], config, lane))
        return left + right
