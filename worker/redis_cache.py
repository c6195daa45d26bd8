"""The embedding cache in Redis (``ports.VectorCache``): each vector under ``<REDIS_KEY_PREFIX>cache:<digest>`` as
little-endian float32 bytes, with a TTL (CACHE_TTL_S).

Every read and write is bounded by ``timeout_s`` (socket and asyncio): a slow or absent Redis is a miss, never an
error or a long delay. A read fetches at most ``max_value_bytes`` + 1 bytes of each value (GETRANGE), so one huge
value at a key (or a key of another type) is a miss for that input alone, not a read that times out for everyone.

The cache lives in CACHE_REDIS_URL's Redis (``Settings.cache_redis``: REDIS_URL's when that is unset). Sizing: a
3,072-dimension vector is 12 KiB (768: 3 KiB) plus roughly 100 bytes of key and overhead. Give a Redis that holds
only the cache a ``maxmemory`` and ``maxmemory-policy allkeys-lru``, so it evicts the least recently used; in
REDIS_URL's Redis, which holds job records and the lane's hashes, ``allkeys-*`` would evict those too: there
``volatile-lru`` evicts only keys with a TTL, which every cache entry has.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from worker import limits
from worker.ports import CacheUnavailable

# The largest value a vector can be: float32 at the most dimensions any model has.
MAX_VECTOR_BYTES = 4 * max(limits.DEFAULT_MODEL_DIMENSIONS, *(m.full_dimensions for m in limits.MODELS.values()))


class RedisVectorCache:
    def __init__(self, url: str, *, ttl_s: float, timeout_s: float, max_value_bytes: int = MAX_VECTOR_BYTES):
        self._redis = aioredis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self._ttl_ms = int(ttl_s * 1000)
        self._timeout = timeout_s
        self._max_bytes = max_value_bytes

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        try:
            values: list[bytes | None] = await asyncio.wait_for(self._mget(keys), self._timeout)
        except (RedisError, OSError, TimeoutError) as exc:
            raise CacheUnavailable(f"{type(exc).__name__}: {exc}") from None
        return values

    async def _mget(self, keys: Sequence[str]) -> list[bytes | None]:
        async with self._redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.getrange(key, 0, self._max_bytes)  # one byte more than a vector: longer is a miss
            values = await pipe.execute(raise_on_error=False)  # WRONGTYPE (not a string) comes back as an error
        return [self._vector_bytes(value) for value in values]

    def _vector_bytes(self, value: object) -> bytes | None:
        """GETRANGE's answer as a value; None for a missing key (b""), a longer value, or a key of another type."""
        if isinstance(value, bytes) and 0 < len(value) <= self._max_bytes:
            return value
        return None

    async def put_many(self, entries: Sequence[tuple[str, bytes]]) -> None:
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for key, value in entries:
                    pipe.set(key, value, px=self._ttl_ms)
                await asyncio.wait_for(pipe.execute(), self._timeout)
        except (RedisError, OSError, TimeoutError) as exc:
            raise CacheUnavailable(f"{type(exc).__name__}: {exc}") from None

    async def aclose(self) -> None:
        await self._redis.aclose()
