"""The embedding cache in Redis (``ports.VectorCache``): each vector under ``<REDIS_KEY_PREFIX>cache:<digest>`` as
little-endian float32 bytes, with a TTL (CACHE_TTL_S).

Every read and write is bounded by ``timeout_s`` (socket and asyncio): a slow or absent Redis is a miss, never an
error or a long delay. Sizing: a 3,072-dimension vector is 12 KiB (768: 3 KiB) plus roughly 100 bytes of key and
overhead; give Redis a ``maxmemory`` and ``maxmemory-policy allkeys-lru`` so it evicts the least recently used.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from worker.ports import CacheUnavailable


class RedisVectorCache:
    def __init__(self, url: str, *, ttl_s: float, timeout_s: float):
        self._redis = aioredis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self._ttl_ms = int(ttl_s * 1000)
        self._timeout = timeout_s

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        try:
            values: list[bytes | None] = await asyncio.wait_for(self._mget(keys), self._timeout)
        except (RedisError, OSError, TimeoutError) as exc:
            raise CacheUnavailable(f"{type(exc).__name__}: {exc}") from None
        return values

    async def _mget(self, keys: Sequence[str]) -> list[bytes | None]:
        return await self._redis.mget(keys)  # type: ignore[return-value]  # bytes: no decode_responses

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
