"""Retry, backoff and bad-input isolation around an embedder, with an honest fake at the seam."""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np
import pytest

from tests.fakes import FakeEmbedder
from worker.backoff import Backoff
from worker.emulator import BAD_INPUT_MARKER
from worker.errors import CredentialError, ErrorCode, InvalidRequest, RateLimited, UpstreamError
from worker.flow import CircuitBreaker
from worker.messages import EmbedConfig
from worker.metrics import Metrics
from worker.upstream import RetryPolicy, UpstreamCaller
from worker.vectors import expected_vector

CFG = EmbedConfig("gemini-embedding-001", "RETRIEVAL_DOCUMENT", 256)


def expected(text: str) -> np.ndarray:
    return expected_vector(text, model=CFG.model, task_type=CFG.task_type, dims=256, full_dims=3072)


class Sleeps:
    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


def caller(fake: FakeEmbedder, sleeps: Sleeps, attempts: int = 4) -> UpstreamCaller:
    policy = RetryPolicy(max_attempts=attempts, backoff=Backoff(base=0.1, cap=5, rng=random.Random(7)))
    return UpstreamCaller(fake, policy, metrics=Metrics(), sleep=sleeps)


def check(texts: Sequence[str], outcomes: Sequence[object]) -> None:
    for text, outcome in zip(texts, outcomes, strict=True):
        assert isinstance(outcome, np.ndarray), outcome
        assert np.allclose(outcome, expected(text), atol=1e-6)


async def test_transient_errors_are_retried_with_growing_jittered_backoff() -> None:
    fake = FakeEmbedder(faults=[UpstreamError("503", status=503, retry_now=True)] * 3)
    sleeps = Sleeps()
    out = await caller(fake, sleeps).embed(["a", "b"], CFG)
    check(["a", "b"], out)
    assert len(fake.calls) == 4 and len(sleeps.delays) == 3
    caps = [0.1, 0.2, 0.4]
    assert all(0 <= d <= cap for d, cap in zip(sleeps.delays, caps, strict=True))


async def test_retry_hint_from_the_api_is_honoured() -> None:
    fake = FakeEmbedder(faults=[RateLimited("429", retry_after=3.0)])
    sleeps = Sleeps()
    check(["a"], await caller(fake, sleeps).embed(["a"], CFG))
    assert sleeps.delays == [3.0]


async def test_budget_exhausted_gives_a_retryable_error_for_every_text() -> None:
    fake = FakeEmbedder(faults=[UpstreamError("500", status=500, retry_now=True)] * 10)
    out = await caller(fake, Sleeps(), attempts=3).embed(["a", "b"], CFG)
    assert len(fake.calls) == 3
    assert all(isinstance(o, UpstreamError) and o.retryable for o in out)


async def test_daily_quota_is_not_retried() -> None:
    fake = FakeEmbedder(faults=[RateLimited("429 per day", daily=True)] * 3)
    sleeps = Sleeps()
    out = await caller(fake, sleeps).embed(["a"], CFG)
    assert len(fake.calls) == 1 and sleeps.delays == []
    assert isinstance(out[0], RateLimited) and out[0].code == ErrorCode.RATE_LIMITED and out[0].retryable


async def test_permanent_errors_are_not_retried() -> None:
    fake = FakeEmbedder(faults=[UpstreamError("404", status=404, retry_now=False)])
    out = await caller(fake, Sleeps()).embed(["a"], CFG)
    assert len(fake.calls) == 1
    assert isinstance(out[0], UpstreamError) and not out[0].retryable


async def test_credential_errors_are_never_bisected_and_trip_the_breaker() -> None:
    """A wrong key is a 400 too; bisecting 100 texts would cost 198 calls and blame every input."""
    fake = FakeEmbedder(faults=[CredentialError("400 API key not valid", status=400, reason="API_KEY_INVALID")])
    opened: list[bool] = []
    breaker = CircuitBreaker(5, 60.0, on_open=lambda: opened.append(True), on_close=lambda: None)
    policy = RetryPolicy(max_attempts=4, backoff=Backoff(base=0.1, cap=5))
    upstream = UpstreamCaller(fake, policy, metrics=Metrics(), sleep=Sleeps(), breaker=breaker)
    texts = [f"text {i}" for i in range(100)]
    out = await upstream.embed(texts, CFG)
    assert len(fake.calls) == 1
    assert all(isinstance(o, CredentialError) and o.retryable for o in out)
    assert opened == [True] and breaker.is_open  # paused at once, not after five failed calls
    breaker.success()


@pytest.mark.parametrize("bad_positions", [[0], [5], [9], [2, 7]])
async def test_a_rejected_batch_is_bisected_so_only_bad_inputs_fail(bad_positions: list[int]) -> None:
    texts = [f"text {i}" + (BAD_INPUT_MARKER if i in bad_positions else "") for i in range(10)]
    fake = FakeEmbedder()
    out = await caller(fake, Sleeps()).embed(texts, CFG)
    for i, (text, outcome) in enumerate(zip(texts, out, strict=True)):
        if i in bad_positions:
            assert isinstance(outcome, InvalidRequest) and outcome.code == ErrorCode.INVALID_REQUEST
        else:
            check([text], [outcome])
    assert len(fake.calls) <= 1 + 2 * len(bad_positions) * 4  # log2(10) levels per bad input, at most
