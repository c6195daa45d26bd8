"""Metrics scraped over HTTP after real traffic, and the health endpoints."""

from __future__ import annotations

import asyncio
import socket
import urllib.error
import urllib.request
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.helpers import RawCaller, assert_right_vectors
from worker.emulator import EmulatorState, Fault

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


async def test_metrics_and_health_after_real_traffic(
    start_worker: Any, vhost: str, emulator_state: EmulatorState
) -> None:
    port = free_port()
    worker = await start_worker(
        metrics_port=port, metrics_host="127.0.0.1", batch_max_size=10, batch_max_wait_ms=60_000, retry_max_attempts=3
    )
    base = f"http://127.0.0.1:{port}"
    assert await asyncio.to_thread(get, base + "/healthz") == (200, '{"status":"alive"}')
    assert (await asyncio.to_thread(get, base + "/readyz"))[0] == 200

    emulator_state.faults = [Fault(503, times=1)]
    async with RawCaller(vhost) as caller:
        cids = [await caller.send({"text": f"metric {i}"}) for i in range(20)]
        for i, cid in enumerate(cids):
            assert_right_vectors(await caller.reply(cid), [f"metric {i}"])
        bad = await caller.call({"texts": []})
        assert bad["error"]["code"] == "invalid_request"
        await caller.send({"text": "no reply_to"}, reply_to=None)
        await caller.sync()

    async def scrape() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        status, body = await asyncio.to_thread(get, base + "/metrics")
        assert status == 200
        return samples(body)

    # the dead-lettered message is settled asynchronously: wait for its counter, and for its delivery to leave
    # the in-flight gauge (the counter moves while the message is settled, the gauge once its handler returns)
    for _ in range(100):
        m = await scrape()
        if (
            m.get(("embed_dead_lettered_total", (("reason", "no_reply_to"),))) == 1
            and m.get(("embed_inflight_messages", ())) == 0
        ):
            break
        await asyncio.sleep(0.05)
    default = ("lane", "default")
    assert m[("embed_requests_received_total", (default,))] == 22
    assert m.get(("embed_requests_received_total", (("lane", "bulk"),)), 0) == 0
    assert m[("embed_texts_received_total", ())] == 20
    assert m[("embed_replies_total", (("code", "ok"), default, ("outcome", "ok")))] == 20
    assert m[("embed_replies_total", (("code", "invalid_request"), default, ("outcome", "error")))] == 1
    assert m[("embed_request_seconds_count", (default,))] == 22
    assert m[("embed_queue_wait_seconds_count", (default,))] == 20  # per text that went upstream
    assert m[("embed_spend_usd_total", (default, ("model", "gemini-embedding-001")))] > 0
    assert m[("embed_dead_lettered_total", (("reason", "no_reply_to"),))] == 1
    assert m[("embed_batch_size_count", ())] == 2 and m[("embed_batch_size_sum", ())] == 20
    assert m[("embed_upstream_errors_total", (("status", "503"),))] == 1
    assert m[("embed_upstream_retries_total", ())] == 1
    assert m[("embed_upstream_latency_seconds_count", ())] == 3  # the failed call and two batches
    assert m[("embed_ready", ())] == 1 and m[("embed_consuming_paused", ())] == 0
    assert m[("embed_inflight_messages", ())] == 0

    await worker.shutdown()
    with pytest.raises(OSError):
        await asyncio.to_thread(urllib.request.urlopen, base + "/healthz", None, 2)
