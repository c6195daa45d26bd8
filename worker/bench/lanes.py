"""``lanes``: queries on the default RPC lane while a bulk backlog drains on ``embed.requests.bulk`` (issue 18).

Upstream 300 ms a call, one worker process with default settings. Three runs a round, alternated over the rounds:

- idle (reference A): ``QUERIES`` single-text queries on the default lane, ``QUERY_RATE`` a second on a fixed
  schedule (each awaits its own reply; none waits for the one before), on an idle worker;
- single lane (reference B, and what queries meet today): a backlog of ``--requests`` single-text requests on
  ``embed.requests``, published before the worker starts, and the same queries on the same lane while it drains;
- bulk lane (measured A and B): the same backlog on ``embed.requests.bulk``, the queries on ``embed.requests``.

Both backlog runs carry the queries, so the throughput ratio bulk / single lane compares like with like: what giving
queries the upstream first costs ingestion, with the same query traffic. Query percentiles of a backlog run are
over the queries sent while the backlog drained (sent before its last reply); the idle run's over all of them.
Every reply, backlog and queries, is checked for the vector of its own text. The issue's figures are for a backlog of
10,000: ``embed-worker bench lanes --requests 10000`` (the CLI's default is 20,000).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from worker.bench import stats
from worker.bench.harness import BULK_LANE, DEFAULT_LANE, SMALL, Alongside, Bench, RunSpec, rounds
from worker.bench.load import Driver
from worker.topology import EXCHANGE, ROUTING_KEY

UPSTREAM_MS = 300
QUERIES = 50  # at full size; a smoke run (--requests under 1,000) sends SMOKE_QUERIES
SMOKE_QUERIES = 10
QUERY_RATE = 5.0  # per second

IDLE = "idle worker: queries only"
SINGLE = "single lane: backlog and queries on embed.requests"
BULK = "bulk lane: backlog on embed.requests.bulk, queries on embed.requests"


def queries(count: int, timeout: float) -> Alongside:
    """``count`` single-text queries on the default lane at QUERY_RATE, sent from the moment the worker is ready;
    each one's send time (seconds since then) and latency, every reply checked for its text's vector."""

    async def run(url: str, ready_at: float) -> dict[str, Any]:
        async with Driver(url, sample_every=1, exchange=EXCHANGE, routing_key=ROUTING_KEY) as driver:
            await driver.open_loop(QUERY_RATE, count, model=SMALL, dims=None, prefix="query")
            await driver.wait_for(count, timeout=timeout)
            checked = driver.check_sample(model=SMALL, dims=None)
        cids = list(driver.sent)  # in the order sent
        return {
            "queries": count,
            "queries_checked": checked,
            "query_sent_s": [round(driver.sent[c].at - ready_at, 4) for c in cids],
            "query_latency_ms": [round((driver.received[c] - driver.sent[c].at) * 1000, 2) for c in cids],
        }

    return run


def _percentiles(run: dict[str, Any]) -> None:
    """The run's query p50 and p99: over the queries sent while its backlog drained (all of them without one)."""
    pairs = list(zip(run["query_sent_s"], run["query_latency_ms"], strict=True))
    # Sent before the backlog's last reply: both times are counted from the worker's ready line.
    during = [ms for sent, ms in pairs if sent <= run["ready_to_last_s"]] if run["requests"] else []
    latencies = during or [ms for _, ms in pairs]
    run["queries_during_drain"] = len(during)
    run["query_p50_ms"] = round(float(np.percentile(latencies, 50)), 2)
    run["query_p99_ms"] = round(float(np.percentile(latencies, 99)), 2)


async def scenario_lanes(bench: Bench) -> dict[str, Any]:
    n = bench.config.requests
    count = QUERIES if n >= 1000 else SMOKE_QUERIES
    timeout = max(120.0, n / 50)  # a query behind a single-lane backlog waits for all of it
    common = {"model": SMALL, "latency_ms": UPSTREAM_MS, "check_every": 1, "alongside": queries(count, timeout)}
    results = await rounds(
        bench,
        [
            RunSpec(IDLE, "worker", {**common, "n": 0}),
            RunSpec(SINGLE, "worker", {**common, "n": n, "lane": DEFAULT_LANE}),
            RunSpec(BULK, "worker", {**common, "n": n, "lane": BULK_LANE}),
        ],
    )
    for runs in results.values():
        for run in runs:
            _percentiles(run)

    def over_idle_calls(label: str) -> dict[str, float]:  # p99 minus idle p99, in upstream calls of UPSTREAM_MS
        pairs = zip(results[label], results[IDLE], strict=True)
        return stats.spread([(r["query_p99_ms"] - i["query_p99_ms"]) / UPSTREAM_MS for r, i in pairs], 2)

    backlogs = (SINGLE, BULK)
    return {
        # The median round of each run by query p99, for the record; every figure below is over all rounds.
        "runs": [sorted(runs, key=lambda r: r["query_p99_ms"])[len(runs) // 2] for runs in results.values()],
        "all_runs": results,
        "ratios": {
            "query p50, behind bulk / idle": stats.ratio(results, BULK, IDLE, "query_p50_ms"),
            "query p99, behind bulk / idle": stats.ratio(results, BULK, IDLE, "query_p99_ms"),
            "query p99, behind the single lane / idle": stats.ratio(results, SINGLE, IDLE, "query_p99_ms"),
            "throughput, bulk lane / single lane": stats.ratio(results, BULK, SINGLE),
        },
        "query_latency": {
            label: {
                "p50_ms": stats.spread([r["query_p50_ms"] for r in runs], 1),
                "p99_ms": stats.spread([r["query_p99_ms"] for r in runs], 1),
                "queries_during_drain": [r["queries_during_drain"] for r in runs],
            }
            for label, runs in results.items()
        },
        "p99_over_idle_upstream_calls": {label: over_idle_calls(label) for label in backlogs},
        "texts_per_s": {label: stats.spread([r["texts_per_s"] for r in results[label]], 1) for label in backlogs},
        # From the ready line to the backlog's last reply, the clock the queries' send times use.
        "drain_seconds": {label: stats.spread([r["ready_to_last_s"] for r in results[label]], 2) for label in backlogs},
        "peak_rss_mb": {label: stats.spread([r["peak_rss_mb"] for r in runs], 1) for label, runs in results.items()},
        "cpu_us_per_request": {
            label: stats.spread([r["cpu_us_per_request"] for r in results[label]], 1) for label in backlogs
        },
        "backlog": n,
        "queries": count,
        "query_rate_per_s": QUERY_RATE,
        "upstream_latency_ms": UPSTREAM_MS,
    }


def _cell(spread: dict[str, float], digits: int = 0) -> str:
    return f"{spread['median']:.{digits}f} ({spread['min']:.{digits}f}-{spread['max']:.{digits}f})"


def table(name: str, result: dict[str, Any]) -> str:
    rounds_run = len(next(iter(result["all_runs"].values())))
    lines = [
        f"\n== {name}",
        f"backlog {result['backlog']} requests, {result['queries']} queries at {result['query_rate_per_s']:g}/s, "
        f"upstream {result['upstream_latency_ms']} ms; medians (min-max) of {rounds_run} rounds",
        f"{'run':<70} {'query p50 ms':>18} {'query p99 ms':>18} {'texts/s':>18} {'peak RSS MB':>18}",
    ]
    for label, q in result["query_latency"].items():
        rate = result["texts_per_s"].get(label)
        lines.append(
            f"{label:<70} {_cell(q['p50_ms']):>18} {_cell(q['p99_ms']):>18} "
            f"{_cell(rate) if rate else '-':>18} {_cell(result['peak_rss_mb'][label], 1):>18}"
        )
    for key, value in result["ratios"].items():
        lines.append(f"  {key}: {value['median']:.2f}x (min {value['min']:.2f}, max {value['max']:.2f})")
    for label, calls in result["p99_over_idle_upstream_calls"].items():
        lines.append(
            f"  query p99 minus idle p99, {label.split(':')[0]}: {calls['median']:.2f} upstream calls of "
            f"{result['upstream_latency_ms']} ms (min {calls['min']:.2f}, max {calls['max']:.2f})"
        )
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    """Each query's latency against when it was sent (seconds since the backlog started draining, i.e. since the
    worker was ready), every round; dashed: where each backlog run's drain ended (median over the rounds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    colours = {IDLE: "tab:green", BULK: "tab:blue", SINGLE: "tab:red"}
    for label, runs in result["all_runs"].items():
        sent = [s for r in runs for s in r["query_sent_s"]]
        latency = [ms for r in runs for ms in r["query_latency_ms"]]
        q = result["query_latency"][label]
        name = f"{label} (p50 {q['p50_ms']['median']:.0f} ms, p99 {q['p99_ms']['median']:.0f} ms)"
        ax.scatter(sent, latency, s=10, alpha=0.6, color=colours.get(label), label=name)
        if label in result["drain_seconds"]:
            ax.axvline(result["drain_seconds"][label]["median"], color=colours.get(label), linestyle="--", lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("seconds since the backlog started draining (the worker ready); dashed: drain done")
    ax.set_ylabel("query latency (ms)")
    ratios = result["ratios"]
    ax.set_title(
        f"lanes: backlog {result['backlog']}, upstream {result['upstream_latency_ms']} ms; query p99 behind bulk / "
        f"idle {ratios['query p99, behind bulk / idle']['median']:.2f}x, throughput bulk / single lane "
        f"{ratios['throughput, bulk lane / single lane']['median']:.2f}x",
        fontsize=9,
    )
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
