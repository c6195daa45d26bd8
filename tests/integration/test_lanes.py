"""Two RPC lanes on a real broker (issue 18): a query overtakes a bulk backlog, bulk keeps being served under a
stream of queries, the lane order holds in the API budget in both scopes, the spend cap holds, and the bulk lane's
topology and dead letters are its own."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aio_pika
import orjson
import pytest

from tests.integration.helpers import RawCaller, assert_right_vectors, get_one, queue_depth
from worker import topology
from worker.amqp.connection import declare_once
from worker.emulator import EmulatorState

pytestmark = pytest.mark.integration


def budget_scope(scope: str, redis_url: str, prefix: str) -> dict[str, Any]:
    """The API budget in ``scope`` ("process" or "fleet", through this test's keys on the shared Redis); the
    deferred lane off, so that REDIS_URL only serves the budget."""
    return {
        "upstream_limit_scope": scope,
        "redis_url": redis_url,
        "redis_key_prefix": prefix,
        "deferred_enabled": False,
    }


def request(text: str) -> dict[str, Any]:
    return {"texts": [text], "task_type": "RETRIEVAL_QUERY", "output_dimensionality": 128}


class Lanes:
    """A caller of both lanes, counting bulk replies: how many had come when each query's reply came."""

    def __init__(self, caller: RawCaller) -> None:
        self.caller = caller
        self.bulk: dict[str, str] = {}  # cid -> text
        self.seen_at_query: dict[str, int] = {}  # query cid -> bulk replies received before it

    def bulk_done(self) -> int:
        return sum(1 for cid in self.bulk if self.caller.replies[cid].done())

    async def backlog(self, count: int, routing_key: str) -> None:
        for i in range(count):
            text = f"ingested document {i}"
            self.bulk[await self.caller.send(request(text), routing_key=routing_key)] = text

    async def query(self, text: str) -> str:
        cid = await self.caller.send(request(text), routing_key=topology.ROUTING_KEY)
        self.caller.replies[cid].add_done_callback(lambda _: self.seen_at_query.setdefault(cid, self.bulk_done()))
        return cid

    async def check_bulk(self, timeout: float = 60) -> None:
        """Every bulk request answered, each with its own text's vector."""
        for cid, text in self.bulk.items():
            assert_right_vectors(await self.caller.reply(cid, timeout), [text], task_type="RETRIEVAL_QUERY", dims=128)


async def started_draining(lanes: Lanes) -> None:
    """Return once the first bulk reply is in: the worker is draining the backlog."""
    pending = [lanes.caller.replies[cid] for cid in lanes.bulk]
    await asyncio.wait_for(asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED), 30)


@pytest.mark.parametrize("backlog_lane", [topology.BULK_KEY, topology.ROUTING_KEY])
async def test_a_query_overtakes_a_bulk_backlog(
    start_worker: Any, vhost: str, emulator_state: EmulatorState, backlog_lane: str
) -> None:
    """1,200 requests wait, then a query comes. Behind a bulk backlog it is answered while most of the backlog still
    waits; the same backlog on the default lane (the reference: the worker before lanes) answers it last."""
    emulator_state.latency_ms = 150
    await declare_once(vhost)
    async with RawCaller(vhost) as caller:
        lanes = Lanes(caller)
        await lanes.backlog(1200, backlog_lane)
        await start_worker(batch_max_size=50, max_concurrent_batches=2, bulk_max_wait_ms=50)
        await started_draining(lanes)
        cid = await lanes.query("what is a query")
        assert_right_vectors(await caller.reply(cid, 60), ["what is a query"], task_type="RETRIEVAL_QUERY", dims=128)
        await lanes.check_bulk()
    seen = lanes.seen_at_query[cid]
    if backlog_lane == topology.BULK_KEY:
        assert seen < 600, f"the query waited for {seen} of 1,200 bulk requests"
    else:
        assert seen > 1000, f"reference: the query behind the default lane's backlog came after {seen}"


async def test_bulk_is_served_under_a_steady_stream_of_queries(
    start_worker: Any, vhost: str, emulator_state: EmulatorState
) -> None:
    """Queries keep every slot of the default lane busy, one batch due behind another; bulk requests sent into
    that stream are all answered while it goes on (BULK_MIN_SHARE keeps them a slot)."""
    emulator_state.latency_ms = 60
    await start_worker(batch_max_wait_ms=0, max_concurrent_batches=2, bulk_max_wait_ms=0)
    stop, flowing = asyncio.Event(), asyncio.Event()
    answered = 0
    async with RawCaller(vhost) as caller:
        lanes = Lanes(caller)

        async def query_loop(n: int) -> None:
            nonlocal answered
            i = 0
            while not stop.is_set():
                text = f"query {n}.{i}"
                reply = await caller.reply(await lanes.query(text), 30)
                assert_right_vectors(reply, [text], task_type="RETRIEVAL_QUERY", dims=128)
                answered += 1
                i += 1
                if answered >= 50:
                    flowing.set()

        loops = [asyncio.create_task(query_loop(n)) for n in range(12)]
        await asyncio.wait_for(flowing.wait(), 30)
        before = answered
        await lanes.backlog(40, topology.BULK_KEY)
        await lanes.check_bulk(timeout=30)
        during = answered - before
        stop.set()
        await asyncio.gather(*loops)
    assert during > 0, "the query stream stopped while bulk was served"


@pytest.mark.parametrize("scope", ["process", "fleet"])
async def test_the_api_budget_admits_a_query_before_the_bulk_backlog(
    start_worker: Any, vhost: str, redis_url: str, prefix: str, scope: str
) -> None:
    """UPSTREAM_RPM 2 per second, a bulk backlog of 8 calls' worth: a query sent once the backlog drains takes the
    next call the budget allows, ahead of the bulk calls that waited for it."""
    await declare_once(vhost)
    async with RawCaller(vhost) as caller:
        lanes = Lanes(caller)
        await lanes.backlog(400, topology.BULK_KEY)
        await start_worker(
            batch_max_size=50,
            bulk_max_wait_ms=0,
            upstream_rpm=2,
            upstream_window_s=1,
            **budget_scope(scope, redis_url, prefix),
        )
        await started_draining(lanes)
        cid = await lanes.query("urgent question")
        assert_right_vectors(await caller.reply(cid, 30), ["urgent question"], task_type="RETRIEVAL_QUERY", dims=128)
        await lanes.check_bulk()
    # Admitted before the query: the calls of the window it arrived in, and one it may have found waiting.
    assert lanes.seen_at_query[cid] <= 150, lanes.seen_at_query[cid]


@pytest.mark.parametrize("scope", ["process", "fleet"])
async def test_the_spend_cap_holds_and_a_request_that_cannot_wait_is_told_at_once(
    start_worker: Any, vhost: str, redis_url: str, prefix: str, emulator_state: EmulatorState, *, scope: str
) -> None:
    """UPSTREAM_USD_LIMIT: one call's worth per 60 s. The second request cannot be afforded before its deadline:
    answered rate_limited, retryable, at once and without a call; not parked (its deadline would pass)."""
    texts = [f"priced text number {i} " * 10 for i in range(3)]  # about 60 tokens each: $0.000009 a call
    worker = await start_worker(
        upstream_usd_limit=0.00001,
        upstream_usd_window_s=60,
        **budget_scope(scope, redis_url, prefix),
    )
    async with RawCaller(vhost) as caller:
        first = await caller.call({"texts": texts})
        assert_right_vectors(first, texts)
        deadline = {topology.DEADLINE_HEADER: int((time.time() + 5) * 1000)}
        refused = await caller.call({"texts": texts[::-1]}, headers=deadline)
    assert refused["error"]["code"] == "rate_limited" and refused["error"]["retryable"] is True, refused
    assert "UPSTREAM_USD_LIMIT" in refused["error"]["message"]
    assert len(emulator_state.batch_sizes) == 1  # the refused request cost no call
    await worker.shutdown()  # every delivery settled
    assert await queue_depth(vhost, topology.DLQ) == 0


async def test_the_bulk_lane_has_the_default_lanes_arguments_and_a_dlq_of_its_own(
    start_worker: Any, vhost: str
) -> None:
    worker = await start_worker()
    connection = await aio_pika.connect(vhost)
    try:
        channel = await connection.channel()
        expected = topology.queue_arguments("quorum", worker.settings.delivery_limit, topology.BULK_KEY)
        expected["x-quorum-initial-group-size"] = worker.settings.quorum_initial_group_size
        # A declare with other arguments than the queue's closes the channel (406): this one must pass.
        await channel.declare_queue(topology.BULK_QUEUE, durable=True, arguments=expected)
        async with RawCaller(vhost) as caller:
            await caller.send({"texts": ["no reply_to"]}, reply_to=None, routing_key=topology.BULK_KEY)
        parked = await get_one(vhost, topology.BULK_DLQ)
        assert orjson.loads(parked.body) == {"texts": ["no reply_to"]}
        assert parked.headers[topology.ERROR_HEADER] == "no reply_to: nowhere to send the reply"
    finally:
        await connection.close()
