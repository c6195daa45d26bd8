"""Spending the quota once: duplicates inside a call, and the cache across calls (with the honest fakes)."""

from __future__ import annotations

import numpy as np

from tests.fakes import FakeEmbedder, MemoryCache
from worker.backoff import Backoff
from worker.frugal import Frugal, cache_key
from worker.messages import EmbedConfig
from worker.metrics import Metrics
from worker.upstream import RetryPolicy, UpstreamCaller
from worker.vectors import expected_vector

CFG = EmbedConfig("gemini-embedding-001", "RETRIEVAL_QUERY", 256)


def frugal(cache: MemoryCache | None = None) -> tuple[Frugal, FakeEmbedder, Metrics]:
    embedder, metrics = FakeEmbedder(), Metrics()
    upstream = UpstreamCaller(embedder, RetryPolicy(2, Backoff(0.001, 0.002)), metrics=metrics)
    return Frugal(upstream, metrics=metrics, cache=cache, cache_prefix="t:"), embedder, metrics


def right(outcomes: list[object], texts: list[str], config: EmbedConfig = CFG) -> bool:
    return all(
        isinstance(o, np.ndarray)
        and np.allclose(
            o,
            expected_vector(t, model=config.model, task_type=config.task_type, dims=256, full_dims=3072),
            atol=1e-6,
        )
        for o, t in zip(outcomes, texts, strict=True)
    )


async def test_identical_inputs_of_one_call_are_sent_once_and_fanned_out() -> None:
    layer, embedder, metrics = frugal()
    texts = ["what is rag?"] * 60 + ["other"]
    assert right(await layer.embed(texts, CFG), texts)
    assert [len(sent) for sent, _ in embedder.calls] == [2]
    assert metrics.duplicate_inputs._value.get() == 59


async def test_a_cached_input_costs_no_call_and_only_its_own_configuration_hits() -> None:
    cache = MemoryCache()
    layer, embedder, metrics = frugal(cache)
    assert right(await layer.embed(["a", "b"], CFG), ["a", "b"])
    await layer.close()  # the background write
    assert right(await layer.embed(["b", "a", "c"], CFG), ["b", "a", "c"])
    assert [sent for sent, _ in embedder.calls] == [["a", "b"], ["c"]]
    assert metrics.cache_hits._value.get() == 2 and metrics.cache_tokens_saved._value.get() == 2
    for other in (
        EmbedConfig("gemini-embedding-001", "RETRIEVAL_DOCUMENT", 256),  # task type
        EmbedConfig("gemini-embedding-001", "RETRIEVAL_QUERY", 512),  # dimensions
        EmbedConfig("text-embedding-004", "RETRIEVAL_QUERY", 256),  # model
    ):
        assert cache_key("t:", other, "a") != cache_key("t:", CFG, "a")
        await layer.embed(["a"], other)
    assert len(embedder.calls) == 5  # none of them hit


async def test_a_failing_cache_is_skipped_and_never_fails_a_request() -> None:
    cache = MemoryCache()
    layer, embedder, metrics = frugal(cache)
    cache.down = True
    assert right(await layer.embed(["x"], CFG), ["x"])
    assert right(await layer.embed(["x"], CFG), ["x"])  # no second read while skipping: the cache is left alone
    assert cache.reads == 1 and len(embedder.calls) == 2 and metrics.cache_errors._value.get() == 1


async def test_a_cached_value_that_is_not_finite_is_a_miss() -> None:
    """A value of the right length holding NaN or infinity (corrupted, or written by someone else) is never served."""
    cache = MemoryCache()
    layer, embedder, metrics = frugal(cache)
    for text, bad in (("nan", np.nan), ("inf", np.inf), ("-inf", -np.inf)):
        vector = expected_vector(text, model=CFG.model, task_type=CFG.task_type, dims=256, full_dims=3072)
        vector[7] = bad
        cache.data[cache_key("t:", CFG, text)] = np.asarray(vector, dtype="<f4").tobytes()
    texts = ["nan", "inf", "-inf"]
    assert right(await layer.embed(texts, CFG), texts)
    assert [sent for sent, _ in embedder.calls] == [texts]
    assert metrics.cache_hits._value.get() == 0 and metrics.cache_misses._value.get() == 3
