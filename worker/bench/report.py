"""Results: a JSON file, a PNG plot and a short table per scenario."""

from __future__ import annotations

import asyncio
import platform
import time
from pathlib import Path
from typing import Any

import orjson

from worker.bench import lanes
from worker.bench.harness import Bench, BenchConfig
from worker.bench.scenarios import SCENARIOS


async def run(names: list[str], config: BenchConfig, out_dir: Path, plot: bool = True) -> dict[str, Any]:
    results: dict[str, Any] = {}
    async with Bench(config) as bench:
        for name in names:
            started = time.time()
            result = await SCENARIOS[name](bench)
            result["scenario"] = name
            result["config"] = {k: v for k, v in vars(config).items() if k != "amqp_url"}
            result["machine"] = {"cpus": _cpus(), "python": platform.python_version(), "at": started}
            (out_dir / f"{name}.json").write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
            if plot:
                _plot(name, result, out_dir / f"{name}.png")
            print(table(name, result), flush=True)
            results[name] = result
    return results


def table(name: str, result: dict[str, Any]) -> str:
    if "query_latency" in result:
        return lanes.table(name, result)
    lines = [f"\n== {name}"]
    if "rows" in result:
        lines.append(f"{'rate/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'batch':>7} {'fill':>6}")
        for r in result["rows"]:
            lines.append(
                f"{r['rate_per_s']:>8g} {r['p50_ms']:>8.1f} {r['p95_ms']:>8.1f} {r['p99_ms']:>8.1f} "
                f"{r['mean_batch']:>7.1f} {r['batch_fill']:>6.0%}"
            )
        lone = result["lone_request"]
        lines.append(
            f"lone request: p50 {lone['p50_ms']} ms (target <= {lone['p50_target_ms']} ms), "
            f"p99 {lone['p99_ms']} ms (target <= {lone['p99_target_ms']} ms)"
        )
        lines.append(
            f"echo worker at the same rate: p50 {lone['echo_p50_ms']} ms, p99 {lone['echo_p99_ms']} ms; the worker "
            f"adds {lone['added_p50_ms']} ms at p50 beyond BATCH_MAX_WAIT_MS and the echo round trip"
        )
        return "\n".join(lines)
    # CPU per request: the median over the rounds with min-max (the row's run is the median by rate).
    lines.append(
        f"{'run':<34} {'req/s':>9} {'texts/s':>9} {'calls':>7} {'batch':>7} {'RSS MB':>8} "
        f"{'CPU us/req (min-max)':>22} {'s':>7}"
    )
    cpus = result.get("cpu_us_per_request", {})
    for r in result["runs"]:
        batch = f"{r['mean_batch']:.1f}" if r["mean_batch"] else "-"
        c = cpus.get(r["label"])
        cpu = f"{c['median']:.0f} ({c['min']:.0f}-{c['max']:.0f})" if c else f"{r['cpu_us_per_request']:.0f}"
        lines.append(
            f"{r['label']:<34} {r['requests_per_s']:>9.0f} {r['texts_per_s']:>9.0f} "
            f"{r['upstream_calls']:>7} {batch:>7} {r['peak_rss_mb']:>8.1f} {cpu:>22} {r['seconds']:>7.2f}"
        )
    for key, value in result.get("ratios", {}).items():
        lines.append(
            f"  {key}: {value['median']:.2f}x (min {value['min']:.2f}, max {value['max']:.2f}, "
            f"{len(next(iter(result['all_runs'].values())))} rounds)"
        )
    for label, share in result.get("saved_share", {}).items():
        lines.append(
            f"  {label}: {share['median']:.0%} of {result['requests']} requests cost no upstream input "
            f"(min {share['min']:.0%}, max {share['max']:.0%}; {result['distinct_texts']} distinct texts)"
        )
    if "windows" in result:
        w = result["windows"]
        for scope, run in w["runs"].items():
            lines.append(
                f"  2 workers, UPSTREAM_LIMIT_SCOPE={scope}: at most {run['max_calls_in_a_window']} calls in any "
                f"{w['window_s']:g} s window (limit {w['limit']}), "
                f"{run['upstream_calls']} calls in {run['seconds']:.1f} s"
            )
    if "budget_bytes" in result:
        lines.append(
            f"  bytes per call: mean {result['mean_call_bytes']['median']:,.0f}, max {result['max_call_bytes']:,} "
            f"(budget {result['budget_bytes']:,}); images {result['image_bytes']['min']:,}-"
            f"{result['image_bytes']['max']:,} bytes"
        )
    if "ideal_texts_per_s" in result:
        lines.append(f"  ideal (concurrency x batch / 0.3 s): {result['ideal_texts_per_s']:.0f} texts/s")
    return "\n".join(lines)


def _plot(name: str, result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if "windows" in result:
        from worker.bench.quota import plot_windows

        plot_windows(result, path)
        return
    if "query_latency" in result:
        lanes.plot(result, path)
        return
    fig, ax = plt.subplots(figsize=(8, 4.5))
    if "rows" in result:
        rows = result["rows"]
        rates = [r["rate_per_s"] for r in rows]
        for key, style in (("p50_ms", "o-"), ("p95_ms", "s--"), ("p99_ms", "^:")):
            ax.plot(rates, [r[key] for r in rows], style, label=key.replace("_ms", ""))
        ax.set_xscale("log")
        ax.set_xlabel("arrival rate (requests/s, open loop)")
        ax.set_ylabel("reply latency (ms)")
        fill = ax.twinx()
        fill.bar(
            rates,
            [r["batch_fill"] * 100 for r in rows],
            width=[x * 0.3 for x in rates],
            alpha=0.2,
            color="green",
            label="batch fill",
        )
        fill.set_ylabel("mean batch fill (% of BATCH_MAX_SIZE)")
        fill.set_ylim(0, 105)
        s = result["settings"]
        ax.set_title(
            f"latency vs load (batch {s['batch_size']}, wait {s['max_wait_ms']} ms, {s['concurrency']} concurrent)"
        )
        ax.legend(loc="upper left")
    else:
        runs = result["runs"]
        ax.barh([r["label"] for r in runs], [r["texts_per_s"] for r in runs], color="steelblue")
        for i, r in enumerate(runs):
            ax.text(r["texts_per_s"], i, f" {r['texts_per_s']:.0f}/s", va="center")
        ax.set_xlabel("texts per second")
        ax.invert_yaxis()
        ax.set_title(
            name + ": " + ", ".join(f"{k} {v['median']:.2f}x" for k, v in result["ratios"].items())[:90], fontsize=9
        )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0))


def main(names: list[str], config: BenchConfig, out_dir: Path, plot: bool) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    asyncio.run(run(names, config, out_dir, plot))
