"""One API budget for the whole fleet (``UPSTREAM_LIMIT_SCOPE=fleet``): ``ports.Limiter`` in Redis.

Every process on every host draws from one sliding-window log in Redis, kept by one Lua script, so no rolling
window ever holds more than UPSTREAM_RPM calls or UPSTREAM_TPM estimated tokens fleet-wide. The script uses the
Redis server's clock (hosts' clocks may disagree) and, in the same round trip, checks the shared cool-down that a
429's RetryInfo sets for every worker, and counts the live workers (heartbeats in a sorted set).

Budgets are stored with the log: each live worker declares its own, and a call is admitted only if it fits every
budget a live worker declares, so when workers disagree (a rollout changing UPSTREAM_RPM) the strictest binds the
whole fleet, and a worker seeing budgets other than its own logs a warning when it starts and whenever that changes.
The log keeps each call for the longest window declared. A fractional budget follows ``flow.call_rule``.

Why not the ``limits`` library: its Redis moving window pays a cost of N by pushing N list entries
(``acquire_moving_window.lua``, limits 5.8), so a budget of a million tokens per minute would mean lists of a
million timestamps, and its redis-py extra pins ``redis<8``. For requests alone it would fit; for tokens it does not.

When Redis cannot be reached within ``timeout``, or fails in any other way, the process falls back to its share
of the budget (the budget divided by the last fleet size seen; the whole budget if it never saw one), logs it,
sets the metric ``embed_ratelimit_fallback``, tells ``on_error``, keeps working, and tries Redis again after a few
seconds. The process remembers its own recent calls, so that its share counts those made through Redis just
before, and writes those it made alone into the fleet's log when Redis answers again. The fleet's log may then lack
other workers' calls (they come back when they next call), so the share keeps binding as well for a grace period:
until every call the log may lack has left its window. The same happens when the log loses this process's latest
call (FLUSHDB, a Redis restarted empty).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from worker.flow import MICRO_USD, SlidingWindow, call_rule
from worker.metrics import Metrics
from worker.ports import Unaffordable

log = logging.getLogger(__name__)

RETRY_REDIS_AFTER_S = 5.0  # after a Redis failure, the local share serves this long before Redis is tried again
HEARTBEAT_TTL_MS = 30_000  # a worker not seen for this long no longer counts towards the fleet size

ADMITTED, WAIT, RESEND = 1, 0, -1  # the script's verdicts
HOLD_BACK_MS = 25  # how much later than an urgent caller a non-urgent one tries again (see the script)
# How long past its wait an urgent caller's marker holds: room for a late wake-up on a busy loop; a worker that died
# waiting holds bulk back no longer than this.
URGENT_GRACE_MS = 5000

# KEYS: 1 the log (sorted set; score = ms, member = "<worker>:<seq>:<tokens>"), 2 the cool-down, 3 the fleet
# (heartbeats), 4 the budgets of live workers (hash: worker -> "<calls> <calls window ms> <tokens> <window ms>",
# calls as flow.call_rule makes them whole).
# 5 urgent callers waiting (sorted set; score = ms until which the marker holds, member = worker).
# ARGV: 1 this worker's budget, 2 this call's tokens, 3 worker id, 4 this call's member, 5 heartbeat TTL ms, 6 the
# time in ms ("" = the server's), 7 "announce" (declare the budget, count nothing) or "acquire", 8 the member of
# this worker's latest call still in its window ("" = none), 9 "1" for an urgent call (the default lane), else "0",
# 10.. pairs (age ms, member): calls of this worker the log should hold.
# Lane order across the fleet: an urgent call that must wait leaves a marker until it is back (its wait and
# URGENT_GRACE_MS); while any marker holds, a non-urgent call is told to wait until the budget frees and
# HOLD_BACK_MS more, so the urgent caller, waking first, takes the room.
# Returns {verdict (1 admitted, 0 wait, -1 the latest call is gone: send the recent ones), ms to wait, live workers,
# the time in ms, the budgets live workers declare, sorted, comma-separated}.
_ACQUIRE = """
local now = tonumber(ARGV[6])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local me, ttl = ARGV[3], tonumber(ARGV[5])
redis.call('ZADD', KEYS[3], now, me)
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - ttl)
redis.call('PEXPIRE', KEYS[3], ttl)
local fleet = redis.call('ZCARD', KEYS[3])

redis.call('HSET', KEYS[4], me, ARGV[1])
redis.call('PEXPIRE', KEYS[4], ttl)
local declared, seen, budgets, rules, horizon = redis.call('HGETALL', KEYS[4]), {}, {}, {}, 0
for i = 1, #declared, 2 do
  local worker, budget = declared[i], declared[i + 1]
  if not redis.call('ZSCORE', KEYS[3], worker) then
    redis.call('HDEL', KEYS[4], worker)
  elseif not seen[budget] then
    seen[budget] = true
    local c, cw, b, w = string.match(budget, '^(%S+) (%S+) (%S+) (%S+)$')
    c, cw, b, w = tonumber(c), tonumber(cw), tonumber(b), tonumber(w)
    if c and cw and b and w and cw > 0 and w > 0 then
      budgets[#budgets + 1] = budget
      rules[#rules + 1] = {c, cw, b, w}
      horizon = math.max(horizon, cw, w)
    end
  end
end
table.sort(budgets)
local listed = table.concat(budgets, ',')
if ARGV[7] == 'announce' then return {0, 0, fleet, now, listed} end
if ARGV[8] ~= '' and not redis.call('ZSCORE', KEYS[1], ARGV[8]) then return {-1, 0, fleet, now, listed} end

for i = 10, #ARGV, 2 do redis.call('ZADD', KEYS[1], 'NX', now - tonumber(ARGV[i]), ARGV[i + 1]) end
if #ARGV >= 10 then redis.call('PEXPIRE', KEYS[1], math.ceil(horizon)) end
local urgent = ARGV[9] == '1'
redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', now)
local cool = redis.call('PTTL', KEYS[2])
if cool > 0 then
  if urgent then redis.call('ZADD', KEYS[5], now + cool + URGENT_GRACE_MS, me) end
  return {0, cool, fleet, now, listed}
end

redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - horizon)
local log = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')

local function spent(member, budget)
  return math.min(tonumber(string.match(member, ':([^:]+)$')) or 0, budget)
end

-- until `calls` more fit in the last `window` ms: the oldest of them must leave
local function calls_wait(calls, window)
  if calls <= 0 then return 0 end
  local first, count = nil, 0
  for i = 2, #log, 2 do
    if tonumber(log[i]) > now - window then
      first = first or i
      count = count + 1
    end
  end
  if count < calls then return 0 end
  return tonumber(log[first + 2 * (count - calls)]) + window - now
end

local function tokens_wait(budget, window, tokens)
  if budget <= 0 then return 0 end
  local first, used = nil, 0
  for i = 1, #log, 2 do
    if tonumber(log[i + 1]) > now - window then
      first = first or i
      used = used + spent(log[i], budget)
    end
  end
  local excess, wait, i = used + math.min(tokens, budget) - budget, 0, first
  while excess > 0 and i and i <= #log do
    excess = excess - spent(log[i], budget)
    wait = tonumber(log[i + 1]) + window - now
    i = i + 2
  end
  return wait
end

local tokens, wait = tonumber(ARGV[2]), 0
for _, r in ipairs(rules) do
  wait = math.max(wait, calls_wait(r[1], r[2]), tokens_wait(r[3], r[4], tokens))
end
wait = math.ceil(wait)
if not urgent and redis.call('ZCARD', KEYS[5]) > 0 then return {0, wait + HOLD_BACK_MS, fleet, now, listed} end
if wait > 0 then
  if urgent then redis.call('ZADD', KEYS[5], now + wait + URGENT_GRACE_MS, me) end
  return {0, wait, fleet, now, listed}
end
if urgent then redis.call('ZREM', KEYS[5], me) end
redis.call('ZADD', KEYS[1], now, ARGV[4])
redis.call('PEXPIRE', KEYS[1], math.ceil(horizon))
return {1, 0, fleet, now, listed}
""".replace("HOLD_BACK_MS", str(HOLD_BACK_MS)).replace("URGENT_GRACE_MS", str(URGENT_GRACE_MS))

# A cool-down only ever grows: KEYS[1] the cool-down, ARGV[1] its length in ms.
_COOL_DOWN = """
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[1]) then redis.call('SET', KEYS[1], '1', 'PX', ARGV[1]) end
return 0
"""


def budget_spec(calls: float, tokens: float, window_s: float) -> str:
    """A budget as the script stores it: ``call_rule``'s whole calls and their window, tokens and theirs (ms)."""
    whole, calls_window = call_rule(calls, window_s)
    return f"{whole} {max(1, round(calls_window * 1000))} {float(tokens)!r} {max(1, round(window_s * 1000))}"


def _numbers(spec: str) -> tuple[float, float, float, float]:
    """``budget_spec``'s four numbers; ValueError if it is not one."""
    calls, calls_window, tokens, window = (float(n) for n in spec.split(" "))
    return calls, calls_window, tokens, window


def describe(spec: str) -> str:
    """``budget_spec``'s form for people: "4 calls per 2s, 1000 tokens per 2s"."""
    calls, calls_window, tokens, window = _numbers(spec)
    said = [f"{calls:g} call{'s' if calls > 1 else ''} per {calls_window / 1000:g}s"] if calls else []
    if tokens:
        said.append(f"{tokens:g} tokens per {window / 1000:g}s")
    return ", ".join(said) or "no limit"


def longest_window(specs: Iterable[str]) -> float:
    """Seconds a call stays in some window of these budgets."""
    return max(max(n[1], n[3]) / 1000 for n in map(_numbers, specs))


@dataclass(frozen=True, slots=True)
class Reply:
    verdict: int
    wait_ms: int
    fleet: int
    server_ms: int
    budgets: tuple[str, ...]  # declared by live workers, sorted
    horizon: float  # the longest window among them, in seconds

    @staticmethod
    def parse(raw: object) -> Reply:
        """The script's answer; ValueError if it is not one."""
        if not isinstance(raw, list) or len(raw) != 5:
            raise ValueError(f"unexpected reply from the rate limit script: {raw!r:.200}")
        verdict, wait_ms, fleet, server_ms, listed = raw
        budgets = tuple(listed.decode().split(",")) if isinstance(listed, bytes) and listed else ()
        horizon = longest_window(budgets) if budgets else 0.0
        return Reply(int(verdict), int(wait_ms), max(1, int(fleet)), int(server_ms), budgets, horizon)


@dataclass(frozen=True, slots=True)
class _Call:
    """One call this process made: when (its own clock), its tokens, and its member in the fleet's log."""

    at: float
    tokens: int
    member: str


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
        on_error: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        redis_time: bool = True,
        usd: float = 0.0,
        usd_window_s: float = 600.0,
        worker_id: str | None = None,
    ):
        """``on_admit`` is told the server's time (ms) of each call admitted through Redis (for tests and audits);
        ``on_error`` of each failure that sends this process to its share. ``redis_time=False`` times the log with
        ``clock`` instead of the server's clock: for tests that move time by hand. ``usd`` per ``usd_window_s``
        (UPSTREAM_USD_LIMIT): a spend budget for the fleet, a log of its own in which a call's "tokens" are its
        estimated cost in millionths of a dollar; a call waits for it before the calls and tokens budget."""
        self._redis = aioredis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self._acquire = self._redis.register_script(_ACQUIRE)
        self._cool = self._redis.register_script(_COOL_DOWN)
        self._keys = [
            f"{prefix}ratelimit:{model}:log",
            f"{prefix}ratelimit:{model}:cooldown",
            f"{prefix}fleet",
            f"{prefix}ratelimit:{model}:budgets",
            f"{prefix}ratelimit:{model}:urgent",
        ]
        self._calls, self._tokens, self._window_s = calls, tokens, window_s
        self._budget = budget_spec(calls, tokens, window_s)
        self._horizon = longest_window([self._budget])  # how long a call stays in the fleet's windows, as last seen
        self._timeout = timeout_s
        self._metrics = metrics
        self._on_admit, self._on_error = on_admit, on_error
        self._clock, self._sleep, self._redis_time = clock, sleep, redis_time
        self._id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self._seq = 0
        self._lock = asyncio.Lock()  # FIFO, and one round trip at a time: the bookkeeping below is never raced
        self._fleet = 1  # live workers, as last seen in Redis
        self._budgets_seen: tuple[str, ...] = (self._budget,)  # the budgets live workers declare, as last seen
        self._mine: deque[_Call] = deque()  # this process's recent calls, oldest first
        self._unsent: list[_Call] = []  # of those, the ones the fleet's log may lack
        self._share: SlidingWindow | None = None  # this process's share of the budget, while it binds
        self._redis_away = False
        self._retry_redis_at = 0.0
        self._share_until = 0.0  # once Redis answers again, the share binds as well until then
        self._cool_until = 0.0
        self._spend = (
            FleetLimiter(
                url,
                prefix=prefix,
                calls=0,
                tokens=usd * MICRO_USD,
                window_s=usd_window_s,
                metrics=metrics,
                timeout_s=timeout_s,
                model="spend",
                on_error=on_error,
                clock=clock,
                sleep=sleep,
                redis_time=redis_time,
                worker_id=self._id,  # one worker in the fleet's count, whichever log it draws on
            )
            if usd > 0
            else None
        )

    async def announce(self) -> None:
        """Declare this worker's budget to the fleet, and warn if live workers declare others: call it at start."""
        async with self._lock:
            reply = await self._ask("announce", 0, "")
            if reply is not None:
                self._answered(reply)
        if self._spend is not None:
            await self._spend.announce()

    async def acquire(
        self, tokens: int, *, usd: float = 0.0, urgent: bool = True, deadline: float | None = None
    ) -> None:
        if self._spend is not None:
            await self._spend.acquire(round(usd * MICRO_USD), urgent=urgent, deadline=deadline)
        async with self._lock:
            self._seq += 1
            member = f"{self._id}:{self._seq}:{tokens}"
            while not await self._admitted(tokens, member, urgent, deadline):
                pass
            self._remember(_Call(self._clock(), tokens, member), sent=not self._redis_away)

    async def _admitted(self, tokens: int, member: str, urgent: bool, deadline: float | None) -> bool:
        """One try: wait for the cool-down and the share, then ask Redis (unless it is away). False: try again."""
        now = self._clock()
        wait = max(self._cool_until - now, self._share_wait(now, tokens))
        if wait > 0:
            await self._wait(now, wait, deadline)
            return False
        if self._redis_away and now < self._retry_redis_at:
            return True
        reply = await self._ask("acquire", tokens, member, urgent)
        if reply is None:
            return False  # the share serves now: the next try waits for it
        if reply.verdict == RESEND:
            self._log_lost()  # first: the fleet's heartbeats are likely gone with the log
        self._answered(reply)
        if reply.verdict == ADMITTED:
            if self._on_admit is not None:
                self._on_admit(reply.server_ms)
            return True
        if reply.verdict == WAIT:
            await self._wait(now, reply.wait_ms / 1000, deadline)
        return False

    async def _wait(self, now: float, seconds: float, deadline: float | None) -> None:
        if deadline is not None and now + seconds > deadline:
            raise Unaffordable(seconds)
        await self._sleep(seconds)

    async def _ask(self, mode: str, tokens: int, member: str, urgent: bool = True) -> Reply | None:
        """Run the script; None when it failed (and the share now serves)."""
        now = self._clock()
        self._forget(now)
        seeds = self._unsent
        latest = self._mine[-1] if self._mine and not seeds and now - self._mine[-1].at < self._horizon else None
        args: list[str | int] = [
            self._budget,
            tokens,
            self._id,
            member,
            HEARTBEAT_TTL_MS,
            "" if self._redis_time else round(now * 1000),
            mode,
            latest.member if latest is not None else "",
            "1" if urgent else "0",
        ]
        for call in seeds:
            args += [int((now - call.at) * 1000), call.member]
        try:
            reply = Reply.parse(await asyncio.wait_for(self._acquire(keys=self._keys, args=args), self._timeout))
        except Exception as exc:
            self._failed(exc)
            return None
        self._unsent = []  # the script wrote them (under the lock, nothing was added meanwhile)
        return reply

    def _answered(self, reply: Reply) -> None:
        self._fleet = reply.fleet
        self._note_budgets(reply)
        if self._redis_away:
            self._share_until = self._clock() + self._grace()
            log.warning(
                "fleet rate limit: Redis answers again; the fleet budget is shared through it (this process keeps "
                "to its share as well for %.0fs, until other workers' calls made alone have left the window)",
                self._grace(),
            )
            self._redis_away = False
            self._metrics.ratelimit_fallback.set(0)

    def _note_budgets(self, reply: Reply) -> None:
        if not reply.budgets or reply.budgets == self._budgets_seen:
            return
        self._budgets_seen, self._horizon = reply.budgets, reply.horizon
        if reply.budgets == (self._budget,):
            log.warning("fleet rate limit: every live worker now declares this budget (%s)", describe(self._budget))
            return
        log.warning(
            "fleet rate limit: budgets differ between live workers (%s; this one: %s): every call must fit all "
            "of them, so the strictest binds the whole fleet; give every worker the same UPSTREAM_RPM, "
            "UPSTREAM_TPM and UPSTREAM_WINDOW_S",
            "; ".join(map(describe, reply.budgets)),
            describe(self._budget),
        )

    def _share_wait(self, now: float, tokens: int) -> float:
        if self._share is not None and not self._redis_away and now >= self._share_until:
            self._share = None  # the fleet's log holds every call that matters again
        return self._share.wait_time(now, tokens) if self._share is not None else 0.0

    def _remember(self, call: _Call, *, sent: bool) -> None:
        self._mine.append(call)
        if not sent:
            self._unsent.append(call)
        if self._share is not None:
            self._share.record(call.at, call.tokens)

    def _forget(self, now: float) -> None:
        """Drop calls that can no longer matter: out of this budget's windows and of the share's."""
        horizon = max(self._horizon, self._share.horizon if self._share is not None else 0.0)
        while self._mine and self._mine[0].at <= now - horizon:
            self._mine.popleft()
        self._unsent = [call for call in self._unsent if call.at > now - self._horizon]

    def _log_lost(self) -> None:
        """The log lost this process's latest call (FLUSHDB, a Redis restarted empty): write its recent calls again,
        and keep to its share for a while, since other workers' calls are lost too."""
        log.warning("fleet rate limit: the log lost this process's calls (flushed?); writing them again")
        self._unsent = list(self._mine)
        self._keep_to_share()
        self._share_until = self._clock() + self._grace()

    def _keep_to_share(self) -> None:
        """Keep to this process's share of the budget, counting its recent calls: while Redis is away, and while the
        fleet's log may lack calls (``_grace``)."""
        if self._share is None:
            share = 1 / self._fleet
            self._share = SlidingWindow(
                self._calls * share, self._tokens * share, self._window_s, on_error=self._on_error
            )
            self._share.seed((call.at, call.tokens) for call in self._mine)

    def _grace(self) -> float:
        """How long the fleet's log may lack calls once it answers again: other workers write the calls they made
        alone when they are back (within RETRY_REDIS_AFTER_S), and any call it lacks leaves within the horizon."""
        return RETRY_REDIS_AFTER_S + self._horizon

    def _failed(self, exc: Exception) -> None:
        if isinstance(exc, RedisError | OSError | TimeoutError):
            why = f"Redis unreachable or refusing ({type(exc).__name__}: {exc})"
        else:  # a reply we cannot read, or a bug: the share serves all the same
            log.error("fleet rate limit: internal error", exc_info=exc)
            why = f"internal error ({type(exc).__name__}: {exc})"
        self._redis_failed(why)

    def _redis_failed(self, why: str) -> None:
        if self._on_error is not None:
            self._on_error()
        if not self._redis_away:
            log.warning(
                "fleet rate limit: %s; this process now keeps to its share, 1/%d of the budget", why, self._fleet
            )
            self._redis_away = True
            self._metrics.ratelimit_fallback.set(1)
        self._keep_to_share()
        self._retry_redis_at = self._clock() + RETRY_REDIS_AFTER_S

    async def cool_down(self, seconds: float) -> None:
        """Every worker waits: the cool-down lives in Redis (and in this process, should Redis be away)."""
        self._cool_until = max(self._cool_until, self._clock() + seconds)
        try:
            await asyncio.wait_for(self._cool(keys=[self._keys[1]], args=[int(seconds * 1000)]), self._timeout)
        except Exception as exc:
            self._failed(exc)

    async def aclose(self) -> None:
        if self._spend is not None:
            await self._spend.aclose()
        await self._redis.aclose()
