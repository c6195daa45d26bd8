"""What a worker holds is bounded in bytes (MAX_HELD_BYTES), on both lanes, against a real broker.

Reproduced first: with a window of 900 messages and nothing bounding bytes, a backlog of large requests was all
taken at once (60 image requests: 611 MB of RSS; 200: 2 GB, killed in a 512 MiB pod).
"""

from __future__ import annotations

import asyncio
import urllib.request
import uuid
from typing import Any

import aio_pika
import orjson
import pytest
import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import free_port
from tests.integration.helpers import RawCaller, assert_right_vectors
from worker import topology
from worker.amqp.connection import AmqpConfig, declare_topology
from worker.client import EmbedClient
from worker.emulator import EmulatorState

pytestmark = pytest.mark.integration

KiB = 1024
MiB = 1024 * KiB


def _scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels}


async def _gauges(port: int) -> dict[str, float]:
    return await asyncio.to_thread(_scrape, port)  # the worker serves metrics on this loop


def _texts(tag: str, count: int, size: int) -> list[str]:
    """``count`` distinct texts of about ``size`` characters (within the model's 2,048 tokens)."""
    return [f"{tag} {i} " + "x" * (size - 20) for i in range(count)]


async def _backlog(url: str, bodies: list[bytes], reply_to: str, queue_type: str = "quorum") -> None:
    """Requests waiting in the queue before any worker starts."""
    connection = await aio_pika.connect_robust(url)
    try:
        await declare_topology(connection, AmqpConfig(url, queue_type, 5, quorum_group_size=1))
        channel = await connection.channel()
        exchange = await channel.get_exchange(topology.EXCHANGE)
        for i, body in enumerate(bodies):
            await exchange.publish(
                aio_pika.Message(body, correlation_id=f"b{i}", reply_to=reply_to), routing_key=topology.ROUTING_KEY
            )
    finally:
        await connection.close()


async def test_a_backlog_of_large_requests_is_taken_within_the_byte_budget(
    start_worker: Any, vhost: str, emulator_state: EmulatorState
) -> None:
    emulator_state.latency_ms = 100
    requests = [_texts(f"r{r}", 100, 8000) for r in range(24)]  # ~800 KB each, 19 MB in all
    bodies = [orjson.dumps({"texts": t, "output_dimensionality": 128}) for t in requests]
    limit, largest = 3 * MiB, max(len(b) for b in bodies)
    port = free_port()
    async with RawCaller(vhost) as caller:
        for i in range(len(bodies)):
            caller.replies[f"b{i}"] = asyncio.get_running_loop().create_future()
        await _backlog(vhost, bodies, caller.queue.name)
        await start_worker(max_held_bytes=limit, metrics_port=port, metrics_host="127.0.0.1")
        for i, texts in enumerate(requests):
            assert_right_vectors(await caller.reply(f"b{i}", timeout=120), texts, dims=128)
    gauges = await _gauges(port)
    assert gauges["embed_held_bytes"] == 0
    assert 0 < gauges["embed_held_bytes_max"] <= limit + largest, gauges["embed_held_bytes_max"]


async def test_a_request_larger_than_the_whole_budget_is_served_alone(start_worker: Any, vhost: str) -> None:
    await start_worker(max_held_bytes=64 * KiB)
    big = _texts("big", 40, 8000)  # 320 KB: five times the budget
    small = [["small one"], ["small two"]]
    async with RawCaller(vhost) as caller:
        cids = [await caller.send({"texts": t, "output_dimensionality": 128}) for t in [big, *small]]
        for cid, texts in zip(cids, [big, *small], strict=True):
            assert_right_vectors(await caller.reply(cid, timeout=60), texts, dims=128)


async def test_the_deferred_lane_takes_a_round_within_the_byte_budget(
    start_worker: Any, vhost: str, redis_url: str
) -> None:
    port = free_port()
    prefix = f"test:{uuid.uuid4().hex[:8]}:"
    limit = 256 * KiB
    await start_worker(
        redis_url=redis_url,
        max_held_bytes=limit,
        metrics_port=port,
        metrics_host="127.0.0.1",
        deferred_flush_interval_s=3600,
        deferred_wake_messages=0,
    )
    messages = [[(f"{prefix}m{m}:{i}", t) for i, t in enumerate(_texts(f"m{m}", 20, 5000))] for m in range(12)]
    async with EmbedClient(vhost, timeout=60) as client:
        for items in messages:
            await client.defer(items, output_dimensionality=128)
        assert await client.flush() == 240
    store = aioredis.Redis.from_url(redis_url)
    try:
        for items in messages:
            for key, _ in items:
                assert await store.hexists(key, "embedding")
    finally:
        await store.aclose()
    largest = max(len(orjson.dumps({"items": [{"key": k, "text": t} for k, t in items]})) for items in messages)
    most = (await _gauges(port))["embed_held_bytes_max"]
    assert 0 < most <= limit + largest, most
