"""Spend the quota once: identical inputs of one call go upstream once, and inputs embedded before are answered
from the cache without any call. Both lanes embed through this layer, in front of ``upstream.UpstreamCaller``.

The cache key hashes everything that decides a vector: the model, the task type, the output dimensionality and
the input's full content, so a change of any of them never hits. Values are the vectors as callers get them
(float32, normalised). The cache is only ever a saving: when it is slow or failing it is skipped within its
timeout, then left alone for a few seconds. Writes go in a background task, created before the vectors are
returned to the caller: they never delay the reply, and may run before or after it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Sequence

import numpy as np

from worker import inputs
from worker.errors import EmbedError
from worker.inputs import EmbedInput
from worker.lanes import Call
from worker.messages import EmbedConfig
from worker.metrics import Metrics
from worker.ports import BatchEmbedder, CacheUnavailable, VectorCache
from worker.upstream import Outcome
from worker.vectors import FloatArray, as_array

log = logging.getLogger(__name__)

SKIP_CACHE_AFTER_FAILURE_S = 5.0


def cache_key(prefix: str, config: EmbedConfig, item: EmbedInput) -> str:
    """The key of an input's vector. The model is a checked name and the task type one of ``limits.TASK_TYPES``, so
    the identity is unambiguous; so is ``inputs.fingerprint``, whose encoding version is in its tag: keys of parts
    inputs changed with version 2 (``inputs.CONTENT_FINGERPRINT_TAG``: entries written under the first encoding are
    never read); keys of texts never changed (their entries stay valid)."""
    identity = f"{config.model}\0{config.task_type or ''}\0{config.dimensions}\0".encode()
    digest = hashlib.blake2b(identity + inputs.fingerprint(item), digest_size=20).hexdigest()
    return f"{prefix}cache:{digest}"


def _vector(value: bytes | None, dimensions: int) -> FloatArray | None:
    """A cached value as a vector, if it is one: ``dimensions`` float32, all finite. Anything else is a miss."""
    if value is None or len(value) != dimensions * 4:
        return None
    vector = np.frombuffer(value, dtype="<f4")
    return vector if bool(np.isfinite(vector).all()) else None


class Frugal:
    def __init__(
        self, upstream: BatchEmbedder, *, metrics: Metrics, cache: VectorCache | None = None, cache_prefix: str = ""
    ):
        self._upstream = upstream
        self._metrics = metrics
        self._cache = cache
        self._prefix = cache_prefix
        self._skip_cache_until = 0.0
        self._writes: set[asyncio.Task[None]] = set()

    async def embed(self, texts: Sequence[EmbedInput], config: EmbedConfig, call: Call | None = None) -> list[Outcome]:
        unique = list(dict.fromkeys(texts))
        if len(unique) < len(texts):
            self._metrics.duplicate_inputs.inc(len(texts) - len(unique))
        outcomes: dict[EmbedInput, Outcome] = await self._cached(unique, config) if self._cache is not None else {}
        misses = [text for text in unique if text not in outcomes]
        if misses:
            results = await self._upstream.embed(misses, config, call)
            fresh = dict(zip(misses, results, strict=True))
            outcomes.update(fresh)
            self._remember(fresh, config)
        return [outcomes[text] for text in texts]

    async def _cached(self, unique: list[EmbedInput], config: EmbedConfig) -> dict[EmbedInput, Outcome]:
        assert self._cache is not None
        if time.monotonic() < self._skip_cache_until:
            return {}
        keys = [cache_key(self._prefix, config, text) for text in unique]
        try:
            values = await self._cache.get_many(keys)
        except CacheUnavailable as exc:
            self._cache_failed(exc)
            return {}
        hits: dict[EmbedInput, Outcome] = {}
        for text, value in zip(unique, values, strict=True):
            vector = _vector(value, config.dimensions)
            if vector is not None:
                hits[text] = vector
        self._metrics.cache_hits.inc(len(hits))
        self._metrics.cache_misses.inc(len(unique) - len(hits))
        self._metrics.cache_tokens_saved.inc(sum(inputs.tokens(t) for t in hits))
        return hits

    def _remember(self, fresh: dict[EmbedInput, Outcome], config: EmbedConfig) -> None:
        """Start writing the new vectors, in one pipeline, in a background task (``embed`` returns without
        waiting for it; ``close`` does)."""
        if self._cache is None or time.monotonic() < self._skip_cache_until:
            return
        entries = [
            (cache_key(self._prefix, config, text), as_array(vector).astype("<f4", copy=False).tobytes())
            for text, vector in fresh.items()
            if not isinstance(vector, EmbedError)
        ]
        if entries:
            task = asyncio.create_task(self._write(entries))
            self._writes.add(task)
            task.add_done_callback(self._writes.discard)

    async def _write(self, entries: list[tuple[str, bytes]]) -> None:
        assert self._cache is not None
        try:
            await self._cache.put_many(entries)
        except CacheUnavailable as exc:
            self._cache_failed(exc)

    def _cache_failed(self, exc: CacheUnavailable) -> None:
        self._metrics.cache_errors.inc()
        if time.monotonic() >= self._skip_cache_until:
            log.warning("embedding cache unavailable (%s); going without it for %.0fs", exc, SKIP_CACHE_AFTER_FAILURE_S)
        self._skip_cache_until = time.monotonic() + SKIP_CACHE_AFTER_FAILURE_S

    async def close(self) -> None:
        """Let the last cache writes finish (they are bounded by the cache's own timeout)."""
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)
