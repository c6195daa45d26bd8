"""How one batch is sent upstream: retries with backoff, and isolating inputs the API rejects.

The result is per text: a vector, or the error that text's request should be answered with, so one
bad input or one failed sub-call never fails the other requests that shared its batch.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from worker import limits
from worker.embedders.base import Embedder
from worker.errors import EmbedError, InvalidRequest, RateLimited, UpstreamError, UpstreamInvalidInput
from worker.flow import AdaptiveConcurrency, CircuitBreaker, RateLimiter
from worker.messages import EmbedConfig, Vectors
from worker.metrics import Metrics
from worker.vectors import Vector

log = logging.getLogger(__name__)

Outcome = Vector | EmbedError


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int = 5
    base_delay: float = 0.2
    max_delay: float = 20.0

    def delay(self, attempt: int, hint: float | None, rng: random.Random) -> float:
        """Full-jitter exponential backoff, never shorter than the API's own retry hint."""
        backoff = rng.uniform(0, min(self.max_delay, self.base_delay * 2 ** (attempt - 1)))
        if hint is not None:
            return max(backoff, min(hint, self.max_delay))
        return backoff


class UpstreamCaller:
    def __init__(
        self,
        embedder: Embedder,
        policy: RetryPolicy | None = None,
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: random.Random | None = None,
        rate_limiter: RateLimiter | None = None,
        concurrency: AdaptiveConcurrency | None = None,
        breaker: CircuitBreaker | None = None,
        metrics: Metrics | None = None,
    ):
        self.metrics = metrics or Metrics()
        self._embedder = embedder
        self._policy = policy or RetryPolicy()
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._rate = rate_limiter or RateLimiter()
        self._concurrency = concurrency
        self.breaker = breaker

    async def embed(self, texts: Sequence[str], config: EmbedConfig) -> list[Outcome]:
        attempt = 0
        while True:
            attempt += 1
            try:
                vectors = await self._call(texts, config)
            except UpstreamInvalidInput as exc:
                self.metrics.upstream_errors.labels(str(exc.status)).inc()
                return await self._isolate(texts, config, exc)
            except RateLimited as exc:
                self.metrics.upstream_errors.labels("429").inc()
                if self._concurrency is not None:
                    self._concurrency.on_rate_limited()
                self._failed()
                if exc.daily or attempt >= self._policy.max_attempts:
                    return [exc] * len(texts)
                await self._backoff(attempt, exc)
            except UpstreamError as exc:
                self.metrics.upstream_errors.labels(str(exc.status or "none")).inc()
                if exc.transient or exc.status in (401, 403):  # an upstream that refuses every call
                    self._failed()
                if not exc.transient or attempt >= self._policy.max_attempts:
                    return [exc] * len(texts)
                await self._backoff(attempt, exc)
            else:
                if self._concurrency is not None:
                    self._concurrency.on_success()
                if self.breaker is not None:
                    self.breaker.success()
                return list(vectors)

    async def _call(self, texts: Sequence[str], config: EmbedConfig) -> Vectors:
        await self._rate.acquire(sum(limits.estimate_tokens(t) for t in texts))
        if self._concurrency is None:
            return await self._timed(texts, config)
        async with self._concurrency:
            return await self._timed(texts, config)

    async def _timed(self, texts: Sequence[str], config: EmbedConfig) -> Vectors:
        started = time.perf_counter()
        try:
            return await self._embedder.embed(texts, config)
        finally:
            self.metrics.upstream_latency.observe(time.perf_counter() - started)

    def _failed(self) -> None:
        if self.breaker is not None:
            self.breaker.failure()

    async def embed_batch(self, config: EmbedConfig, texts: list[str]) -> list[Outcome]:
        """``embed`` in the batcher's (key, items) order."""
        return await self.embed(texts, config)

    async def _backoff(self, attempt: int, exc: UpstreamError) -> None:
        delay = self._policy.delay(attempt, exc.retry_after, self._rng)
        self.metrics.retries.inc()
        log.warning("upstream %s (attempt %d); retrying in %.2fs", exc.message, attempt, delay)
        await self._sleep(delay)

    async def _isolate(self, texts: Sequence[str], config: EmbedConfig, exc: UpstreamInvalidInput) -> list[Outcome]:
        """The API rejected the whole batch for some input in it: bisect until the culprit stands alone."""
        if len(texts) == 1:
            return [InvalidRequest(f"rejected by the embedding API: {exc.message}")]
        mid = len(texts) // 2
        left, right = await asyncio.gather(self.embed(texts[:mid], config), self.embed(texts[mid:], config))
        return left + right
