"""Every benchmark scenario at smoke size: the harness starts what it needs, checks a sample of
replies for the right vector, and writes its JSON, plot and table. Correctness only: no figure here
is compared with a threshold (``lanes`` checks one ordering: queries behind the bulk lane wait less than behind
a single-lane backlog, which is what the lane is for)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import aio_pika
import orjson
import pytest

from tests.conftest import Broker
from worker.bench import lanes, stats
from worker.bench.batch_echo import _reply
from worker.bench.harness import BenchConfig
from worker.bench.report import run, table
from worker.bench.scenarios import SCENARIOS
from worker.messages import JSON_CONTENT_TYPE, decode_reply
from worker.topology import BULK_QUEUE

pytestmark = pytest.mark.integration


def smoke_config(broker: Broker, requests: int) -> BenchConfig:
    return BenchConfig(
        amqp_url=broker.url,
        requests=requests,
        batch_size=10,
        max_wait_ms=20,
        concurrency=2,
        rates=[20, 100],
        rate_seconds=0.5,
        progress=False,
        repeat=1,  # the paired-rounds arithmetic is tested on its own below
    )


@pytest.mark.timeout(300)
async def test_every_scenario_runs_and_reports(broker: Broker, tmp_path: Path) -> None:
    names = [name for name in SCENARIOS if name != "lanes"]  # lanes: its own test, below
    config = smoke_config(broker, 120)
    results = await run(names, config, tmp_path, plot=True)
    assert set(results) == set(names)
    for name, result in results.items():
        assert (tmp_path / f"{name}.png").stat().st_size > 1000
        assert orjson.loads((tmp_path / f"{name}.json").read_bytes())["scenario"] == name
        assert name in table(name, result)
        if name == "latency":
            assert [r["rate_per_s"] for r in result["rows"]] == [20, 100]
            assert all(r["p50_ms"] > 0 and r["mean_batch"] >= 1 for r in result["rows"])
            assert result["echo_lone"]["p50_ms"] > 0
            continue
        for r in result["runs"]:
            assert r["seconds"] > 0 and r["texts_per_s"] > 0
            assert r["replies_checked"] >= 1  # sampled replies were checked vector by vector
            if r["target"] == "worker":
                assert r["upstream_texts"] <= r["requests"]  # fewer with dedup or the cache, never more
                assert r["upstream_calls"] >= r["upstream_texts"] / config.batch_size
            if r["target"] == "naive":
                assert r["upstream_calls"] == r["requests"]  # one call per message, by construction
        assert result["ratios"]
        for ratio in result["ratios"].values():
            assert 0 < ratio["min"] <= ratio["median"] <= ratio["max"]
        assert all(len(runs) == 1 for runs in result["all_runs"].values())
        assert set(result["cpu_us_per_request"]) == set(result["all_runs"])
        if "echo" in {r["target"] for r in result["runs"]}:  # every scenario with a reference has both
            assert "batch-echo" in {r["target"] for r in result["runs"]}
            assert any("batch-echo" in key for key in result["ratios"])
    assert {r["processes"] for r in results["scale"]["runs"]} == {1, 2, 4}
    frugal = results["frugality"]
    assert frugal["saved_share"]["cache on"]["median"] > 0  # repeated texts answered from the cache
    windows = frugal["windows"]
    fleet = windows["runs"]["fleet"]
    assert fleet["upstream_calls"] == windows["requests"]  # one text per call: every request made its call
    assert fleet["max_calls_in_a_window"] <= windows["limit"]  # two processes, one budget
    flood = results["image-flood"]
    for r in flood["runs"]:  # every reply of the image requests checked against its own six images and caption
        assert r["replies_checked"] > 0 and r["peak_rss_mb"] > 0 and r["rss_after_drain_mb"] > 0
    images = results["images"]
    assert 0 < images["max_call_bytes"] <= images["budget_bytes"]  # every call within the request budget
    assert images["image_bytes"]["min"] >= 200_000
    assert {r["dimensions"] for r in results["drain"]["runs"]} == {128}  # the smallest size a real caller asks
    assert {r["target"] for r in results["drain"]["runs"]} == {"echo", "batch-echo", "worker"}


def test_batch_echo_replies_hold_one_vector_per_text() -> None:
    body = _reply("gemini-embedding-001", 128, 3)
    vectors = decode_reply(body, JSON_CONTENT_TYPE, None, count=3)
    assert len(vectors) == 3 and all(v.shape == (128,) for v in vectors)


def test_rounds_give_median_ratios_and_the_median_run() -> None:
    results = {
        "a": [
            {"texts_per_s": 100.0, "cpu_us_per_request": 50.0, "label": "a1"},
            {"texts_per_s": 300.0, "cpu_us_per_request": 70.0, "label": "a2"},
            {"texts_per_s": 200.0, "cpu_us_per_request": 90.0, "label": "a3"},
        ],
        "b": [
            {"texts_per_s": 100.0, "cpu_us_per_request": 40.0, "label": "b1"},
            {"texts_per_s": 100.0, "cpu_us_per_request": 30.0, "label": "b2"},
            {"texts_per_s": 400.0, "cpu_us_per_request": 20.0, "label": "b3"},
        ],
    }
    ratio = stats.ratio(results, "a", "b")
    assert ratio == {"median": 1.0, "min": 0.5, "max": 3.0}  # pairwise 1.0, 3.0, 0.5: not mean(a)/mean(b)
    summary = stats.summary(results, {"a / b": ratio})
    assert [r["label"] for r in summary["runs"]] == ["a3", "b2"]
    assert summary["cpu_us_per_request"]["a"] == {"median": 70.0, "min": 50.0, "max": 90.0}  # over rounds
    both = stats.against(results, "a", "a", {"b": "b"})
    assert both["a / b"] == ratio
    assert both["CPU per request, a / b"] == {"median": 2.333, "min": 1.25, "max": 4.5}  # 1.25, 2.333, 4.5


async def _worker_declares(start_worker: Callable[..., Any], vhost: str, queue: str) -> bool:
    """Whether a worker, once it has started, has declared ``queue`` (a passive declare on its vhost)."""
    worker = await start_worker()
    try:
        async with await aio_pika.connect(vhost) as connection:
            channel = await connection.channel()
            try:
                await channel.declare_queue(queue, passive=True)
            except aio_pika.exceptions.ChannelNotFoundEntity:
                return False
            return True
    finally:
        await worker.shutdown()


@pytest.mark.timeout(300)
async def test_lanes_scenario_runs_and_reports(
    broker: Broker, tmp_path: Path, start_worker: Callable[..., Any], vhost: str
) -> None:
    if not await _worker_declares(start_worker, vhost, BULK_QUEUE):
        pytest.skip(f"the worker does not declare {BULK_QUEUE} yet: the lanes bench needs the bulk lane served")
    config = smoke_config(broker, 200)
    result = (await run(["lanes"], config, tmp_path, plot=True))["lanes"]
    assert (tmp_path / "lanes.png").stat().st_size > 1000
    assert orjson.loads((tmp_path / "lanes.json").read_bytes())["scenario"] == "lanes"
    assert "lanes" in table("lanes", result)
    runs = {label: runs[0] for label, runs in result["all_runs"].items()}
    assert set(runs) == {lanes.IDLE, lanes.SINGLE, lanes.BULK}
    for label, r in runs.items():
        assert r["queries_checked"] == r["queries"] == lanes.SMOKE_QUERIES  # every query's vector checked
        assert len(r["query_latency_ms"]) == len(r["query_sent_s"]) == r["queries"]
        assert r["replies_checked"] == r["requests"]  # and every backlog reply's
        assert r["peak_rss_mb"] > 0 and r["emulator_latency_ms"] == lanes.UPSTREAM_MS
        if label != lanes.IDLE:
            assert r["requests"] == 200 and r["texts_per_s"] > 0
            assert r["queries_during_drain"] > 0  # the queries met the backlog
    assert runs[lanes.IDLE]["requests"] == 0
    for value in result["ratios"].values():
        assert 0 < value["min"] <= value["median"] <= value["max"]
    # The point of the bulk lane: a query does not wait for the backlog. Behind a single-lane backlog the first
    # queries wait for nearly all of it (about 3 s of upstream calls here), behind the bulk lane for a call or two.
    assert runs[lanes.BULK]["query_p99_ms"] < runs[lanes.SINGLE]["query_p99_ms"]
