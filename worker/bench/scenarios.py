"""Benchmark scenarios, and ``SCENARIOS``, the registry ``embed-worker bench NAME`` runs them from: here the
throughput and latency ones (drain, latency, upstream-bound, dims, scale, baseline, memory); ``worker.bench.quota``
holds those about the upstream quota and big inputs (frugality, images, image-flood), ``worker.bench.lanes`` the
two RPC lanes (lanes). Each starts what it needs through ``worker.bench.harness`` and returns figures.
"""

from __future__ import annotations

from typing import Any

from worker.bench import stats
from worker.bench.harness import FULL, SMALLEST, Bench, BenchConfig, RunSpec, Scenario, rounds
from worker.bench.lanes import scenario_lanes
from worker.bench.quota import scenario_frugality, scenario_image_flood, scenario_images

__all__ = ["SCENARIOS", "BenchConfig"]  # what worker/cli.py takes from here


async def scenario_drain(bench: Bench) -> dict[str, Any]:
    """A pre-loaded queue at 128 dims of gemini-embedding-001, the smallest size a real caller can ask for,
    against both references; with the upstream answering at once and after 100 ms. (The emulator's 8-dimension
    model is measured in ``baseline``.)"""
    n = bench.config.requests
    common = {"n": n, "model": FULL, "dims": SMALLEST}
    echo, batch_echo, worker = f"echo {SMALLEST}d", f"batch-echo {SMALLEST}d", f"worker {SMALLEST}d"
    slow = f"worker {SMALLEST}d, upstream 100 ms"
    results = await rounds(
        bench,
        [
            RunSpec(echo, "echo", common),
            RunSpec(batch_echo, "batch-echo", common),
            RunSpec(worker, "worker", common),
            RunSpec(slow, "worker", {**common, "latency_ms": 100}),
        ],
    )
    refs = {"echo": echo, "batch-echo": batch_echo}
    return stats.summary(
        results,
        {
            **stats.against(results, "worker", worker, refs),
            **stats.against(results, "worker (100 ms upstream)", slow, refs),
            **stats.against(results, "batch-echo", batch_echo, {"echo": echo}),
        },
        model=FULL,
        dimensions=SMALLEST,
    )


async def scenario_dims(bench: Bench) -> dict[str, Any]:
    n = max(100, bench.config.requests // 4)
    specs, ratios = [], {}
    for dims in (768, 3072):
        common = {"n": n, "model": FULL, "dims": dims if dims != 3072 else None}
        specs += [
            RunSpec(f"echo {dims}d", "echo", common),
            RunSpec(f"batch-echo {dims}d", "batch-echo", common),
            RunSpec(f"worker {dims}d", "worker", common),
            RunSpec(f"worker {dims}d, float32 replies", "worker", {**common, "reply_encoding": "float32"}),
        ]
    results = await rounds(bench, specs)
    for dims in (768, 3072):
        refs = {"echo": f"echo {dims}d", "batch-echo": f"batch-echo {dims}d"}
        ratios.update(stats.against(results, "worker", f"worker {dims}d", refs, f" at {dims}d"))
        ratios.update(
            stats.against(
                results, "worker float32 replies", f"worker {dims}d, float32 replies", refs, f" (JSON) at {dims}d"
            )
        )
        ratios.update(
            stats.against(results, "batch-echo", f"batch-echo {dims}d", {"echo": refs["echo"]}, f" at {dims}d")
        )
    return stats.summary(results, ratios)


async def scenario_upstream_bound(bench: Bench) -> dict[str, Any]:
    c = bench.config
    n = max(c.batch_size * c.concurrency * 4, c.requests // 4)
    results = await rounds(
        bench,
        [
            RunSpec("echo 8d", "echo", {"n": n}),
            RunSpec("batch-echo 8d", "batch-echo", {"n": n}),
            RunSpec("worker 8d, upstream 300 ms", "worker", {"n": n, "latency_ms": 300}),
        ],
    )
    ideal = c.concurrency * c.batch_size / 0.3
    worker = results["worker 8d, upstream 300 ms"]

    def fraction_of(ref: str) -> dict[str, float]:
        return stats.spread(
            [w["texts_per_s"] / min(ideal, e["texts_per_s"]) for w, e in zip(worker, results[ref], strict=True)]
        )

    return stats.summary(
        results,
        {
            "worker / min(ideal, echo)": fraction_of("echo 8d"),
            "worker / min(ideal, batch-echo)": fraction_of("batch-echo 8d"),
            "batch fill (mean texts per call / BATCH_MAX_SIZE)": stats.spread(
                [w["mean_batch"] / c.batch_size for w in worker]
            ),
        },
        ideal_texts_per_s=round(ideal, 1),
    )


async def scenario_scale(bench: Bench) -> dict[str, Any]:
    n = bench.config.requests
    results = await rounds(bench, [RunSpec(f"worker x{k}", "worker", {"n": n, "processes": k}) for k in (1, 2, 4)])
    return stats.summary(results, {f"x{k} / x1": stats.ratio(results, f"worker x{k}", "worker x1") for k in (2, 4)})


async def scenario_baseline(bench: Bench) -> dict[str, Any]:
    """The emulator's 8-dimension model (message cost without float cost): references, naive, worker."""
    n = max(100, bench.config.requests // 4)
    naive = "naive 8d (1 call/message)"
    results = await rounds(
        bench,
        [
            RunSpec("echo 8d", "echo", {"n": n}),
            RunSpec("batch-echo 8d", "batch-echo", {"n": n}),
            RunSpec(naive, "naive", {"n": n}),
            RunSpec("worker 8d", "worker", {"n": n}),
        ],
    )
    refs = {"echo": "echo 8d", "batch-echo": "batch-echo 8d"}
    return stats.summary(
        results,
        {
            "naive / echo": stats.ratio(results, naive, "echo 8d"),
            "naive / batch-echo": stats.ratio(results, naive, "batch-echo 8d"),
            **stats.against(results, "worker", "worker 8d", refs),
            "worker / naive (batching speed-up)": stats.ratio(results, "worker 8d", naive),
            **stats.against(results, "batch-echo", "batch-echo 8d", {"echo": "echo 8d"}),
        },
    )


async def scenario_memory(bench: Bench) -> dict[str, Any]:
    n = max(bench.config.requests, 1000)
    small, big = f"worker, {max(100, n // 10)} backlog", f"worker, {n} backlog"
    results = await rounds(
        bench,
        [
            RunSpec(small, "worker", {"n": max(100, n // 10)}),
            RunSpec(big, "worker", {"n": n}),
        ],
    )
    return stats.summary(results, {"peak RSS big / small backlog": stats.ratio(results, big, small, key="peak_rss_mb")})


async def scenario_latency(bench: Bench) -> dict[str, Any]:
    """The size/timeout trade-off, and a lone request's latency against the echo worker's at the same rate:
    the echo figure is what the broker and this machine's process wake-ups cost before any batching."""
    c = bench.config
    echo = (await bench.latency("echo", rates=c.rates[:1]))[0]
    rows = await bench.latency("worker")
    lone = rows[0]
    return {
        "rows": rows,
        "echo_lone": echo,
        "settings": {"batch_size": c.batch_size, "max_wait_ms": c.max_wait_ms, "concurrency": c.concurrency},
        "lone_request": {
            "p50_ms": lone["p50_ms"],
            "p99_ms": lone["p99_ms"],
            "p50_target_ms": c.max_wait_ms + 5,
            "p99_target_ms": c.max_wait_ms + 15,
            "echo_p50_ms": echo["p50_ms"],
            "echo_p99_ms": echo["p99_ms"],
            "added_p50_ms": round(lone["p50_ms"] - c.max_wait_ms - echo["p50_ms"], 2),
        },
    }


SCENARIOS: dict[str, Scenario] = {
    "drain": scenario_drain,
    "latency": scenario_latency,
    "upstream-bound": scenario_upstream_bound,
    "dims": scenario_dims,
    "scale": scenario_scale,
    "baseline": scenario_baseline,
    "memory": scenario_memory,
    "frugality": scenario_frugality,
    "images": scenario_images,
    "image-flood": scenario_image_flood,
    "lanes": scenario_lanes,
}
