"""Every benchmark scenario at smoke size: the harness starts what it needs, checks a sample of
replies for the right vector, and writes its JSON, plot and table. Correctness only: no figure here
is compared with a threshold (``lanes`` checks one ordering: queries behind the bulk lane wait less than behind
a single-lane backlog, which is what the lane is for). The fast tests below (no broker) check the arithmetic, the
/metrics scraper (a gauge present, absent, an endpoint that never answers), the reply check and the plots."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aio_pika
import numpy as np
import orjson
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry, Gauge, Histogram, generate_latest

from tests.conftest import Broker
from worker.amqp.connection import WRITE_QUEUE_FRAMES
from worker.bench import lanes, scrape, stats
from worker.bench.batch_echo import WRITE_QUEUE_FRAMES as ECHO_FRAMES
from worker.bench.batch_echo import _reply
from worker.bench.harness import FULL, BenchConfig
from worker.bench.load import Driver, Sent
from worker.bench.report import _plot, run, table
from worker.bench.scenarios import KNEE, SCENARIOS, SLOW
from worker.messages import JSON_CONTENT_TYPE, decode_reply
from worker.topology import BULK_QUEUE
from worker.vectors import expected_vector

integration = pytest.mark.integration


def smoke_config(broker: Broker, requests: int, **extra: Any) -> BenchConfig:
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
        **extra,
    )


@integration
@pytest.mark.timeout(420)
async def test_every_scenario_runs_and_reports(broker: Broker, tmp_path: Path) -> None:
    names = [name for name in SCENARIOS if name != "lanes"]  # lanes: its own test, below
    # The knee run's emulator through the hook (an option every emulator has: the knee option is not needed here).
    config = smoke_config(broker, 120, knee_emulator_args=["--latency-ms", "30"])
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
        if name == "gateway":  # both paths answered every request with its text's vector (a wrong one raises)
            assert set(result["all_runs"]) == {"EmbedClient directly", "through the gateway"}
            assert all(r["requests"] == result["requests"] and r["requests_per_s"] > 0 for r in result["runs"])
            assert result["ratios"]["throughput, gateway / direct"]["median"] > 0
            assert result["gateway_cpu_us_per_request"]["median"] > 0 and result["gateway_peak_rss_mb"] > 0
            continue
        for r in result["runs"]:
            assert r["seconds"] > 0 and r["texts_per_s"] > 0
            # process start < first reply < last reply, on one clock; the ready line is recorded, never the start
            assert 0 < r["startup_s"] < r["whole_s"] and r["whole_run_per_s"] > 0
            assert r["whole_s"] == pytest.approx(r["startup_s"] + r["seconds"], abs=0.002)
            assert r["cpu_us_per_request"] > 0 and r["peak_rss_mb"] > 0
            assert r["cpu_from"] == "ready line" or r["processes"] > 1  # a sibling may finish before one is ready
            # every check_every-th reply was checked vector by vector (the echoes' for their size)
            assert r["replies_checked"] == math.ceil(r["requests"] / r["check_every"]) >= 1
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
    drain = results["drain"]
    assert {r["dimensions"] for r in drain["runs"]} == {128, 3072}  # the smallest size a caller asks, the default
    assert {r["target"] for r in drain["runs"]} == {"batch-echo", "batch-echo-aiormq", "worker"}
    for ref in ("batch-echo", "batch-echo-aiormq"):  # steady state and whole run against both references
        for run_name in ("worker", "worker (100 ms upstream)"):
            assert f"{run_name} / {ref} at 128d" in drain["ratios"]
            assert f"whole run, {run_name} / {ref} at 128d" in drain["ratios"]
        assert f"worker / {ref} at 3072d" in drain["ratios"]
    assert set(drain["goals"]) <= set(drain["ratios"])
    assert set(drain["startup_s"]) == set(drain["all_runs"])
    assert "start-up, worker 128d" in table("drain", drain)
    slow = drain["all_runs"][SLOW][0]
    assert slow["emulator_latency_ms"] == 100 and slow["metrics"]["scrapes"] + slow["metrics"]["failed_scrapes"] > 0
    if slow["metrics"]["concurrency_limit"] is None:  # no gauge yet: said so, in the result and the table
        assert slow["metrics"]["note"] and drain["adaptive"][SLOW]["notes"]
        assert "adaptive limit, " in table("drain", drain)
    adaptive = results["adaptive"]
    assert set(adaptive["all_runs"]) == {SLOW, KNEE} and adaptive["knee_emulator"]["args"] == ["--latency-ms", "30"]
    knee = adaptive["all_runs"][KNEE][0]
    assert knee["emulator_args"] == ["--latency-ms", "30"] and knee["upstream_calls"] > 0  # its own emulator served
    assert set(adaptive["adaptive"]) == {SLOW, KNEE}


def test_batch_echo_replies_hold_one_vector_per_text() -> None:
    body = _reply("gemini-embedding-001", 128, 3)
    vectors = decode_reply(body, JSON_CONTENT_TYPE, None, count=3)
    assert len(vectors) == 3 and all(v.shape == (128,) for v in vectors)


def test_the_issues_batch_echo_widens_the_write_queue_as_the_worker_does() -> None:
    assert ECHO_FRAMES == WRITE_QUEUE_FRAMES


def _reply_message(vector: np.ndarray) -> SimpleNamespace:
    body = orjson.dumps({"embeddings": vector[None, :], "model": FULL}, option=orjson.OPT_SERIALIZE_NUMPY)
    return SimpleNamespace(body=body, content_type=JSON_CONTENT_TYPE, headers=None)


def test_the_reply_check_fails_on_a_wrong_vector() -> None:
    driver = Driver("amqp://unused/")
    right = expected_vector("a text", model=FULL, task_type=None, dims=128, full_dims=3072)
    driver.sent["c1"] = Sent("a text", 0.0, check=True)
    driver.bodies["c1"] = _reply_message(right)  # type: ignore[assignment]
    assert driver.check_sample(model=FULL, dims=128) == 1
    driver.bodies["c1"] = _reply_message(
        expected_vector("another", model=FULL, task_type=None, dims=128, full_dims=3072)
    )  # type: ignore[assignment]
    with pytest.raises(AssertionError, match="wrong vector"):
        driver.check_sample(model=FULL, dims=128)
    driver.bodies["c1"] = _reply_message(right[:64])  # type: ignore[assignment]
    with pytest.raises(AssertionError, match="echo reply of shape"):
        driver.check_sample(model=FULL, dims=128, echo=True)


def _registry(*, limit: bool) -> tuple[CollectorRegistry, Gauge | None, Histogram]:
    registry = CollectorRegistry()
    gauge = Gauge(scrape.LIMIT, "limit", registry=registry) if limit else None
    latency = Histogram(scrape.LATENCY, "latency", registry=registry)
    Gauge("embed_upstream_calls_in_flight", "calls", registry=registry).set(3)
    return registry, gauge, latency


def test_parse_keeps_the_upstream_gauges_and_the_latency_histogram() -> None:
    registry, gauge, latency = _registry(limit=True)
    assert gauge is not None
    gauge.set(7)
    latency.observe(0.1)
    latency.observe(0.3)
    gauges, total, count = scrape.parse(generate_latest(registry).decode())
    assert gauges == {scrape.LIMIT: 7.0, "embed_upstream_calls_in_flight": 3.0}  # no *_created timestamps
    assert total == pytest.approx(0.4) and count == 2.0
    assert scrape.in_flight_names(gauges) == ["embed_upstream_calls_in_flight"]


async def _serve(registry: CollectorRegistry) -> tuple[web.AppRunner, str]:
    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), content_type="text/plain")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app)
    await runner.setup()
    port = scrape.free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}/metrics"


async def _scrape_for(url: str, seconds: float, during: Callable[[], None] | None = None) -> dict[str, Any]:
    scraper = scrape.Scraper(url, time.perf_counter(), interval_s=0.05)
    stop = asyncio.Event()
    task = asyncio.ensure_future(scraper.run(stop))
    for _ in range(int(seconds / 0.05)):
        await asyncio.sleep(0.05)
        if during is not None:
            during()
    stop.set()
    await task
    return scraper.result(0.0, seconds)


async def test_the_scraper_records_the_limit_over_time() -> None:
    registry, gauge, latency = _registry(limit=True)
    assert gauge is not None
    gauge.set(4)

    def grow() -> None:
        gauge.inc()
        latency.observe(0.1)

    runner, url = await _serve(registry)
    try:
        result = await _scrape_for(url, 0.5, grow)
    finally:
        await runner.cleanup()
    series = result["concurrency_limit"]
    assert result["note"] is None and len(series) >= 3
    assert [t for t, _ in series] == sorted(t for t, _ in series)
    assert series[-1][1] > series[0][1] >= 4  # it grew while scraped
    assert result["concurrency_limit_summary"]["max"] == series[-1][1]
    assert result["in_flight"]["embed_upstream_calls_in_flight"][0][1] == 3
    assert all(ms == pytest.approx(100) for _, ms, _ in result["upstream_mean_latency_ms"])


async def test_the_scraper_says_when_the_gauge_is_absent_or_nothing_answers() -> None:
    registry, _, _ = _registry(limit=False)
    runner, url = await _serve(registry)
    try:
        result = await _scrape_for(url, 0.2)
    finally:
        await runner.cleanup()
    assert result["concurrency_limit"] is None and result["scrapes"] > 0
    assert scrape.LIMIT in result["note"]
    silent = await _scrape_for(f"http://127.0.0.1:{scrape.free_port()}/metrics", 0.2)
    assert silent["scrapes"] == 0 and silent["failed_scrapes"] > 0 and "never answered" in silent["note"]


def test_the_plot_and_table_show_the_limit_over_time(tmp_path: Path) -> None:
    metrics = {
        "concurrency_limit": [[0.5, 4.0], [0.6, 6.0], [0.7, 9.0]],
        "concurrency_limit_summary": {"first": 4.0, "last": 9.0, "min": 4.0, "max": 9.0, "steady_median": 6.0},
        "in_flight": {"embed_upstream_calls_in_flight": [[0.5, 3.0], [0.6, 6.0]]},
        "upstream_mean_latency_ms": [[0.6, 101.0, 4.0]],
        "first_reply_s": 0.55,
        "last_reply_s": 0.7,
        "scrapes": 3,
        "note": None,
    }
    run_ = {
        "label": SLOW,
        "texts_per_s": 100.0,
        "requests_per_s": 100.0,
        "whole_run_per_s": 50.0,
        "startup_s": 0.5,
        "upstream_calls": 2,
        "mean_batch": 10.0,
        "peak_rss_mb": 100.0,
        "cpu_us_per_request": 300.0,
        "seconds": 0.2,
        "metrics": metrics,
    }
    results = {SLOW: [run_]}
    from worker.bench.scenarios import adaptive_limits

    result = stats.summary(results, {}, adaptive=adaptive_limits(results, [SLOW]))
    _plot("adaptive", result, tmp_path / "adaptive.png")
    assert (tmp_path / "adaptive.png").stat().st_size > 1000
    assert f"adaptive limit, {SLOW}: steady-state median 6-6" in table("adaptive", result)


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
    assert not any(key.startswith("whole run") for key in both)
    for runs, whole in zip(results.values(), ([10.0, 30.0, 20.0], [10.0, 20.0, 10.0]), strict=True):
        for r, w in zip(runs, whole, strict=True):
            r["whole_run_per_s"] = w
            r["startup_s"] = w / 100
    assert stats.against(results, "a", "a", {"b": "b"}, whole=True)["whole run, a / b"] == {
        "median": 1.5,
        "min": 1.0,
        "max": 2.0,
    }
    assert stats.summary(results, {})["startup_s"]["a"] == {"median": 0.2, "min": 0.1, "max": 0.3}


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


@integration
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
