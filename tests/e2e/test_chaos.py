"""Chaos: hundreds of requests through a SIGKILL, a broker connection drop and random upstream 503s, with hostile
callers among them: a correlation_id that is not UTF-8, a caller whose reply queue is full and refuses publishes,
a request whose reply_to is a forged Direct Reply-to name, and a deferred item whose Redis key holds a string; the
deferred lane's Redis (the test's own) runs out of memory for a while. Every request must end answered (with the
right vectors, or a retryable error) or parked in the DLQ, the forged one dropped without looping, and every
deferred item written, none parked but the one whose key holds a string."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import aio_pika
import aiormq
import numpy as np
import pytest
import redis.asyncio as aioredis

from tests.conftest import Broker, OwnRedis
from tests.e2e.processes import WorkerProcess, worker_env
from tests.integration.helpers import RawCaller, assert_right_vectors, get_one, queue_depth, wait_until
from tests.integration.test_hostile_input import publish_once
from tests.integration.test_reply_refusals import forge, own_direct_reply_to_name
from worker.client import EmbedClient, EmbedClientError
from worker.emulator import EmulatorState, EmulatorThread
from worker.vectors import expected_vector

pytestmark = pytest.mark.integration

N = 300


async def _drain_dlq(url: str) -> set[str]:
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        queue = await channel.get_queue("embed.requests.dlq")
        parked: set[str] = set()
        while (message := await queue.get(fail=False, no_ack=True)) is not None:
            parked.add(message.correlation_id or "")
        return parked
    finally:
        await connection.close()


async def test_nothing_is_lost_through_kills_drops_and_upstream_errors(
    *,
    broker: Broker,
    vhost: str,
    own_redis: Any,
    emulator: EmulatorThread,
    emulator_state: EmulatorState,
    processes: list[WorkerProcess],
) -> None:
    store: OwnRedis = own_redis("--maxmemory-policy", "noeviction")
    redis_url = store.url
    emulator_state.latency_ms = 200  # ~2 s of work per worker pair: the faults land mid-stream
    emulator_state.fail_rate = 0.3
    env = worker_env(
        vhost,
        emulator.base_url,
        batch_max_size=8,
        max_concurrent_batches=2,
        prefetch_count=24,
        retry_max_attempts=3,
        breaker_failures=0,
        redis_url=redis_url,
        deferred_flush_interval_s=0.5,
        deferred_wake_messages=0,
    )
    processes += [WorkerProcess(env), WorkerProcess(env)]
    for proc in processes:
        await asyncio.to_thread(proc.wait_for_line, "ready:")
    texts = [f"chaos {i}" for i in range(N)]

    prefix = f"chaos:{uuid.uuid4().hex[:8]}:"
    redis = aioredis.Redis.from_url(redis_url)
    await redis.set(f"{prefix}string", "a caller's string")
    store.command("CONFIG", "SET", "maxmemory", "1")  # out of memory: every write refused, until we say
    deferred = [(f"{prefix}{i}", f"deferred chaos {i}") for i in range(20)]
    learner = await aiormq.connect(vhost)
    forged = forge(await own_direct_reply_to_name(learner))
    async with RawCaller(vhost) as caller:
        full = await caller.channel.declare_queue(
            "", exclusive=True, arguments={"x-max-length": 1, "x-overflow": "reject-publish"}
        )
        full_cids = [await caller.send({"text": f"full {i}"}, reply_to=full.name) for i in range(3)]
        await caller.send({"text": "forged"}, reply_to=forged)
        cids = [await caller.send({"text": t}) for t in texts[: N // 2]]
        hostile = "\udcff\udcfe"  # how the worker and our reader see correlation_id bytes ff fe (amqp/codec.py)
        caller.replies[hostile] = asyncio.get_running_loop().create_future()
        await asyncio.to_thread(
            publish_once, vhost, b'{"text": "hostile"}', reply_to=caller.queue.name, correlation_id=b"\xff\xfe"
        )
        await caller.send(
            {
                "items": [
                    {"key": f"{prefix}string", "text": "wrong type"},
                    *[{"key": k, "text": t} for k, t in deferred],
                ]
            },
            reply_to=None,
            routing_key="embed.deferred",
        )
        cids += [await caller.send({"text": t}) for t in texts[N // 2 :]]
        await caller.reply(cids[0], timeout=30)
        processes[0].kill()  # SIGKILL mid-stream
        processes.append(WorkerProcess(env))  # its replacement
        await caller.reply(cids[N // 3], timeout=60)
        for connection in broker.connections(vhost):  # this test's vhost only: the broker may be shared
            if connection.name.startswith("embed-worker"):
                broker.ctl(["close_connection", connection.pid, "chaos: connection drop"])
        await asyncio.wait([asyncio.ensure_future(caller.reply(c, timeout=90)) for c in cids], timeout=100)
        replies: dict[str, dict[str, Any]] = {}
        for cid, text in zip(cids, texts, strict=True):
            future = caller.replies[cid]
            if future.done():
                replies[cid] = await caller.reply(cid)
                reply = replies[cid]
                if "error" in reply:
                    assert reply["error"]["retryable"] is True, reply
                else:
                    assert_right_vectors(reply, [text])
        async with EmbedClient(vhost, timeout=30) as client:  # the lane met the full Redis, and says so
            with pytest.raises(EmbedClientError) as full_redis:
                await client.flush()
            assert full_redis.value.code == "store_unavailable"
        store.command("CONFIG", "SET", "maxmemory", "0")  # room again: the lane drains on its own
        refused = await caller.reply(hostile, timeout=60)  # answered, through the kill and the drop
        assert refused["error"]["message"] == "property correlation_id is not valid UTF-8"
        # Nothing loops: the request queue empties (the forged request is dropped, the full queue's are parked).
        await wait_until(lambda: queue_depth(vhost, "embed.requests"), 0, timeout=60)
        in_full = set()
        while (message := await full.get(fail=False, no_ack=True)) is not None:
            in_full.add(message.correlation_id or "")
    await learner.close()
    for _ in range(200):  # the deferred lane drains on its 0.5 s interval, through the kill and the drop
        if await redis.exists(*(k for k, _ in deferred)) == len(deferred):
            break
        await asyncio.sleep(0.1)
    for key, text in deferred:
        got = np.frombuffer((await redis.hgetall(key))[b"embedding"], dtype="<f4")
        want = expected_vector(text, model="gemini-embedding-001", task_type=None, dims=None, full_dims=3072)
        assert np.allclose(got, want, atol=1e-6), key
    assert await redis.get(f"{prefix}string") == b"a caller's string"
    deferred_parked = await get_one(vhost, "embed.deferred.dlq")
    assert b"wrong type" in deferred_parked.body and "WRONGTYPE" in deferred_parked.headers["x-embed-error"]
    await redis.aclose()
    parked = await _drain_dlq(vhost)
    assert set(full_cids) <= in_full | parked, "a request whose reply the broker refused was lost"
    assert len(in_full) == 1
    unanswered = set(cids) - set(replies)
    assert unanswered <= parked, f"lost {len(unanswered - parked)} requests"
    errored = {c for c, r in replies.items() if "error" in r}
    assert errored <= parked  # a retryable error reply is always parked for replay too
    print(
        f"chaos: {len(replies) - len(errored)} answered, {len(errored)} errors (parked), "
        f"{len(unanswered)} parked unanswered, {emulator_state.rejected} upstream faults"
    )
