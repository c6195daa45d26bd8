"""Chaos: hundreds of requests through a SIGKILL, a broker connection drop and random upstream 503s.
Every request must end answered (with the right vectors, or a retryable error) or parked in the DLQ."""

from __future__ import annotations

import asyncio
from typing import Any

import aio_pika
import pytest

from tests.conftest import Broker
from tests.e2e.processes import WorkerProcess, worker_env
from tests.integration.helpers import RawCaller, assert_right_vectors
from worker.emulator import EmulatorState, EmulatorThread

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
    broker: Broker, vhost: str, emulator: EmulatorThread, emulator_state: EmulatorState, processes: list[WorkerProcess]
) -> None:
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
    )
    processes += [WorkerProcess(env), WorkerProcess(env)]
    for proc in processes:
        await asyncio.to_thread(proc.wait_for_line, "ready:")
    vhost_name = vhost.rsplit("/", 1)[1]
    texts = [f"chaos {i}" for i in range(N)]

    async with RawCaller(vhost) as caller:
        cids = [await caller.send({"text": t}) for t in texts]
        await caller.reply(cids[0], timeout=30)
        processes[0].kill()  # SIGKILL mid-stream
        processes.append(WorkerProcess(env))  # its replacement
        await caller.reply(cids[N // 3], timeout=60)
        listing = broker.ctl(["list_connections", "-q", "--no-table-headers", "pid", "vhost", "client_properties"])
        for line in listing.splitlines():
            if f"\t{vhost_name}\t" in line and "embed-worker" in line:
                broker.ctl(["close_connection", line.split("\t")[0], "chaos: connection drop"])
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
    parked = await _drain_dlq(vhost)
    unanswered = set(cids) - set(replies)
    assert unanswered <= parked, f"lost {len(unanswered - parked)} requests"
    errored = {c for c, r in replies.items() if "error" in r}
    assert errored <= parked  # a retryable error reply is always parked for replay too
    print(
        f"chaos: {len(replies) - len(errored)} answered, {len(errored)} errors (parked), "
        f"{len(unanswered)} parked unanswered, {emulator_state.rejected} upstream faults"
    )
