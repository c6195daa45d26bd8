"""The deferred lane against a Redis as people run it: full under noeviction, a read-only replica, down, evicting,
or the cache in a Redis of its own (issue 17). Every Redis here is the test's own ``redis-server``, started and
flipped by the test; the shared one at REDIS_URL is never reconfigured."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aio_pika
import numpy as np
import pytest
import redis.asyncio as aioredis

from tests.integration.helpers import queue_depth, wait_until
from tests.integration.test_deferred import SLOW, stored
from worker import topology
from worker.client import EmbedClient, EmbedClientError
from worker.emulator import EmulatorState
from worker.messages import EmbedConfig, encode_deferred_items
from worker.ports import StoredVector
from worker.redis_store import RedisVectorStore
from worker.vectors import expected_vector

pytestmark = pytest.mark.integration

TASK = "RETRIEVAL_DOCUMENT"


async def wait_for_keys(url: str, keys: list[str], timeout: float = 30) -> None:
    """Until every key holds a vector (Redis offers no event for another client's write)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not all([b"embedding" in await stored(url, key) for key in keys]):
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("vectors did not arrive")
        await asyncio.sleep(0.05)


def check_vector(fields: dict[bytes, bytes], text: str, *, dims: int | None = None, task_type: str = TASK) -> None:
    got = np.frombuffer(fields[b"embedding"], dtype="<f4")
    want = expected_vector(text, model="gemini-embedding-001", task_type=task_type, dims=dims, full_dims=3072)
    assert got.shape == want.shape and np.allclose(got, want, atol=1e-6), f"wrong vector for {text!r}"


async def flush_refused(client: EmbedClient, timeout: float = 5) -> str:
    """Flush and expect store_unavailable within ``timeout``; the message."""
    with pytest.raises(EmbedClientError) as info:
        await client.flush(timeout=timeout)
    assert info.value.code == "store_unavailable" and info.value.retryable, info.value
    return str(info.value)


# ---------------------------------------------------------------------- a Redis that takes no writes
async def test_a_full_redis_requeues_the_round_and_the_lane_drains_once_there_is_room(
    start_worker: Any, vhost: str, own_redis: Any, prefix: str, emulator_state: EmulatorState
) -> None:
    """Before: every message was parked as a bad item ("command not allowed when used memory > 'maxmemory'") and
    flush answered {"flushed": 0}."""
    server = own_redis("--maxmemory-policy", "noeviction")
    server.command("CONFIG", "SET", "maxmemory", "1")  # whatever it holds is more: full
    await start_worker(redis_url=server.url, **SLOW)
    items = [(f"{prefix}a", "first text"), (f"{prefix}b", "second text")]
    async with EmbedClient(vhost, timeout=30) as client:
        await client.defer(items, task_type=TASK)
        assert "maxmemory" in await flush_refused(client)
        assert await queue_depth(vhost, "embed.deferred") == 1  # back in the queue, whole
        assert await queue_depth(vhost, "embed.deferred.dlq") == 0
        assert emulator_state.texts == 0  # nothing paid for: the lane did not take what it could not write
        server.command("CONFIG", "SET", "maxmemory", "0")  # room again; the lane notices on its own
        await wait_for_keys(server.url, [key for key, _ in items])
    for key, text in items:
        check_vector(await stored(server.url, key), text)
    assert emulator_state.texts == 2


async def test_redis_filling_up_during_a_round_costs_no_second_embedding(
    start_worker: Any, vhost: str, own_redis: Any, prefix: str, emulator_state: EmulatorState
) -> None:
    """200 vectors of 12 KiB do not fit in 2 MB: the write fails part way. The round goes back to the queue, its
    vectors wait in the worker's memory, and once Redis has room they are written without another upstream call."""
    server = own_redis("--maxmemory", "2mb", "--maxmemory-policy", "noeviction")
    await start_worker(redis_url=server.url, **SLOW)
    items = [(f"{prefix}k{i}", f"text number {i}") for i in range(200)]
    async with EmbedClient(vhost, timeout=30) as client:
        await client.defer(items, task_type=TASK)
        assert "OutOfMemoryError" in await flush_refused(client, timeout=30)
        assert emulator_state.texts == 200
        assert await queue_depth(vhost, "embed.deferred.dlq") == 0
        server.command("CONFIG", "SET", "maxmemory", "0")  # our own server: room again
        await wait_for_keys(server.url, [key for key, _ in items])
    for key, text in items[::37]:
        check_vector(await stored(server.url, key), text)
    assert emulator_state.texts == 200  # before the fix to keep them, 200 more


async def test_a_read_only_replica_pauses_the_lane_until_it_is_promoted(
    start_worker: Any, vhost: str, own_redis: Any, prefix: str, emulator_state: EmulatorState
) -> None:
    """Before: every item was parked ("You can't write against a read only replica"); PING passed, so the lane never
    paused either."""
    primary = own_redis()
    replica = own_redis("--replicaof", "127.0.0.1", str(primary.port))
    await start_worker(redis_url=replica.url, **SLOW)
    async with EmbedClient(vhost, timeout=30) as client:
        await client.defer([(f"{prefix}r", "replicated later")], task_type=TASK)
        assert "replica" in await flush_refused(client)
        assert "replica" in await flush_refused(client)  # paused: answered at once, again
        assert await queue_depth(vhost, "embed.deferred") == 1
        assert await queue_depth(vhost, "embed.deferred.dlq") == 0 and emulator_state.texts == 0
        replica.command("REPLICAOF", "NO", "ONE")
        assert await client.flush(timeout=10) == 1  # the flush finds it writable and drains
    check_vector(await stored(replica.url, f"{prefix}r"), "replicated later")


async def test_no_batch_api_job_is_paid_for_while_redis_is_read_only(
    start_worker: Any, vhost: str, own_redis: Any, prefix: str, emulator_state: EmulatorState
) -> None:
    """Before: 6 jobs in 40 s, none of them recorded: each round submitted one, failed to record it, paused until
    PING answered (at once) and went again."""
    primary = own_redis()
    replica = own_redis("--replicaof", "127.0.0.1", str(primary.port))
    await start_worker(
        redis_url=replica.url,
        deferred_batch_api=True,
        deferred_batch_api_poll_s=0.1,
        redis_key_prefix=f"{prefix}internal:",
        **SLOW,
    )
    async with EmbedClient(vhost, timeout=30) as client:
        await client.defer([(f"{prefix}j", "one job only")], task_type=TASK)
        await flush_refused(client)
        await flush_refused(client)
        assert emulator_state.jobs == {}
        replica.command("REPLICAOF", "NO", "ONE")
        assert await client.flush(timeout=10) == 0  # submitted and recorded
        await wait_for_keys(replica.url, [f"{prefix}j"])
    assert len(emulator_state.jobs) == 1
    check_vector(await stored(replica.url, f"{prefix}j"), "one job only")


async def test_every_flush_is_answered_at_once_while_redis_is_down(
    start_worker: Any, vhost: str, own_redis: Any, prefix: str
) -> None:
    """Before: the second flush got no answer, and the CLI said no worker answered."""
    server = own_redis()
    await start_worker(redis_url=server.url, **SLOW)
    server.stop()
    async with EmbedClient(vhost, timeout=30) as client:
        await client.defer([(f"{prefix}d", "while down")], task_type=TASK)
        await flush_refused(client, timeout=20)
        for _ in range(3):
            await flush_refused(client, timeout=3)
        await wait_until(lambda: queue_depth(vhost, "embed.deferred"), 1)


# ---------------------------------------------------------------------- eviction and the cache
async def test_the_worker_warns_once_when_lane_data_lives_in_an_evicting_redis(
    start_worker: Any, own_redis: Any, caplog: pytest.LogCaptureFixture
) -> None:
    server = own_redis("--maxmemory-policy", "allkeys-lru")
    with caplog.at_level(logging.WARNING):
        await start_worker(redis_url=server.url, **SLOW)
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "allkeys-lru" in r.getMessage()]
    assert len(lines) == 1, lines
    assert "REDIS_URL" in lines[0] and "evict" in lines[0] and "CACHE_REDIS_URL" in lines[0]


@pytest.mark.parametrize(
    ("args", "policy"),
    [
        (["--maxmemory-policy", "allkeys-lfu"], "allkeys-lfu"),
        (["--maxmemory-policy", "allkeys-random", "--rename-command", "CONFIG", ""], "allkeys-random"),  # INFO
        (["--maxmemory-policy", "allkeys-lru", "--rename-command", "CONFIG", "", "--rename-command", "INFO", ""], None),
        ([], "noeviction"),
    ],
    ids=["config", "info when CONFIG is refused", "neither answers", "default"],
)
async def test_the_eviction_policy_is_read_where_redis_lets_us(own_redis: Any, args: list[str], policy: str) -> None:
    server = own_redis(*args)
    store = RedisVectorStore(server.url, "jobs", probe_key="probe")
    try:
        assert await store.eviction_policy() == policy
    finally:
        await store.aclose()


async def test_the_embedding_cache_lives_in_cache_redis_url(
    start_worker: Any, vhost: str, own_redis: Any, redis_url: str, prefix: str
) -> None:
    """Before: CACHE_REDIS_URL was read and ignored; the cache went into REDIS_URL with the job records."""
    cache = own_redis("--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lru")
    await start_worker(redis_url=redis_url, cache_redis_url=cache.url, cache_ttl_s=60, redis_key_prefix=prefix)
    async with EmbedClient(vhost, timeout=30) as client:
        await client.embed(["cache me"], task_type=TASK)
    own = aioredis.Redis.from_url(cache.url)
    shared = aioredis.Redis.from_url(redis_url)
    try:
        deadline = asyncio.get_running_loop().time() + 10
        while not await own.keys(f"{prefix}cache:*"):  # written after the reply, in the background
            assert asyncio.get_running_loop().time() < deadline, "the cache entry never reached CACHE_REDIS_URL"
            await asyncio.sleep(0.05)
        assert await shared.keys(f"{prefix}cache:*") == []
    finally:
        await own.aclose()
        await shared.aclose()


# ---------------------------------------------------------------------- write order across rounds and jobs
def _entry(key: str, text: str) -> StoredVector:
    cfg = EmbedConfig("gemini-embedding-001", TASK)
    vector = expected_vector(text, model=cfg.model, task_type=TASK, dims=None, full_dims=3072)
    return StoredVector(key, vector, cfg.model, text)


async def test_a_job_older_than_the_keys_vector_leaves_it_alone(redis_url: str, prefix: str) -> None:
    """The compare-and-set for collecting Batch API jobs: a job writes a key only if no later round wrote it."""
    store = RedisVectorStore(redis_url, f"{prefix}jobs", probe_key=f"{prefix}probe")
    try:
        job_seq = await store.clock()  # the job's round took its messages
        later_seq = await store.clock()  # a later round took newer text for the same key
        assert later_seq > job_seq
        await store.save_job("batches/old", b"{}")
        assert await store.write([_entry(f"{prefix}doc", "new text")], seq=later_seq) == [None]
        errors = await store.complete_job(
            "batches/old", [_entry(f"{prefix}doc", "old text"), _entry(f"{prefix}fresh", "old text")], seq=job_seq
        )
        assert errors == [None, None]
        check_vector(await stored(redis_url, f"{prefix}doc"), "new text")  # kept: written by a later round
        check_vector(await stored(redis_url, f"{prefix}fresh"), "old text")  # absent before: written
        assert await store.jobs() == {}  # the record goes either way
        assert await store.write([_entry(f"{prefix}doc", "newest")], seq=await store.clock()) == [None]
        check_vector(await stored(redis_url, f"{prefix}doc"), "newest")
    finally:
        await store.aclose()


async def test_an_older_batch_job_finishing_later_does_not_overwrite_newer_text(
    start_worker: Any, vhost: str, redis_url: str, prefix: str, emulator_state: EmulatorState
) -> None:
    """doc gets "old text" through a Batch API job that takes a while, then "new text" on the synchronous path (an
    item whose jobs failed 3 times): the job, collected last, must not put the old vector back."""
    emulator_state.batch_delay_s = 1.5
    jobs_key = f"{prefix}internal:batch-jobs"
    await start_worker(
        redis_url=redis_url,
        deferred_batch_api=True,
        deferred_batch_api_poll_s=0.1,
        redis_key_prefix=f"{prefix}internal:",
        **SLOW,
    )
    async with EmbedClient(vhost, timeout=30) as client:
        await client.defer([(f"{prefix}doc", "old text")], task_type=TASK)
        assert await client.flush() == 0  # the job is submitted and recorded
        connection = await aio_pika.connect(vhost)
        async with connection:
            channel = await connection.channel()
            exchange = await channel.get_exchange(topology.EXCHANGE)
            body = encode_deferred_items([(f"{prefix}doc", "new text")], task_type=TASK)
            headers = {topology.BATCH_ATTEMPTS_HEADER: 3}  # takes the synchronous path
            await exchange.publish(aio_pika.Message(body, headers=headers), routing_key=topology.DEFERRED_KEY)
        assert await client.flush() == 1
    check_vector(await stored(redis_url, f"{prefix}doc"), "new text")
    shared = aioredis.Redis.from_url(redis_url)
    try:
        deadline = asyncio.get_running_loop().time() + 20
        while await shared.hlen(jobs_key):  # the job is collected
            assert asyncio.get_running_loop().time() < deadline, "the job was never collected"
            await asyncio.sleep(0.05)
    finally:
        await shared.aclose()
    check_vector(await stored(redis_url, f"{prefix}doc"), "new text")
