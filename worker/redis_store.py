"""Where the deferred lane writes vectors: Redis hashes. The only module that imports redis.

Each item's key names a hash; the worker sets ``embedding`` (little-endian float32 bytes, the layout
Redis vector search indexes read for a FLOAT32 VECTOR field), ``embedding_model``,
``embedding_dimensions`` and ``embedding_text_hash`` (to skip unchanged texts), leaving the record's
other fields alone. All writes of one round go in one pipeline.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from worker.vectors import Vector

FIELD_EMBEDDING = "embedding"
FIELD_MODEL = "embedding_model"
FIELD_DIMENSIONS = "embedding_dimensions"
FIELD_TEXT_HASH = "embedding_text_hash"
# Batch API jobs in flight: job name -> JSON {"config": {...}, "items": [[key, text], ...], "attempts": n}.
# Once a job is recorded here its messages are acked; this record is then what keeps the work from loss.
JOBS_KEY = "embed-worker:batch-jobs"


class StoreUnavailable(Exception):
    """Redis could not be reached or refused the write; nothing of the round is acked."""


@dataclass(frozen=True, slots=True)
class StoredVector:
    key: str
    vector: Vector
    model: str
    text_hash: str


@dataclass(frozen=True, slots=True)
class Existing:
    text_hash: str | None
    model: str | None
    dimensions: int | None


class RedisVectorStore:
    def __init__(self, url: str, jobs_key: str = JOBS_KEY):
        self._redis = aioredis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
        self._jobs_key = jobs_key

    async def write(self, entries: Sequence[StoredVector]) -> None:
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                self._queue_writes(pipe, entries)
                results = await pipe.execute(raise_on_error=True)
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"redis write failed: {type(exc).__name__}: {exc}") from None
        if len(results) != len(entries):
            raise StoreUnavailable("redis pipeline returned the wrong number of results")

    @staticmethod
    def _queue_writes(pipe: Any, entries: Sequence[StoredVector]) -> None:
        for e in entries:
            pipe.hset(
                e.key,
                mapping={
                    FIELD_EMBEDDING: e.vector.astype("<f4", copy=False).tobytes(),
                    FIELD_MODEL: e.model,
                    FIELD_DIMENSIONS: int(e.vector.shape[0]),
                    FIELD_TEXT_HASH: e.text_hash,
                },
            )

    async def existing(self, keys: Sequence[str]) -> list[Existing]:
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.hmget(key, [FIELD_TEXT_HASH, FIELD_MODEL, FIELD_DIMENSIONS])
                rows = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"redis read failed: {type(exc).__name__}") from None
        return [
            Existing(
                text_hash=h.decode() if h else None,
                model=m.decode() if m else None,
                dimensions=int(d) if d else None,
            )
            for h, m, d in rows
        ]

    async def save_job(self, name: str, record: bytes) -> None:
        try:
            await self._redis.hset(self._jobs_key, name, record)
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"redis write failed: {type(exc).__name__}") from None

    async def jobs(self) -> dict[str, bytes]:
        try:
            raw = await self._redis.hgetall(self._jobs_key)
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"redis read failed: {type(exc).__name__}") from None
        return {_text(k): v if isinstance(v, bytes) else v.encode() for k, v in raw.items()}

    async def complete_job(self, name: str, entries: Sequence[StoredVector]) -> None:
        """The job's vectors and the removal of its record, in one transaction."""
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                self._queue_writes(pipe, entries)
                pipe.hdel(self._jobs_key, name)
                await pipe.execute(raise_on_error=True)
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"redis write failed: {type(exc).__name__}") from None

    async def drop_job(self, name: str) -> None:
        try:
            await self._redis.hdel(self._jobs_key, name)
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"redis write failed: {type(exc).__name__}") from None

    async def ping(self) -> bool:
        try:
            return bool(await self._redis.ping())
        except (RedisError, OSError):
            return False

    async def aclose(self) -> None:
        await self._redis.aclose()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
