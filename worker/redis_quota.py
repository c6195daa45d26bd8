"""One API budget for the whole fleet (``UPSTREAM_LIMIT_SCOPE=fleet``): ``ports.Limiter`` in Redis.

Every process on every host draws from one sliding-window log in Redis, kept by one Lua script, so no rolling
window ever holds more than UPSTREAM_RPM calls or UPSTREAM_TPM estimated tokens fleet-wide. The script uses the
Redis server's clock (hosts' clocks may disagree) and, in the same round trip, checks the shared cool-down that a
429's RetryInfo sets for every worker, and counts the live workers (heartbeats in a sorted set).

Why not the ``limits`` library: its Redis moving window pays a cost of N by pushing N list entries
(``acquire_moving_window.lua``, limits 5.8), so a budget of a million tokens per minute would mean lists of a
million timestamps, and its redis-py extra pins ``redis<8``. For requests alone it would fit; for tokens it does not.

When Redis cannot be reached within ``timeout``, the process falls back to its share of the budget (the budget
divided by the last fleet size seen; the whole budget if it never saw one), logs it, sets the metric
``embed_ratelimit_fallback``, keeps working, and tries Redis again after a few seconds.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from worker.flow import RateLimiter
from worker.metrics import Metrics

log = logging.getLogger(__name__)

RETRY_REDIS_AFTER_S = 5.0  # after a Redis failure, the local share serves this long before Redis is tried again
HEARTBEAT_TTL_MS = 30_000  # a worker not seen for this long no longer counts towards the fleet size

# KEYS: 1 the log (sorted set; score = server ms, member = "<worker>:<seq>:<tokens>"), 2 the cool-down, 3 the fleet.
# ARGV: 1 window ms, 2 calls, 3 tokens budget (0 = none), 4 this call's tokens, 5 worker id, 6 sequence number,
# 7 heartbeat TTL ms.
# Returns {ms to wait (0: counted, go), live workers, the server's time in ms}.
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window, calls, budget = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local tokens = tonumber(ARGV[4])
if budget > 0 and tokens > budget then tokens = budget end
redis.call('ZADD', KEYS[3], now, ARGV[5])
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - tonumber(ARGV[7]))
redis.call('PEXPIRE', KEYS[3], ARGV[7])
local fleet = redis.call('ZCARD', KEYS[3])
local cool = redis.call('PTTL', KEYS[2])
if cool > 0 then return {cool, fleet, now} end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local log = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
local count = #log / 2
local wait = 0
if calls > 0 and count >= calls then
  wait = tonumber(log[(count - calls + 1) * 2]) + window - now
end
if budget > 0 then
  local used = 0
  for i = 1, #log, 2 do used = used + tonumber(string.match(log[i], ':(%d+)$')) end
  local excess = used + tokens - budget
  local i = 1
  while excess > 0 and i <= #log do
    excess = excess - tonumber(string.match(log[i], ':(%d+)$'))
    if excess <= 0 then wait = math.max(wait, tonumber(log[i + 1]) + window - now) end
    i = i + 2
  end
end
if wait > 0 then return {wait, fleet, now} end
redis.call('ZADD', KEYS[1], now, ARGV[5] .. ':' .. ARGV[6] .. ':' .. tokens)
redis.call('PEXPIRE', KEYS[1], window)
return {0, fleet, now}
"""

# A cool-down only ever grows: KEYS[1] the cool-down, ARGV[1] its length in ms.
_COOL_DOWN = """
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[1]) then redis.call('SET', KEYS[1], '1', 'PX', ARGV[1]) end
return 0
"""


class FleetLimiter:
    def __init__(
        self,
        url: str,
        *,
        prefix: str,
        calls: float,
        tokens: float,
        window_s: float,
        metrics: Metrics,
        timeout_s: float = 0.25,
        model: str = "all",
        on_admit: Callable[[int], None] | None = None,
    ):
        self._redis = aioredis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self._acquire = self._redis.register_script(_ACQUIRE)
        self._cool = self._redis.register_script(_COOL_DOWN)
        self._keys = [f"{prefix}ratelimit:{model}:log", f"{prefix}ratelimit:{model}:cooldown", f"{prefix}fleet"]
        self._calls, self._tokens, self._window_s = calls, tokens, window_s
        self._timeout = timeout_s
        self._metrics = metrics
        self._id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self._seq = itertools.count()
        self._fleet = 1  # live workers, as last seen in Redis
        self._fallback: RateLimiter | None = None  # the local share while Redis is away
        self._retry_redis_at = 0.0
        self._on_admit = on_admit  # told the server's time (ms) of each call it admits: for tests and audits

    async def acquire(self, tokens: int) -> None:
        while True:
            if self._fallback is not None and time.monotonic() < self._retry_redis_at:
                await self._fallback.acquire(tokens)
                return
            try:
                wait_ms, fleet, server_ms = await asyncio.wait_for(
                    self._acquire(
                        keys=self._keys,
                        args=[
                            int(self._window_s * 1000),
                            self._calls,
                            self._tokens,
                            tokens,
                            self._id,
                            next(self._seq),
                            HEARTBEAT_TTL_MS,
                        ],
                    ),
                    self._timeout,
                )
            except (RedisError, OSError, TimeoutError) as exc:
                self._redis_failed(exc)
                continue
            self._redis_back()
            self._fleet = max(1, int(fleet))
            if int(wait_ms) <= 0:
                if self._on_admit is not None:
                    self._on_admit(int(server_ms))
                return
            self._metrics.ratelimit_wait.inc(int(wait_ms) / 1000)
            await asyncio.sleep(int(wait_ms) / 1000)

    async def cool_down(self, seconds: float) -> None:
        """Every worker waits: the cool-down lives in Redis (and in the local share, should Redis be away)."""
        if self._fallback is not None:
            await self._fallback.cool_down(seconds)
        try:
            await asyncio.wait_for(self._cool(keys=[self._keys[1]], args=[int(seconds * 1000)]), self._timeout)
        except (RedisError, OSError, TimeoutError) as exc:
            self._redis_failed(exc)
            assert self._fallback is not None
            await self._fallback.cool_down(seconds)

    def _redis_failed(self, exc: BaseException) -> None:
        if self._fallback is None:
            share = 1 / self._fleet
            log.warning(
                "fleet rate limit: Redis unreachable (%r); this process now keeps to its share, 1/%d of the budget",
                exc,
                self._fleet,
            )
            self._fallback = RateLimiter(self._calls * share, self._tokens * share, window=self._window_s)
            self._metrics.ratelimit_fallback.set(1)
        self._retry_redis_at = time.monotonic() + RETRY_REDIS_AFTER_S

    def _redis_back(self) -> None:
        if self._fallback is not None:
            log.warning("fleet rate limit: Redis answers again; the fleet budget is shared through it")
            self._fallback = None
            self._metrics.ratelimit_fallback.set(0)

    async def aclose(self) -> None:
        await self._redis.aclose()
