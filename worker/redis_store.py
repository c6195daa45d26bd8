"""Where the deferred lane writes vectors: Redis hashes. The only module that imports redis.

Each item's key names a hash; the worker sets ``embedding`` (little-endian float32 bytes, the layout
Redis vector search indexes read for a FLOAT32 VECTOR field), ``embedding_model``,
``embedding_dimensions`` and ``embedding_text_hash`` (to skip unchanged texts), leaving the record's
other fields alone. All writes of one round go in one pipeline.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from worker.vectors import Vector

FIELD_EMBEDDING = "embedding"
FIELD_MODEL = "embedding_model"
FIELD_DIMENSIONS = "embedding_dimensions"
FIELD_TEXT_HASH = "embedding_text_hash"


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
    def __init__(self, url: str):
        self._redis = aioredis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)

    async def write(self, entries: Sequence[StoredVector]) -> None:
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
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
                results = await pipe.execute(raise_on_error=True)
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"redis write failed: {type(exc).__name__}: {exc}") from None
        if len(results) != len(entries):
            raise StoreUnavailable("redis pipeline returned the wrong number of results")

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

    async def ping(self) -> bool:
        try:
            return bool(await self._redis.ping())
        except (RedisError, OSError):
            return False

    async def aclose(self) -> None:
        await self._redis.aclose()
