"""Benchmark scenarios, and ``SCENARIOS``, the registry ``embed-worker bench NAME`` runs them from: here the
throughput and latency ones (drain, adaptive, latency, upstream-bound, dims, scale, baseline, memory);
``worker.bench.quota`` holds those about the upstream quota and big inputs (frugality, images, image-flood),
``worker.bench.lanes`` the two RPC lanes (lanes). Each starts what it needs through ``worker.bench.harness`` and
returns figures. ``drain`` is issue 21's table (steady state against both batching echoes, whole run, start-up);
``adaptive`` the concurrency limit over time.
"""

from __future__ import annotations

from typing import Any

from worker.bench import stats
from worker.bench.gateway import scenario_gateway
from worker.bench.harness import BATCH_ECHOES, FULL, SMALLEST, Bench, BenchConfig, RunSpec, Scenario, rounds
from worker.bench.lanes import scenario_lanes
from worker.bench.quota import scenario_frugality, scenario_image_flood, scenario_images

__all__ = ["SCENARIOS", "BenchConfig"]  # what worker/cli.py takes from here


# Issue 21's goals for the drain scenario: steady-state rate ratios against the batching echo, and the worker's
# start-up (process start to first reply, seconds) at most this.
GOALS = {
    "worker / batch-echo at 128d": 1.1,
    "worker (100 ms upstream) / batch-echo at 128d": 0.95,
    "worker / batch-echo at 3072d": 0.6,
}
STARTUP_GOAL_S = 0.5
SLOW = f"worker {SMALLEST}d, upstream 100 ms"
KNEE = f"worker {SMALLEST}d, upstream slower with more calls in flight"


def _batch_echoes(suffix: str) -> dict[str, str]:
    """Both batching echo references' spec labels, by reference name."""
    return {target: f"{target} {suffix}" for target in BATCH_ECHOES}


async def scenario_drain(bench: Bench) -> dict[str, Any]:
    """Issue 21's table. Pre-loaded queues of one-text requests for gemini-embedding-001: at 128 dims (the smallest
    size a real caller can ask for) with the upstream answering at once and after 100 ms, and at 3,072 dims (no
    output_dimensionality: the model's default; JSON replies; a quarter of the requests, the replies being 24x the
    bytes), each against both batching echoes in the same round. Per run: start-up (process start to first reply),
    steady state (first reply to last), whole run; CPU per request, peak RSS; in the 100 ms run, the worker's
    adaptive concurrency limit every ~100 ms. (The emulator's 8-dimension model is measured in ``baseline``.)"""
    n = bench.config.requests
    at_128 = {"n": n, "model": FULL, "dims": SMALLEST}
    at_full = {"n": max(100, n // 4), "model": FULL}
    refs_128, refs_full = _batch_echoes(f"{SMALLEST}d"), _batch_echoes("3072d")
    worker, full = f"worker {SMALLEST}d", "worker 3072d"
    results = await rounds(
        bench,
        [
            *(RunSpec(label, target, at_128) for target, label in refs_128.items()),
            RunSpec(worker, "worker", at_128),
            RunSpec(SLOW, "worker", {**at_128, "latency_ms": 100, "scrape": True}),
            *(RunSpec(label, target, at_full) for target, label in refs_full.items()),
            RunSpec(full, "worker", at_full),
        ],
    )
    ratios = {
        **stats.against(results, "worker", worker, refs_128, f" at {SMALLEST}d", whole=True),
        **stats.against(results, "worker (100 ms upstream)", SLOW, refs_128, f" at {SMALLEST}d", whole=True),
        **stats.against(results, "worker", full, refs_full, " at 3072d", whole=True),
        **stats.against(
            results, "batch-echo-aiormq", refs_128["batch-echo-aiormq"], {"batch-echo": refs_128["batch-echo"]}
        ),
    }
    return stats.summary(
        results,
        ratios,
        model=FULL,
        goals=GOALS,
        startup_goal={"label": worker, "max_s": STARTUP_GOAL_S, "reference": refs_128["batch-echo"]},
        adaptive=adaptive_limits(results, [SLOW]),
    )


# The knee run's upstream: 200 ms a call (real Gemini's fast end) for up to KNEE_CAPACITY calls at once, slower in
# proportion past that (the emulator's ``capacity``, processor sharing), so throughput stops growing at
# KNEE_CAPACITY x BATCH_MAX_SIZE / 0.2 s and more calls in flight only queue. Replaced by BenchConfig's
# knee_emulator_config (and _args, _env: an emulator of its own for the run) when any is given.
KNEE_LATENCY_MS = 200.0
KNEE_CAPACITY = 4


async def scenario_adaptive(bench: Bench) -> dict[str, Any]:
    """The adaptive concurrency limit over time (issue 21, part 2): the worker's /metrics read every ~100 ms while it
    drains 128-dim requests from an upstream of 100 ms, and from an upstream whose latency rises with the calls in
    flight past a knee, which the limit must find (``KNEE_*``, or ``BenchConfig.knee_emulator_args``, ``_env``,
    ``_config``)."""
    c = bench.config
    common = {"n": c.requests, "model": FULL, "dims": SMALLEST, "scrape": True}
    given = bool(c.knee_emulator_args or c.knee_emulator_env or c.knee_emulator_config)
    knee_config = c.knee_emulator_config if given else {"capacity": KNEE_CAPACITY}
    knee = {
        **common,
        "latency_ms": KNEE_LATENCY_MS,
        "emulator_args": c.knee_emulator_args,
        "emulator_env": c.knee_emulator_env,
        "emulator_config": knee_config,
    }
    results = await rounds(
        bench, [RunSpec(SLOW, "worker", {**common, "latency_ms": 100}), RunSpec(KNEE, "worker", knee)]
    )
    ratios = {"throughput, rising latency / 100 ms upstream": stats.ratio(results, KNEE, SLOW)}
    latency_s = float(knee_config.get("latency_ms", KNEE_LATENCY_MS)) / 1000
    capacity = knee_config.get("capacity")
    notes = []
    if any(r.get("upstream_max_in_flight") is None for r in results[KNEE]):
        notes.append("the emulator reports no max_in_flight: it may not know 'capacity' (a plain-latency run)")
    if capacity and not c.knee_emulator_args:
        ideal = float(capacity) * c.batch / latency_s  # what the knee lets through, however many calls wait
        ratios["rising latency: throughput / the knee's (capacity x batch / latency)"] = stats.spread(
            [r["texts_per_s"] / ideal for r in results[KNEE]]
        )
    return stats.summary(
        results,
        ratios,
        model=FULL,
        dimensions=SMALLEST,
        adaptive=adaptive_limits(results, [SLOW, KNEE]),
        knee_emulator={
            "latency_ms": latency_s * 1000,
            "config": knee_config,
            "args": c.knee_emulator_args,
            "env": c.knee_emulator_env,
            "notes": notes,
        },
    )


def adaptive_limits(results: stats.Results, labels: list[str]) -> dict[str, Any]:
    """Per scraped run, each round's limit figures (first, last, min, max, median over the steady state) or why
    there are none; the series themselves stay in each run's ``metrics``."""
    out: dict[str, Any] = {}
    for label in labels:
        rounds_ = [r.get("metrics") or {} for r in results[label]]
        out[label] = {
            "limit": [m.get("concurrency_limit_summary") for m in rounds_],
            "upstream_max_in_flight": [r.get("upstream_max_in_flight") for r in results[label]],
            "in_flight_gauges": sorted({name for m in rounds_ for name in m.get("in_flight", {})}),
            "scrapes": [m.get("scrapes", 0) for m in rounds_],
            "notes": sorted({m["note"] for m in rounds_ if m.get("note")}),
        }
    return out


async def scenario_dims(bench: Bench) -> dict[str, Any]:
    """768 and 3,072 dims (the latter without output_dimensionality), JSON and float32 replies, against both
    batching echoes."""
    n = max(100, bench.config.requests // 4)
    specs, ratios = [], {}
    for dims in (768, 3072):
        common = {"n": n, "model": FULL, "dims": dims if dims != 3072 else None}
        refs = _batch_echoes(f"{dims}d")
        specs += [
            *(RunSpec(label, target, common) for target, label in refs.items()),
            RunSpec(f"worker {dims}d", "worker", common),
            RunSpec(f"worker {dims}d, float32 replies", "worker", {**common, "reply_encoding": "float32"}),
        ]
    results = await rounds(bench, specs)
    for dims in (768, 3072):
        refs = _batch_echoes(f"{dims}d")
        ratios.update(stats.against(results, "worker", f"worker {dims}d", refs, f" at {dims}d"))
        ratios.update(
            stats.against(
                results, "worker float32 replies", f"worker {dims}d, float32 replies", refs, f" (JSON) at {dims}d"
            )
        )
    return stats.summary(results, ratios)


async def scenario_upstream_bound(bench: Bench) -> dict[str, Any]:
    c = bench.config
    n = max(c.batch * c.slots * 4, c.requests // 4)
    results = await rounds(
        bench,
        [
            RunSpec("echo 8d", "echo", {"n": n}),
            RunSpec("batch-echo 8d", "batch-echo", {"n": n}),
            RunSpec("worker 8d, upstream 300 ms", "worker", {"n": n, "latency_ms": 300}),
        ],
    )
    ideal = c.slots * c.batch / 0.3
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
                [w["mean_batch"] / c.batch for w in worker]
            ),
        },
        ideal_texts_per_s=round(ideal, 1),
    )


async def scenario_scale(bench: Bench) -> dict[str, Any]:
    n = bench.config.requests
    results = await rounds(bench, [RunSpec(f"worker x{k}", "worker", {"n": n, "processes": k}) for k in (1, 2, 4)])
    return stats.summary(results, {f"x{k} / x1": stats.ratio(results, f"worker x{k}", "worker x1") for k in (2, 4)})


async def scenario_baseline(bench: Bench) -> dict[str, Any]:
    """The emulator's 8-dimension model (message cost without float cost): the three references, naive, worker."""
    n = max(100, bench.config.requests // 4)
    naive = "naive 8d (1 call/message)"
    results = await rounds(
        bench,
        [
            RunSpec("echo 8d", "echo", {"n": n}),
            RunSpec("batch-echo 8d", "batch-echo", {"n": n}),
            RunSpec("batch-echo-aiormq 8d", "batch-echo-aiormq", {"n": n}),
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
            **stats.against(results, "batch-echo-aiormq", "batch-echo-aiormq 8d", {"batch-echo": "batch-echo 8d"}),
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
        "settings": {"batch_size": c.batch, "max_wait_ms": c.wait_ms, "concurrency": c.slots},
        "lone_request": {
            "p50_ms": lone["p50_ms"],
            "p99_ms": lone["p99_ms"],
            "p50_target_ms": c.wait_ms + 5,
            "p99_target_ms": c.wait_ms + 15,
            "echo_p50_ms": echo["p50_ms"],
            "echo_p99_ms": echo["p99_ms"],
            "added_p50_ms": round(lone["p50_ms"] - c.wait_ms - echo["p50_ms"], 2),
        },
    }


SCENARIOS: dict[str, Scenario] = {
    "drain": scenario_drain,
    "adaptive": scenario_adaptive,
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
    "gateway": scenario_gateway,
}
