"""The deferred lane's Batch API path against real RabbitMQ, real Redis and the emulator (through google-genai): the
vectors its jobs write, and the job records and headers it must survive (issue 17, issue 20 item 2)."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aio_pika
import httpx
import numpy as np
import orjson
import pytest
import redis.asyncio as aioredis
from google import genai
from google.genai import types

from tests.integration.helpers import get_one, queue_depth, wait_until
from tests.integration.test_deferred import batch_settings
from worker import topology
from worker.client import EmbedClient
from worker.deferred.jobs import attempts
from worker.emulator import EmulatorState, EmulatorThread
from worker.messages import encode_deferred_items
from worker.vectors import expected_vector

pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore::google.genai._common.ExperimentalWarning")]

G1, G2 = "gemini-embedding-001", "gemini-embedding-2"


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


async def eventually(probe: Callable[[], Awaitable[bool]], what: str, timeout: float = 20) -> None:
    """Until ``probe`` holds (Redis and the emulator offer no event for these), within ``timeout``."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not await probe():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        await asyncio.sleep(0.05)


async def vectors_of(redis: aioredis.Redis, keys: list[str]) -> list[np.ndarray]:
    """The vectors the keys hold, once all of them hold one."""

    async def all_there() -> bool:
        return all([await redis.hexists(key, "embedding") for key in keys])

    await eventually(all_there, f"vectors for {len(keys)} keys")
    raw = [await redis.hget(key, "embedding") for key in keys]
    return [np.frombuffer(r, dtype="<f4") for r in raw if isinstance(r, bytes)]


def vector(text: str, model: str = G1, task_type: str | None = "RETRIEVAL_DOCUMENT") -> np.ndarray:
    return expected_vector(text, model=model, task_type=task_type, dims=None, full_dims=3072)


async def publish(vhost: str, items: list[tuple[str, str]], headers: dict[str, Any]) -> None:
    """A deferred message as any publisher may send it, with headers of its choosing."""
    connection = await aio_pika.connect(vhost)
    try:
        channel = await connection.channel()
        exchange = await channel.get_exchange(topology.EXCHANGE, ensure=False)
        body = encode_deferred_items(items, task_type="RETRIEVAL_DOCUMENT")
        message = aio_pika.Message(body, headers=headers, content_type="application/json", delivery_mode=2)
        await exchange.publish(message, routing_key=topology.DEFERRED_KEY)
    finally:
        await connection.close()


@dataclass
class Lane:
    """One test's worker (Batch API on), its broker vhost, its Redis keys and the emulator behind it."""

    vhost: str
    redis: aioredis.Redis
    prefix: str
    emulator: EmulatorState
    start: Callable[[], Awaitable[Any]]

    @property
    def jobs_key(self) -> str:
        return f"{self.prefix}internal:batch-jobs"

    async def depth(self) -> int:
        return await queue_depth(self.vhost, topology.DEFERRED_QUEUE)


@pytest.fixture
def lane(start_worker: Any, vhost: str, redis: aioredis.Redis, redis_url: str, emulator_state: EmulatorState) -> Lane:
    prefix = f"test:{uuid.uuid4().hex[:8]}:"
    return Lane(vhost, redis, prefix, emulator_state, lambda: start_worker(**batch_settings(redis_url, prefix)))


def jobs_ready(state: EmulatorState) -> None:
    """Every pending job of the emulator finishes at its next read."""
    for job in list(state.jobs.values()):
        job.ready_at = 0.0


# ---------------------------------------------------------------------- one request, whichever path sends it
async def test_a_batch_job_writes_the_vector_the_sync_path_gives(lane: Lane) -> None:
    """gemini-embedding-2 takes its task in the prompt: a job must send "title: none | text: ..." and no taskType,
    as the synchronous path does, or the same key gets another vector depending on the lane's mode."""
    await lane.start()
    async with EmbedClient(lane.vhost, timeout=30) as client:
        await client.defer([(f"{lane.prefix}doc", "the cat sat")], model=G2, task_type="RETRIEVAL_DOCUMENT")
        assert await client.flush() == 0  # handed to a job
        sync = await client.embed(["the cat sat"], model=G2, task_type="RETRIEVAL_DOCUMENT", binary=True)
    (from_job,) = await vectors_of(lane.redis, [f"{lane.prefix}doc"])
    assert np.array_equal(from_job, sync[0])
    assert np.allclose(from_job, vector("title: none | text: the cat sat", G2, None), atol=1e-6)
    (job,) = lane.emulator.jobs.values()
    assert [r["content"] for r in job.requests] == [{"parts": [{"text": "title: none | text: the cat sat"}]}]
    assert all("taskType" not in r for r in job.requests)


async def test_a_text_a_job_wrote_is_not_sent_again(lane: Lane) -> None:
    """DEFERRED_SKIP_UNCHANGED reads the hash a job wrote as the synchronous path's (keyed with the task type)."""
    await lane.start()
    async with EmbedClient(lane.vhost, timeout=30) as client:
        await client.defer([(f"{lane.prefix}same", "same text")], task_type="RETRIEVAL_DOCUMENT")
        await client.flush()
        await vectors_of(lane.redis, [f"{lane.prefix}same"])
        await client.defer([(f"{lane.prefix}same", "same text")], task_type="RETRIEVAL_DOCUMENT")
        assert await client.flush() == 0
    assert len(lane.emulator.jobs) == 1 and lane.emulator.calls == 0


# ---------------------------------------------------------------------- a job the API no longer knows
async def test_a_job_the_api_forgot_is_sent_again(lane: Lane, emulator: EmulatorThread) -> None:
    """Before: its 404 was logged on every poll, forever, and its items were never written, parked or requeued."""
    lane.emulator.batch_delay_s = 3600
    await lane.start()
    items = [(f"{lane.prefix}f{i}", f"forgotten {i}") for i in range(3)]
    async with EmbedClient(lane.vhost, timeout=30) as client:
        await client.defer(items, task_type="RETRIEVAL_DOCUMENT")
        await client.flush()
        (job,) = lane.emulator.jobs.values()
        async with httpx.AsyncClient() as http:  # the API's batches.delete, through the SDK
            options = types.HttpOptions(base_url=emulator.base_url, httpx_async_client=http)
            await genai.Client(api_key="k", http_options=options).aio.batches.delete(name=job.name)
        lane.emulator.batch_delay_s = 0
        await wait_until(lane.depth, 1)  # its items came back to the queue
        await client.flush()  # a new job
    got = await vectors_of(lane.redis, [k for k, _ in items])
    assert all(np.allclose(v, vector(t), atol=1e-6) for v, (_, t) in zip(got, items, strict=True))
    assert await lane.redis.hgetall(lane.jobs_key) == {}
    assert len(lane.emulator.jobs) == 1  # the second job (the first was deleted)


# ---------------------------------------------------------------------- x-batch-attempts, as any publisher may set it
@pytest.mark.parametrize(
    ("value", "want"),
    [(None, 0), (2, 2), ("2", 2), (" 2 ", 2), (-5, 0), ("-5", 0), ("abc", 0), ("", 0), (2.5, 0), (True, 0), (b"2", 0)],
)
def test_attempts_reads_any_header_value(value: Any, want: int) -> None:
    headers = {} if value is None else {topology.BATCH_ATTEMPTS_HEADER: value}
    assert attempts(headers) == want


def test_attempts_is_clamped_to_the_limit() -> None:
    assert attempts({topology.BATCH_ATTEMPTS_HEADER: 10**30}, limit=3) == 3
    assert attempts({topology.BATCH_ATTEMPTS_HEADER: -(10**30)}, limit=3) == 0


async def test_a_non_integer_attempts_header_does_not_wedge_the_lane(lane: Lane) -> None:
    """Before: "abc" raised ValueError in the round, the flush failed, and the message stayed unacked until restart."""
    await lane.start()
    await publish(lane.vhost, [(f"{lane.prefix}abc", "odd header")], {topology.BATCH_ATTEMPTS_HEADER: "abc"})
    async with EmbedClient(lane.vhost, timeout=30) as client:
        assert await client.flush() == 0  # handed to a job, the message acked
    (got,) = await vectors_of(lane.redis, [f"{lane.prefix}abc"])
    assert np.allclose(got, vector("odd header"), atol=1e-6)
    assert len(lane.emulator.jobs) == 1
    assert await lane.depth() == 0


async def test_a_negative_attempts_header_gets_no_extra_jobs(lane: Lane) -> None:
    """Every job fails: items take the synchronous path after 3 failed jobs, not 3 + 5 (before: -5 counted up)."""
    lane.emulator.batch_fail_next = 100
    await lane.start()
    await publish(lane.vhost, [(f"{lane.prefix}neg", "negative header")], {topology.BATCH_ATTEMPTS_HEADER: -5})
    async with EmbedClient(lane.vhost, timeout=30) as client:
        for _ in range(10):
            if await client.flush() == 1:  # written on the synchronous path
                break
            await wait_until(lane.depth, 1)  # the failed job's items came back
    (got,) = await vectors_of(lane.redis, [f"{lane.prefix}neg"])
    assert np.allclose(got, vector("negative header"), atol=1e-6)
    assert len(lane.emulator.jobs) == 3 and lane.emulator.calls == 1


# ---------------------------------------------------------------------- job records that are not what we wrote
async def test_a_record_naming_a_text_it_does_not_hold_is_parked_and_the_other_jobs_collected(
    lane: Lane, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: KeyError with a traceback on every poll, and the jobs recorded after it were never collected."""
    lane.emulator.batch_delay_s = 3600
    await lane.start()
    async with EmbedClient(lane.vhost, timeout=30) as client:
        await client.defer([(f"{lane.prefix}a{i}", f"text {i}") for i in range(2)], task_type="RETRIEVAL_DOCUMENT")
        await client.defer(
            [(f"{lane.prefix}b{i}", f"text {i}") for i in range(2)],
            task_type="RETRIEVAL_DOCUMENT",
            output_dimensionality=768,
        )
        await client.flush()  # two configurations: two jobs
    (name, raw), (_, kept) = (await lane.redis.hgetall(lane.jobs_key)).items()  # polled in this order
    altered = orjson.loads(raw)
    altered["items"][0][1] = "a text this job was not sent"
    await lane.redis.hset(lane.jobs_key, name, orjson.dumps(altered))  # keeps its place, first
    jobs_ready(lane.emulator)

    collected = orjson.loads(kept)
    dims = collected["config"]["output_dimensionality"]
    got = await vectors_of(lane.redis, [k for k, _ in collected["items"]])
    for vec, (_, text) in zip(got, collected["items"], strict=True):
        want = expected_vector(text, model=G1, task_type="RETRIEVAL_DOCUMENT", dims=dims, full_dims=3072)
        assert np.allclose(vec, want, atol=1e-6)
    parked = await get_one(lane.vhost, topology.DEFERRED_DLQ)
    assert [[i["key"], i["text"]] for i in orjson.loads(parked.body)["items"]] == altered["items"]
    assert "record names texts its job was not sent" in str(parked.headers[topology.ERROR_HEADER])

    async def records_gone() -> bool:
        return not await lane.redis.exists(lane.jobs_key)

    await eventually(records_gone, "the records gone")
    assert not any([await lane.redis.hexists(k, "embedding") for k, _ in altered["items"]])  # not trusted
    said = [r for r in caplog.records if r.levelno >= logging.ERROR and "was not sent" in r.getMessage()]
    assert len(said) == 1 and said[0].exc_info is None


# ---------------------------------------------------------------------- records lost to eviction
async def test_a_record_lost_while_its_job_runs_is_put_back(lane: Lane, caplog: pytest.LogCaptureFixture) -> None:
    """An evicting Redis drops the whole hash of records at once. Before: the items of its jobs, whose messages were
    acked, were silently forgotten. Now a poller that saw a job running puts its record back."""
    lane.emulator.batch_delay_s = 3600
    await lane.start()
    items = [(f"{lane.prefix}e{i}", f"evicted {i}") for i in range(3)]
    async with EmbedClient(lane.vhost, timeout=30) as client:
        await client.defer(items, task_type="RETRIEVAL_DOCUMENT")
        await client.flush()
    record = await lane.redis.hgetall(lane.jobs_key)
    assert len(record) == 1

    async def polled() -> bool:
        return lane.emulator.batch_reads >= 1  # a poll found the job running

    async def put_back() -> bool:
        return bool(await lane.redis.hgetall(lane.jobs_key) == record)

    await eventually(polled, "a poll of the job")
    await lane.redis.delete(lane.jobs_key)  # what eviction does
    await eventually(put_back, "the record put back")
    jobs_ready(lane.emulator)
    got = await vectors_of(lane.redis, [k for k, _ in items])
    assert all(np.allclose(v, vector(t), atol=1e-6) for v, (_, t) in zip(got, items, strict=True))
    assert any("put back from the copy" in r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)
