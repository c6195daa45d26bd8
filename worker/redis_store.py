"""Where the deferred lane writes vectors: Redis hashes. The only module that imports redis.

Each item's key names a hash; the worker sets ``embedding`` (little-endian float32 bytes, the layout
Redis vector search indexes read for a FLOAT32 VECTOR field), ``embedding_model``,
``embedding_dimensions`` and ``embedding_text_hash`` (to skip unchanged texts), leaving the record's
other fields alone. All writes of one round go in one pipeline.

A key that cannot take our fields (it holds a string or a list: WRONGTYPE) fails only its own entry; the
pipeline carries on, and the lane parks that item. Only a failure of Redis itself (connection, timeout, OOM on a
whole pipeline) is ``StoreUnavailable``. We never delete or retype a caller's key.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from worker.ports import Existing, StoredVector, StoreUnavailable

FIELD_EMBEDDING = "embedding"
FIELD_MODEL = "embedding_model"
FIELD_DIMENSIONS = "embedding_dimensions"
FIELD_TEXT_HASH = "embedding_text_hash"


class RedisVectorStore:
    """``ports.VectorStore`` in Redis. ``jobs_key`` names the hash of Batch API jobs in flight: job name -> JSON
    ``{"config": {...}, "items": [[key, text], ...], "attempts": n}``. Once a job is recorded there its messages
    are acked; the record is then what keeps the work from loss."""

    def __init__(self, url: str, jobs_key: str):
        self._redis = aioredis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
        self._jobs_key = jobs_key

    async def write(self, entries: Sequence[StoredVector]) -> list[str | None]:
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                self._queue_writes(pipe, entries)
                results = await pipe.execute(raise_on_error=False)
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"redis write failed: {type(exc).__name__}: {exc}") from None
        if len(results) != len(entries):
            raise StoreUnavailable("redis pipeline returned the wrong number of results")
        return [_entry_error(result) for result in results]

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
                rows = await pipe.execute(raise_on_error=False)
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"redis read failed: {type(exc).__name__}") from None
        return [_existing(row) for row in rows]

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

    async def complete_job(self, name: str, entries: Sequence[StoredVector]) -> list[str | None]:
        """The job's vectors and the removal of its record, in one transaction (MULTI/EXEC: a key of another
        type fails its own command only, reported per entry like ``write``)."""
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                self._queue_writes(pipe, entries)
                pipe.hdel(self._jobs_key, name)
                results = await pipe.execute(raise_on_error=False)
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"redis write failed: {type(exc).__name__}") from None
        return [_entry_error(result) for result in results[: len(entries)]]

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


def _entry_error(result: Any) -> str | None:
    """One pipeline result: None if Redis did it, else why this key refused it. A failure that is not about the
    key (anything but a reply error) means Redis itself is in trouble."""
    if isinstance(result, ResponseError):
        return f"redis refused the write to this key: {result}"
    if isinstance(result, Exception):
        raise StoreUnavailable(f"redis write failed: {type(result).__name__}: {result}")
    return None


def _existing(row: Any) -> Existing:
    """What a key holds of ours. Unreadable fields (a caller's "n/a" in embedding_dimensions) count as absent:
    the write that follows replaces them with ours."""
    if isinstance(row, ResponseError):
        return Existing(error=f"redis refused to read this key: {row}")
    if isinstance(row, Exception):
        raise StoreUnavailable(f"redis read failed: {type(row).__name__}")
    text_hash, model, dims = row
    try:
        dimensions = int(dims) if dims else None
    except ValueError:
        dimensions = None
    return Existing(
        text_hash=text_hash.decode("utf-8", "replace") if text_hash else None,
        model=model.decode("utf-8", "replace") if model else None,
        dimensions=dimensions,
    )


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
