"""The adaptive concurrency limit against the emulator playing an upstream that saturates: past ``capacity`` calls at
once, latency grows in proportion (more calls buy only queueing). From its start at 4 the limit must grow past the
knee, then stop well short of its ceiling of 32; every reply still holds the right vector. (Queries may run a
headroom above the limit, ``admission.headroom``: the emulator can see more calls at once than the limit.)"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.integration.helpers import RawCaller, assert_right_vectors
from tests.integration.test_observability import free_port, get, samples
from worker.amqp.connection import declare_once
from worker.emulator import EmulatorState

pytestmark = pytest.mark.integration

CAPACITY = 8
CEILING = 32


async def test_the_limit_finds_the_knee_of_a_saturating_upstream(
    start_worker: Any, vhost: str, emulator_state: EmulatorState
) -> None:
    emulator_state.configure({"latency_ms": 60, "capacity": CAPACITY})
    await declare_once(vhost)
    texts = [f"knee {i}" for i in range(1500)]
    async with RawCaller(vhost) as caller:
        # The queue is full before the worker starts, so the worker is never short of work (an idle worker
        # teaches its limit nothing): what holds calls back is the limit alone.
        cids = [await caller.send({"text": text, "output_dimensionality": 128}) for text in texts]
        port = free_port()
        await start_worker(
            metrics_port=port,
            metrics_host="127.0.0.1",
            batch_max_size=5,
            max_concurrent_batches=CEILING,
        )
        replies = await asyncio.gather(*(caller.reply(cid, timeout=60) for cid in cids))
    for text, reply in zip(texts, replies, strict=True):
        assert_right_vectors(reply, [text], dims=128)
    _, text = await asyncio.to_thread(get, f"http://127.0.0.1:{port}/metrics")
    limit = samples(text)[("embed_upstream_concurrency_limit", ())]
    most = emulator_state.max_in_flight
    # A fixed limit of 4 (the old default) fails the first (4 and the queries' headroom of 2 make 6); a limit that
    # grows on success alone fails the second.
    assert most > CAPACITY, f"the limit never grew past the knee: at most {most} calls at once"
    assert limit <= CEILING * 3 // 4, f"the limit ran towards its ceiling: {limit} ({most} calls at once)"
