"""Where the deferred lane writes vectors: Redis hashes. Besides the bench, only the ``redis_*`` modules import redis.

Each item's key names a hash; the worker sets ``embedding`` (little-endian float32 bytes, the layout
Redis vector search indexes read for a FLOAT32 VECTOR field), ``embedding_model``,
``embedding_dimensions``, ``embedding_text_hash`` (to skip unchanged texts) and ``embedding_seq`` (the write
order, below), leaving the record's other fields alone. All writes of one round go in one pipeline.

**Write order.** A round reads the store's clock (``clock``: Redis ``TIME``, in microseconds, one clock for every
worker) once it has taken its messages, and every vector it writes carries that value as ``embedding_seq``. A write
(``write``, or ``complete_job`` for a Batch API job, with the seq of the round that submitted the job) goes through
only when the key has no ``embedding_seq``, an unreadable one, or one no larger than its own: a vector from a round
that took its messages later is never replaced by one from a round that took them earlier, whichever finishes last.
One Lua script per key does the compare and the set, so no other client comes between them.

**Which refusals are whose.** Only WRONGTYPE (the key holds a string or a list) is about one key: that entry fails
alone, the pipeline carries on, and the lane parks that item. Every other refusal is about Redis as a whole (out of
memory under noeviction, a read-only replica, MISCONF, NOAUTH, LOADING, BUSY, MASTERDOWN, a cluster's MOVED, ASK,
CROSSSLOT or CLUSTERDOWN, a connection that fails) and is ``StoreUnavailable``: the round goes back to the queue.
We never delete or retype a caller's key.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from worker import limits
from worker.ports import Existing, StoredVector, StoreUnavailable

FIELD_EMBEDDING = "embedding"
FIELD_MODEL = "embedding_model"
FIELD_DIMENSIONS = "embedding_dimensions"
FIELD_TEXT_HASH = "embedding_text_hash"
FIELD_SEQ = "embedding_seq"

PROBE_TTL_MS = 60_000  # the probe key's life: it only proves that a write went through
# The probe writes as much as a full vector: Redis counts the command being read against maxmemory, so a nearly
# full Redis takes a tiny write and refuses the vector that follows.
PROBE_VALUE = bytes(4 * limits.DEFAULT_MODEL_DIMENSIONS)
POLICY_TIMEOUT_S = 2.0  # reading the eviction policy at start: a Redis that does not answer is left to the lane

# KEYS[1]: the hash. ARGV[1]: the writer's seq ("" for none: no comparison); the rest: field, value pairs.
# Returns 1 when written, 0 when the key holds a vector from a later round (left alone).
_WRITE_SCRIPT = f"""
if ARGV[1] ~= '' then
  local have = tonumber(redis.call('HGET', KEYS[1], '{FIELD_SEQ}'))
  if have and have > tonumber(ARGV[1]) then return 0 end
end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
return 1
"""


class RedisVectorStore:
    """``ports.VectorStore`` in Redis. ``jobs_key`` names the hash of Batch API
    jobs in flight: job name -> JSON ``{"config": {...}, "items": [[key, text], ...], "attempts": n}``. Once a job is
    recorded there its messages are acked; the record is then what keeps the work from loss. ``probe_key`` is
    written by ``writable`` (under the worker's reserved prefix)."""

    def __init__(self, url: str, jobs_key: str, *, probe_key: str):
        self._redis = aioredis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
        self._jobs_key = jobs_key
        self._probe_key = probe_key
        self._write_script = self._redis.register_script(_WRITE_SCRIPT)

    async def clock(self) -> int:
        """The store's time in microseconds: the seq of a round that has just taken its messages."""
        try:
            seconds, micros = await self._redis.time()
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"redis read failed: {_named(exc)}") from None
        return int(seconds) * 1_000_000 + int(micros)

    async def write(self, entries: Sequence[StoredVector], seq: int | None = None) -> list[str | None]:
        """Every entry, each unless its key holds a vector from a later round (``seq`` None: unconditionally); per
        entry None (written, or left to the later vector) or why that key refused it."""
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                await self._queue_writes(pipe, entries, seq)
                results = await pipe.execute(raise_on_error=False)
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"redis write failed: {_named(exc)}") from None
        if len(results) != len(entries):
            raise StoreUnavailable("redis pipeline returned the wrong number of results")
        return [_entry_error(result) for result in results]

    async def _queue_writes(self, pipe: Any, entries: Sequence[StoredVector], seq: int | None) -> None:
        for e in entries:
            fields: list[Any] = [
                FIELD_EMBEDDING,
                e.vector.astype("<f4", copy=False).tobytes(),
                FIELD_MODEL,
                e.model,
                FIELD_DIMENSIONS,
                int(e.vector.shape[0]),
                FIELD_TEXT_HASH,
                e.text_hash,
            ]
            if seq is not None:
                fields += [FIELD_SEQ, seq]
            await self._write_script(keys=[e.key], args=["" if seq is None else seq, *fields], client=pipe)

    async def existing(self, keys: Sequence[str]) -> list[Existing]:
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.hmget(key, [FIELD_TEXT_HASH, FIELD_MODEL, FIELD_DIMENSIONS])
                rows = await pipe.execute(raise_on_error=False)
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"redis read failed: {_named(exc)}") from None
        return [_existing(row) for row in rows]

    async def save_job(self, name: str, record: bytes) -> None:
        try:
            await self._redis.hset(self._jobs_key, name, record)
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"redis write failed: {_named(exc)}") from None

    async def jobs(self) -> dict[str, bytes]:
        try:
            raw = await self._redis.hgetall(self._jobs_key)
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"redis read failed: {_named(exc)}") from None
        return {_text(k): v if isinstance(v, bytes) else v.encode() for k, v in raw.items()}

    async def complete_job(
        self, name: str, entries: Sequence[StoredVector], seq: int | None = None
    ) -> list[str | None]:
        """The job's vectors and the removal of its record, in one transaction (MULTI/EXEC: a key of another type
        fails its own command only, reported per entry like ``write``). ``seq``: the clock of the round that
        submitted the job; a key a later round wrote keeps its vector. None writes unconditionally."""
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                await self._queue_writes(pipe, entries, seq)
                pipe.hdel(self._jobs_key, name)
                results = await pipe.execute(raise_on_error=False)
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"redis write failed: {_named(exc)}") from None
        return [_entry_error(result) for result in results[: len(entries)]]

    async def drop_job(self, name: str) -> None:
        try:
            await self._redis.hdel(self._jobs_key, name)
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"redis write failed: {_named(exc)}") from None

    async def writable(self) -> None:
        """Raise StoreUnavailable, saying why, unless Redis takes writes now. PING is not enough: a read-only replica
        and a full Redis answer it. ROLE must say master (a replica with ``replica-read-only no`` takes writes and
        loses them at the next resync), and a real write of PROBE_VALUE must go through (a full Redis refuses it). A
        Redis that refuses ROLE itself (some managed ones rename commands) is judged by the write alone."""
        try:
            role = await self._redis.role()
        except ResponseError:
            role = None
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"redis does not answer: {_named(exc)}") from None
        if role and _text(role[0]) != "master":
            raise StoreUnavailable(f"redis is a {_text(role[0])}, not a primary (ROLE): a read only replica")
        try:
            await self._redis.set(self._probe_key, PROBE_VALUE, px=PROBE_TTL_MS)
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"redis refused a write: {_named(exc)}") from None

    async def ping(self) -> bool:
        """``writable`` as the protocol's yes or no."""
        try:
            await self.writable()
        except StoreUnavailable:
            return False
        return True

    async def eviction_policy(self) -> str | None:
        """Redis's ``maxmemory-policy``: from CONFIG GET, else from INFO memory (managed Redis often refuses CONFIG);
        None when neither answers within POLICY_TIMEOUT_S."""
        for read in (self._policy_from_config, self._policy_from_info):
            try:
                async with asyncio.timeout(POLICY_TIMEOUT_S):
                    policy = await read()
            except (RedisError, OSError, TimeoutError):
                continue
            if policy:
                return policy
        return None

    async def _policy_from_config(self) -> str | None:
        answer = await self._redis.config_get("maxmemory-policy")
        value = next(iter(answer.values()), None)
        return _text(value) if value else None

    async def _policy_from_info(self) -> str | None:
        value = (await self._redis.info("memory")).get("maxmemory_policy")
        return str(value) if value else None

    async def aclose(self) -> None:
        await self._redis.aclose()


def _about_the_key(error: Exception) -> bool:
    """WRONGTYPE is the one refusal about a key rather than Redis: redis-py gives every mapped code (OOM, READONLY,
    MOVED...) a subclass of its own, and leaves unmapped ones (MISCONF, BUSY, WRONGTYPE) a plain ResponseError whose
    message starts with the code."""
    return type(error) is ResponseError and str(error).startswith("WRONGTYPE")


def _entry_error(result: Any) -> str | None:
    """One pipeline result: None if Redis did it (or left the key to a later vector), else why this key refused
    it. A refusal that is not about the key means Redis as a whole is in trouble: StoreUnavailable."""
    if not isinstance(result, Exception):
        return None
    if _about_the_key(result):
        return f"redis refused the write to this key: {result}"
    raise StoreUnavailable(f"redis refused the write: {_named(result)}")


def _existing(row: Any) -> Existing:
    """What a key holds of ours. Unreadable fields (a caller's "n/a" in embedding_dimensions) count as absent:
    the write that follows replaces them with ours."""
    if isinstance(row, Exception):
        if _about_the_key(row):
            return Existing(error=f"redis refused to read this key: {row}")
        raise StoreUnavailable(f"redis read failed: {_named(row)}")
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


def _named(exc: BaseException) -> str:
    """An exception as an operator reads it: redis-py's class names the code it strips (OutOfMemoryError for OOM)."""
    return f"{type(exc).__name__}: {exc}"


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
