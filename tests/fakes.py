"""An honest fake at the embedder seam: same vectors and same rejections as the emulator."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from worker import limits
from worker.emulator import BAD_INPUT_MARKER
from worker.errors import UpstreamError, UpstreamInvalidInput
from worker.messages import EmbedConfig
from worker.ports import CacheUnavailable, Existing, StoredVector, StoreUnavailable
from worker.vectors import FloatArray, normalise, upstream_vector


class FakeEmbedder:
    def __init__(self, faults: Sequence[UpstreamError] = ()):
        self.faults = list(faults)
        self.calls: list[tuple[list[str], EmbedConfig]] = []

    async def embed(self, texts: Sequence[str], config: EmbedConfig) -> FloatArray:
        self.calls.append((list(texts), config))
        if len(texts) > limits.MAX_TEXTS_PER_CALL:
            raise UpstreamInvalidInput("too many texts in one call")
        if self.faults:
            raise self.faults.pop(0)
        if any(BAD_INPUT_MARKER in t for t in texts):
            raise UpstreamInvalidInput("input rejected")
        full = limits.full_dimensions(config.model)
        rows = np.stack(
            [
                upstream_vector(
                    t, model=config.model, task_type=config.task_type, dims=config.output_dimensionality, full_dims=full
                )
                for t in texts
            ]
        ).astype(np.float32)
        return normalise(rows) if config.dimensions < full else rows

    async def aclose(self) -> None:
        return None


class MemoryStore:
    """``ports.VectorStore`` in a dict, with Redis's rule that matters here: a key holding another type (a string,
    a list) refuses hash commands with WRONGTYPE, for that key only."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}  # key -> dict of fields (a hash), or anything else (another type)
        self.jobs_hash: dict[str, bytes] = {}
        self.down = False

    def _check(self) -> None:
        if self.down:
            raise StoreUnavailable("redis is down")

    async def write(self, entries: Sequence[StoredVector]) -> list[str | None]:
        self._check()
        return [self._hset(e) for e in entries]

    def _hset(self, e: StoredVector) -> str | None:
        current = self.data.setdefault(e.key, {})
        if not isinstance(current, dict):
            return "redis refused the write to this key: WRONGTYPE Operation against a key holding the wrong kind"
        current.update(
            {
                "embedding": e.vector.astype("<f4").tobytes(),
                "embedding_model": e.model,
                "embedding_dimensions": str(e.vector.shape[0]),
                "embedding_text_hash": e.text_hash,
            }
        )
        return None

    async def existing(self, keys: Sequence[str]) -> list[Existing]:
        self._check()
        out = []
        for key in keys:
            current = self.data.get(key, {})
            if not isinstance(current, dict):
                out.append(Existing(error="redis refused to read this key: WRONGTYPE"))
                continue
            dims = current.get("embedding_dimensions")
            out.append(
                Existing(
                    current.get("embedding_text_hash"),
                    current.get("embedding_model"),
                    int(dims) if isinstance(dims, str) and dims.isdigit() else None,
                )
            )
        return out

    async def save_job(self, name: str, record: bytes) -> None:
        self._check()
        self.jobs_hash[name] = record

    async def jobs(self) -> dict[str, bytes]:
        self._check()
        return dict(self.jobs_hash)

    async def complete_job(self, name: str, entries: Sequence[StoredVector]) -> list[str | None]:
        self._check()
        self.jobs_hash.pop(name, None)
        return [self._hset(e) for e in entries]

    async def drop_job(self, name: str) -> None:
        self.jobs_hash.pop(name, None)

    async def ping(self) -> bool:
        return not self.down


class MemoryCache:
    """``ports.VectorCache`` in a dict; ``down`` makes every call fail as a timed-out Redis would."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.down = False
        self.reads = 0

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        self.reads += 1
        if self.down:
            raise CacheUnavailable("TimeoutError: cache did not answer")
        return [self.data.get(k) for k in keys]

    async def put_many(self, entries: Sequence[tuple[str, bytes]]) -> None:
        if self.down:
            raise CacheUnavailable("TimeoutError: cache did not answer")
        self.data.update(entries)
