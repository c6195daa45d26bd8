"""The fire-and-forget lane against real RabbitMQ, real Redis and the emulator."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
import orjson
import pytest
import redis.asyncio as aioredis

from tests.e2e.processes import WorkerProcess, worker_env
from tests.integration.helpers import get_one, queue_depth, wait_until
from worker.client import EmbedClient, EmbedClientError
from worker.emulator import BAD_INPUT_MARKER, EmulatorState, EmulatorThread
from worker.vectors import expected_vector

pytestmark = pytest.mark.integration

SLOW = {"deferred_flush_interval_s": 3600, "deferred_wake_messages": 0}  # only flush requests wake the lane


async def stored(redis_url: str, key: str) -> dict[bytes, bytes]:
    client = aioredis.Redis.from_url(redis_url)
    try:
        return await client.hgetall(key)  # type: ignore[no-any-return]
    finally:
        await client.aclose()


def check_vector(fields: dict[bytes, bytes], text: str, dims: int | None = None) -> None:
    full = 3072
    got = np.frombuffer(fields[b"embedding"], dtype="<f4")
    want = expected_vector(
        text, model="gemini-embedding-001", task_type="RETRIEVAL_DOCUMENT", dims=dims, full_dims=full
    )
    assert got.shape == want.shape and np.allclose(got, want, atol=1e-6), f"wrong vector for {text!r}"
    assert fields[b"embedding_model"] == b"gemini-embedding-001"
    assert int(fields[b"embedding_dimensions"]) == (dims or full)


async def test_vectors_land_in_the_right_hashes_and_duplicates_cost_nothing(
    start_worker: Any, vhost: str, redis_url: str, prefix: str, emulator_state: EmulatorState
) -> None:
    await start_worker(redis_url=redis_url, **SLOW)
    seed = aioredis.Redis.from_url(redis_url)
    await seed.hset(f"{prefix}doc:0", mapping={"title": "keep me"})
    await seed.aclose()
    items = [(f"{prefix}doc:{i}", f"document {i}") for i in range(150)]
    async with EmbedClient(vhost, timeout=30) as client:
        await client.defer(items[:100], task_type="RETRIEVAL_DOCUMENT", output_dimensionality=768)
        await client.defer(items[100:], task_type="RETRIEVAL_DOCUMENT", output_dimensionality=768)
        # duplicates: a pending key again (latest text wins), and the same text under new keys
        await client.defer(
            [(f"{prefix}doc:5", "document 5 revised")], task_type="RETRIEVAL_DOCUMENT", output_dimensionality=768
        )
        await client.defer(
            [(f"{prefix}copy:{i}", "document 7") for i in range(3)],
            task_type="RETRIEVAL_DOCUMENT",
            output_dimensionality=768,
        )
        written = await client.flush()
    assert written == 153
    # 150 distinct texts: doc 5 once (its revised text), and the 3 copies share doc 7's text and slot
    assert emulator_state.texts == 150
    for key, text in items:
        fields = await stored(redis_url, key)
        check_vector(fields, "document 5 revised" if key.endswith("doc:5") else text, dims=768)
    for i in range(3):
        check_vector(await stored(redis_url, f"{prefix}copy:{i}"), "document 7", dims=768)
    assert (await stored(redis_url, f"{prefix}doc:0"))[b"title"] == b"keep me"
    assert await queue_depth(vhost, "embed.deferred") == 0


async def test_unchanged_keys_are_skipped_on_the_next_flush(
    start_worker: Any, vhost: str, redis_url: str, prefix: str, emulator_state: EmulatorState
) -> None:
    await start_worker(redis_url=redis_url, **SLOW)
    items = [(f"{prefix}k{i}", f"stable {i}") for i in range(10)]
    async with EmbedClient(vhost, timeout=30) as client:
        await client.defer(items, task_type="RETRIEVAL_DOCUMENT")
        assert await client.flush() == 10
        calls = emulator_state.calls
        await client.defer([*items[:5], (f"{prefix}k9", "changed 9")], task_type="RETRIEVAL_DOCUMENT")
        assert await client.flush() == 1
    assert emulator_state.calls == calls + 1 and emulator_state.texts == 11
    check_vector(await stored(redis_url, f"{prefix}k9"), "changed 9")


async def test_poison_messages_are_dead_lettered_and_the_rest_written(
    start_worker: Any, vhost: str, redis_url: str, prefix: str
) -> None:
    await start_worker(redis_url=redis_url, **SLOW)
    async with EmbedClient(vhost, timeout=30) as client:
        await client.defer([(f"{prefix}good", "fine text")], task_type="RETRIEVAL_DOCUMENT")
        await client.defer([(f"{prefix}bad", f"poison {BAD_INPUT_MARKER}")], task_type="RETRIEVAL_DOCUMENT")
        await client.defer([], task_type="RETRIEVAL_DOCUMENT")  # invalid: no items
        assert await client.flush() == 1
    check_vector(await stored(redis_url, f"{prefix}good"), "fine text")
    assert await stored(redis_url, f"{prefix}bad") == {}
    parked = {(await get_one(vhost, "embed.deferred.dlq")).body for _ in range(2)}
    assert any(b"poison" in body for body in parked) and any(b'"items":[]' in body for body in parked)


async def test_the_interval_flushes_without_being_asked(
    start_worker: Any, vhost: str, redis_url: str, prefix: str
) -> None:
    await start_worker(redis_url=redis_url, deferred_flush_interval_s=0.3, deferred_wake_messages=0)
    async with EmbedClient(vhost, timeout=30) as client:
        await client.defer([(f"{prefix}timed", "on a timer")], task_type="RETRIEVAL_DOCUMENT")
    for _ in range(100):
        if await stored(redis_url, f"{prefix}timed"):
            break
        await asyncio.sleep(0.05)
    check_vector(await stored(redis_url, f"{prefix}timed"), "on a timer")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def private_redis() -> Iterator[tuple[str, Any]]:
    """A Redis of our own that the test can stop and start again (for the outage test)."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed here")  # .ci/run installs it
    port = _free_port()
    args = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    procs: list[subprocess.Popen[bytes]] = []

    def start() -> None:
        procs.append(subprocess.Popen(args, stdout=subprocess.DEVNULL))
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return
            except OSError:
                import time

                time.sleep(0.05)
        raise RuntimeError("redis did not start")

    def stop() -> None:
        procs[-1].terminate()
        procs[-1].wait(10)

    start()
    yield f"redis://127.0.0.1:{port}/0", (start, stop)
    for p in procs:
        if p.poll() is None:
            p.terminate()
            p.wait(10)


async def test_redis_outage_parks_work_and_recovers(
    start_worker: Any, vhost: str, private_redis: tuple[str, Any], prefix: str
) -> None:
    url, (start, stop) = private_redis
    await start_worker(redis_url=url, **SLOW)
    stop()
    async with EmbedClient(vhost, timeout=30) as client:
        await client.defer(
            [(f"{prefix}a", "survives the outage"), (f"{prefix}b", "so do I")], task_type="RETRIEVAL_DOCUMENT"
        )
        with pytest.raises(EmbedClientError) as info:
            await client.flush()
        assert info.value.code == "store_unavailable" and info.value.retryable
        await wait_until(lambda: queue_depth(vhost, "embed.deferred"), 1)  # back in the queue, unacked none
        start()
        # the lane notices Redis is back and drains on its own
        for _ in range(200):
            if await stored(url, f"{prefix}b"):
                break
            await asyncio.sleep(0.05)
    check_vector(await stored(url, f"{prefix}a"), "survives the outage")
    check_vector(await stored(url, f"{prefix}b"), "so do I")


async def test_worker_killed_before_the_write_loses_nothing(
    vhost: str, emulator: EmulatorThread, emulator_state: EmulatorState, redis_url: str, prefix: str
) -> None:
    emulator_state.latency_ms = 1500  # the round is mid-upstream-call when the worker dies
    env = worker_env(
        vhost, emulator.base_url, redis_url=redis_url, deferred_flush_interval_s=3600, deferred_wake_messages=0
    )
    victim = WorkerProcess(env)
    try:
        await asyncio.to_thread(victim.wait_for_line, "ready:")
        items = [(f"{prefix}kill:{i}", f"killed text {i}") for i in range(20)]
        async with EmbedClient(vhost, timeout=30) as client:
            await client.defer(items, task_type="RETRIEVAL_DOCUMENT")
            flushing = asyncio.create_task(client.flush())
            await wait_until(lambda: queue_depth(vhost, "embed.deferred"), 0)  # the round took it
            victim.kill()
            flushing.cancel()
            emulator_state.latency_ms = 0
            survivor = WorkerProcess(env)
            try:
                await asyncio.to_thread(survivor.wait_for_line, "ready:")
                assert await client.flush() == 20
            finally:
                survivor.stop()
    finally:
        victim.kill()
    for key, text in items:
        check_vector(await stored(redis_url, key), text)


@pytest.mark.parametrize(
    ("lane", "said"),
    [("deferred", "3 items handed over; this flush wrote 3 vectors"), ("bulk", "3 items embedded on the bulk lane")],
)
async def test_example_ingestion_script(
    start_worker: Any, vhost: str, redis_url: str, prefix: str, tmp_path: Any, *, lane: str, said: str
) -> None:
    await start_worker(redis_url=redis_url, **SLOW)
    source = tmp_path / "docs.txt"
    source.write_text("first document\nsecond document\n\nthird document\n")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "examples/ingest.py",
        str(source),
        "--prefix",
        prefix,
        "--amqp",
        vhost,
        "--redis",
        redis_url,
        "--lane",
        lane,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    assert said in out.decode()
    for i, text in enumerate(["first document", "second document", "third document"]):
        fields = await stored(redis_url, f"{prefix}{i}")
        assert fields[b"text"] == text.encode()
        got = np.frombuffer(fields[b"embedding"], dtype="<f4")
        want = expected_vector(
            text, model="gemini-embedding-001", task_type="RETRIEVAL_DOCUMENT", dims=768, full_dims=3072
        )
        assert np.allclose(got, want, atol=1e-6)


# ---------------------------------------------------------------------- Batch API jobs
def batch_settings(redis_url: str, prefix: str) -> dict[str, Any]:
    return {
        "redis_url": redis_url,
        "deferred_batch_api": True,
        "deferred_batch_api_poll_s": 0.1,
        "redis_key_prefix": f"{prefix}internal:",
        **SLOW,
    }


async def wait_for_vectors(redis_url: str, keys: list[str], timeout: float = 20) -> None:
    for _ in range(int(timeout / 0.05)):
        if all([await stored(redis_url, k) for k in keys]):
            return
        await asyncio.sleep(0.05)
    raise AssertionError("vectors did not arrive")


async def test_batch_api_jobs_embed_at_batch_prices_and_land_later(
    start_worker: Any, vhost: str, redis_url: str, prefix: str, emulator_state: EmulatorState
) -> None:
    emulator_state.batch_delay_s = 0.5  # the job is pending for a while
    await start_worker(**batch_settings(redis_url, prefix))
    items = [(f"{prefix}job:{i}", f"batch text {i}") for i in range(30)] + [(f"{prefix}dup", "batch text 3")]
    async with EmbedClient(vhost, timeout=30) as client:
        await client.defer(items, task_type="RETRIEVAL_DOCUMENT", output_dimensionality=768)
        assert await client.flush() == 0  # submitted, not yet written
    redis = aioredis.Redis.from_url(redis_url)
    assert len(await redis.hgetall(f"{prefix}internal:batch-jobs")) == 1  # the job is recorded; its messages are acked
    assert await queue_depth(vhost, "embed.deferred") == 0
    await wait_for_vectors(redis_url, [k for k, _ in items])
    for key, text in items:
        check_vector(await stored(redis_url, key), text, dims=768)
    for _ in range(100):  # the record goes in the same transaction as the vectors
        if not await redis.hgetall(f"{prefix}internal:batch-jobs"):
            break
        await asyncio.sleep(0.05)
    assert await redis.hgetall(f"{prefix}internal:batch-jobs") == {}
    await redis.aclose()
    assert emulator_state.calls == 0 and emulator_state.batch_texts == 30  # one slot per distinct text


async def test_failed_job_goes_back_to_the_queue_and_bad_items_are_parked(
    start_worker: Any, vhost: str, redis_url: str, prefix: str, emulator_state: EmulatorState
) -> None:
    emulator_state.batch_fail_next = 1
    await start_worker(**batch_settings(redis_url, prefix))
    good = [(f"{prefix}g{i}", f"good {i}") for i in range(5)]
    async with EmbedClient(vhost, timeout=30) as client:
        await client.defer([*good, (f"{prefix}bad", f"bad {BAD_INPUT_MARKER}")], task_type="RETRIEVAL_DOCUMENT")
        await client.flush()  # job 1, which fails as a whole: its items return to the queue
        await wait_until(lambda: queue_depth(vhost, "embed.deferred"), 1)
        await client.flush()  # job 2: the good items succeed, the bad one is parked
        await wait_for_vectors(redis_url, [k for k, _ in good])
    for key, text in good:
        check_vector(await stored(redis_url, key), text)
    parked = await get_one(vhost, "embed.deferred.dlq")
    assert b"bad" in parked.body and parked.headers["x-embed-error"] == "rejected by the Batch API"
    assert len(emulator_state.jobs) == 2


async def test_jobs_outlive_the_worker_that_submitted_them(
    start_worker: Any, vhost: str, redis_url: str, prefix: str, emulator_state: EmulatorState
) -> None:
    emulator_state.batch_delay_s = 1.0
    settings = batch_settings(redis_url, prefix)
    first = await start_worker(**settings)
    items = [(f"{prefix}outlive:{i}", f"outlive {i}") for i in range(8)]
    async with EmbedClient(vhost, timeout=30) as client:
        await client.defer(items, task_type="RETRIEVAL_DOCUMENT")
        await client.flush()
    await first.shutdown()  # the job is still pending; its messages are already acked
    assert await stored(redis_url, items[0][0]) == {}
    await start_worker(**settings)  # another worker picks the job up from Redis
    await wait_for_vectors(redis_url, [k for k, _ in items])
    for key, text in items:
        check_vector(await stored(redis_url, key), text)


# ---------------------------------------------------------------------- hostile keys (issue: one key blocked the lane)
async def test_keys_of_another_type_park_only_their_items(
    start_worker: Any, vhost: str, redis_url: str, prefix: str
) -> None:
    await start_worker(redis_url=redis_url, **SLOW)
    seed = aioredis.Redis.from_url(redis_url)
    await seed.set(f"{prefix}string", "a caller's string")
    await seed.rpush(f"{prefix}list", "a", "b")
    await seed.hset(f"{prefix}odd", mapping={"embedding_dimensions": "n/a", "title": "keep me"})
    async with EmbedClient(vhost, timeout=30) as client:
        await client.defer(
            [(f"{prefix}a", "first"), (f"{prefix}string", "second"), (f"{prefix}odd", "third")],
            task_type="RETRIEVAL_DOCUMENT",
        )
        await client.defer([(f"{prefix}list", "fourth")], task_type="RETRIEVAL_DOCUMENT")
        assert await client.flush() == 2  # before: store_unavailable, while Redis was healthy
    check_vector(await stored(redis_url, f"{prefix}a"), "first")
    odd = await stored(redis_url, f"{prefix}odd")
    check_vector(odd, "third")
    assert odd[b"title"] == b"keep me"
    assert await seed.get(f"{prefix}string") == b"a caller's string"  # never retyped
    parked = [await get_one(vhost, "embed.deferred.dlq") for _ in range(2)]
    keys = sorted(item["key"] for m in parked for item in orjson.loads(m.body)["items"])
    assert keys == [f"{prefix}list", f"{prefix}string"]
    assert all("WRONGTYPE" in m.headers["x-embed-error"] for m in parked)
    assert await queue_depth(vhost, "embed.deferred") == 0
    await seed.aclose()


async def test_a_good_text_superseded_by_a_rejected_one_is_written(
    start_worker: Any, vhost: str, redis_url: str, prefix: str
) -> None:
    await start_worker(redis_url=redis_url, **SLOW)
    async with EmbedClient(vhost, timeout=30) as client:
        await client.defer([(f"{prefix}k", "the good text")], task_type="RETRIEVAL_DOCUMENT")
        await client.defer([(f"{prefix}k", f"bad {BAD_INPUT_MARKER}")], task_type="RETRIEVAL_DOCUMENT")
        assert await client.flush() == 1
    check_vector(await stored(redis_url, f"{prefix}k"), "the good text")
    parked = await get_one(vhost, "embed.deferred.dlq")
    assert parked.headers["x-embed-error"].startswith("invalid_request: rejected by the embedding API")


async def test_callers_cannot_write_into_the_workers_keys_and_the_poller_survives_a_bad_record(
    start_worker: Any, vhost: str, redis_url: str, prefix: str, emulator_state: EmulatorState
) -> None:
    settings = batch_settings(redis_url, prefix)
    jobs_key = f"{prefix}internal:batch-jobs"
    seed = aioredis.Redis.from_url(redis_url)
    await seed.hset(jobs_key, "batches/garbage", b"not a job record")  # however it got there, it must not block
    await start_worker(**settings)
    async with EmbedClient(vhost, timeout=30) as client:
        await client.defer(
            [(jobs_key, "overwrite your jobs"), (f"{prefix}fine", "fine")], task_type="RETRIEVAL_DOCUMENT"
        )
        await client.flush()
        await wait_for_vectors(redis_url, [f"{prefix}fine"])
    check_vector(await stored(redis_url, f"{prefix}fine"), "fine")
    assert await seed.hgetall(jobs_key) == {b"batches/garbage": b"not a job record"}  # our job came and went
    parked = await get_one(vhost, "embed.deferred.dlq")
    assert "reserved namespace" in parked.headers["x-embed-error"]
    await seed.aclose()


# ---------------------------------------------------------------------- order and task types (issue 17)
def vector_is(fields: dict[bytes, bytes], text: str, *, dims: int | None, task_type: str) -> bool:
    got = np.frombuffer(fields[b"embedding"], dtype="<f4")
    want = expected_vector(text, model="gemini-embedding-001", task_type=task_type, dims=dims, full_dims=3072)
    return bool(got.shape == want.shape and np.allclose(got, want, atol=1e-6))


async def test_the_last_message_for_a_key_wins_across_settings(
    start_worker: Any, vhost: str, redis_url: str, prefix: str
) -> None:
    """Before: the key ended with B@256, writes being grouped by the first sight of each (settings, key) pair."""
    await start_worker(redis_url=redis_url, **SLOW)
    async with EmbedClient(vhost, timeout=30) as client:
        for text, dims in [("A", 128), ("B", 256), ("C", 128)]:
            await client.defer([(f"{prefix}k", text)], task_type="RETRIEVAL_DOCUMENT", output_dimensionality=dims)
        assert await client.flush() == 1
    fields = await stored(redis_url, f"{prefix}k")
    assert vector_is(fields, "C", dims=128, task_type="RETRIEVAL_DOCUMENT")
    assert fields[b"embedding_dimensions"] == b"128"


async def test_the_same_text_under_another_task_type_is_embedded_again(
    start_worker: Any, vhost: str, redis_url: str, prefix: str, emulator_state: EmulatorState
) -> None:
    """Before: DEFERRED_SKIP_UNCHANGED compared text, model and dimensions only, and skipped it."""
    await start_worker(redis_url=redis_url, **SLOW)
    async with EmbedClient(vhost, timeout=30) as client:
        await client.defer([(f"{prefix}t", "same words")], task_type="RETRIEVAL_DOCUMENT")
        assert await client.flush() == 1
        await client.defer([(f"{prefix}t", "same words")], task_type="CLASSIFICATION")
        assert await client.flush() == 1
        await client.defer([(f"{prefix}t", "same words")], task_type="CLASSIFICATION")
        assert await client.flush() == 0  # unchanged now
    assert emulator_state.texts == 2
    assert vector_is(await stored(redis_url, f"{prefix}t"), "same words", dims=None, task_type="CLASSIFICATION")
