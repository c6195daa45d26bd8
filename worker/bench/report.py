"""Results: a JSON file, a PNG plot and a short table per scenario."""

from __future__ import annotations

import asyncio
import platform
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from worker.bench import gateway, lanes
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
            if plot and "overhead_ms_per_request" in result:
                gateway.plot(result, out_dir / f"{name}.png")
            elif plot:
                _plot(name, result, out_dir / f"{name}.png")
            print(table(name, result), flush=True)
            results[name] = result
    return results


def table(name: str, result: dict[str, Any]) -> str:
    if "query_latency" in result:
        return lanes.table(name, result)
    if "overhead_ms_per_request" in result:
        return gateway.table(result)
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
    # Per run (the row's run is the median round by steady-state rate): steady state = first reply to last; whole =
    # process start to last reply; start = process start to first reply; CPU per request and start-up are the
    # median over the rounds with min-max; peak RSS is VmHWM.
    runs = result["runs"]
    width = max([34, *(len(r["label"]) for r in runs)])
    lines.append(
        f"{'run':<{width}} {'steady/s':>9} {'whole/s':>9} {'start s (min-max)':>19} {'calls':>7} {'batch':>6} "
        f"{'RSS MB':>7} {'CPU us/req (min-max)':>21} {'steady s':>8}"
    )
    cpus = result.get("cpu_us_per_request", {})
    starts = result.get("startup_s", {})
    for r in runs:
        batch = f"{r['mean_batch']:.1f}" if r["mean_batch"] else "-"
        c = cpus.get(r["label"])
        cpu = f"{c['median']:.0f} ({c['min']:.0f}-{c['max']:.0f})" if c else _num(r["cpu_us_per_request"])
        st = starts.get(r["label"])
        start = f"{st['median']:.2f} ({st['min']:.2f}-{st['max']:.2f})" if st else _num(r.get("startup_s"), 2)
        lines.append(
            f"{r['label']:<{width}} {_num(r['requests_per_s']):>9} {_num(r.get('whole_run_per_s')):>9} {start:>19} "
            f"{r['upstream_calls']:>7} {batch:>6} {r['peak_rss_mb']:>7.1f} {cpu:>21} {r['seconds']:>8.2f}"
        )
    goals = result.get("goals", {})
    rounds_run = len(next(iter(result["all_runs"].values()), []))
    for key, value in result.get("ratios", {}).items():
        goal = goals.get(key)
        verdict = f"; goal >= {goal:g}: {'met' if value['median'] >= goal else 'missed'}" if goal else ""
        lines.append(
            f"  {key}: {value['median']:.2f}x (min {value['min']:.2f}, max {value['max']:.2f}, "
            f"{rounds_run} rounds{verdict})"
        )
    goal = result.get("startup_goal")
    if goal and goal["label"] in starts:
        st, ref = starts[goal["label"]], starts.get(goal.get("reference", ""))
        verdict = "met" if st["median"] <= goal["max_s"] else "missed"
        beside = f"; {goal['reference']} {ref['median']:.2f} s ({ref['min']:.2f}-{ref['max']:.2f})" if ref else ""
        lines.append(
            f"  start-up, {goal['label']}: first reply {st['median']:.2f} s after process start "
            f"(min {st['min']:.2f}, max {st['max']:.2f}); goal <= {goal['max_s']:g} s: {verdict}{beside}"
        )
    lines.extend(_adaptive_lines(result))
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


def _num(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _adaptive_lines(result: dict[str, Any]) -> list[str]:
    lines = []
    knee = result.get("knee_emulator")
    if knee:
        lines.append(
            f"  rising-latency upstream: {knee['latency_ms']:g} ms a call, emulator config {knee['config']}"
            + (f", emulator arguments {knee['args']}" if knee["args"] else "")
        )
        lines.extend(f"  note: {note}" for note in knee["notes"])
    for label, a in result.get("adaptive", {}).items():
        limits = [x for x in a["limit"] if x]
        if limits:
            steady = [x["steady_median"] for x in limits]
            lines.append(
                f"  adaptive limit, {label}: steady-state median {min(steady):g}-{max(steady):g} over "
                f"{len(limits)} rounds; from {limits[0]['first']:g} to {limits[0]['last']:g} "
                f"(min {min(x['min'] for x in limits):g}, max {max(x['max'] for x in limits):g}); "
                f"{sum(a['scrapes'])} scrapes; in-flight gauges: {', '.join(a['in_flight_gauges']) or 'none'}; "
                f"most calls in flight at the emulator: {a['upstream_max_in_flight']}"
            )
        for note in a["notes"]:
            lines.append(f"  adaptive limit, {label}: {note}")
    return lines


def _scraped(result: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(label, metrics) of every scraped run in every round, in round order."""
    out = []
    for label, runs in result.get("all_runs", {}).items():
        for i, run in enumerate(runs):
            if run.get("metrics"):
                out.append((f"{label}, round {i + 1}" if len(runs) > 1 else label, run["metrics"]))
    return out


def _plot_limits(ax: Any, scraped: list[tuple[str, dict[str, Any]]]) -> None:
    """The adaptive limit (and calls in flight, when exported) against seconds since process start; the upstream's
    mean latency per scrape interval on a second axis; each run's first and last reply marked."""
    shown = False
    latency = ax.twinx()
    for i, (label, m) in enumerate(scraped):
        colour = f"C{i % 10}"
        if m.get("concurrency_limit"):
            t, v = zip(*m["concurrency_limit"], strict=True)
            ax.step(t, v, where="post", color=colour, label=f"limit: {label}")
            shown = True
        for name, series in m.get("in_flight", {}).items():
            t, v = zip(*series, strict=True)
            ax.plot(t, v, ":", color=colour, lw=1, label=f"{name}: {label}")
        if m.get("upstream_mean_latency_ms"):
            t, v, _ = zip(*m["upstream_mean_latency_ms"], strict=True)
            latency.plot(t, v, "--", color=colour, lw=0.8, alpha=0.6)
        for edge in (m.get("first_reply_s"), m.get("last_reply_s")):
            if edge is not None:
                ax.axvline(edge, color=colour, lw=0.5, alpha=0.4)
    latency.set_ylabel("upstream mean latency per scrape (ms, dashed)", fontsize=8)
    ax.set_xlabel("seconds since the worker process started (thin lines: first and last reply)")
    ax.set_ylabel("upstream concurrency limit")
    if shown:
        ax.legend(loc="upper left", fontsize=7)
    else:
        notes = [textwrap.fill(n, 70) for n in sorted({m["note"] for _, m in scraped if m.get("note")})]
        ax.text(
            0.5,
            0.5,
            "\n".join(notes) or "no limit series",
            ha="center",
            va="center",
            transform=ax.transAxes,
            fontsize=8,
            wrap=True,
        )


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
    scraped = _scraped(result) if "rows" not in result else []
    if scraped:
        fig, (ax, limits_ax) = plt.subplots(2, 1, figsize=(11, 8.5), gridspec_kw={"height_ratios": [1, 1]})
        _plot_limits(limits_ax, scraped)
    else:
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
        rates = [r["texts_per_s"] or 0.0 for r in runs]
        wholes = [r.get("whole_run_per_s") or 0.0 for r in runs]
        at = np.arange(len(runs))
        ax.barh(at - 0.2, rates, height=0.4, color="steelblue", label="steady state (first reply to last)")
        ax.barh(at + 0.2, wholes, height=0.4, color="lightsteelblue", label="whole run (process start to last reply)")
        ax.set_yticks(at, [r["label"] for r in runs], fontsize=8)
        for i, (r, rate) in enumerate(zip(runs, rates, strict=True)):
            start = f", first reply {r['startup_s']:.2f} s" if r.get("startup_s") is not None else ""
            ax.text(rate, i - 0.2, f" {rate:.0f}/s{start}", va="center", fontsize=7)
        ax.set_xlabel("texts per second (median round)")
        ax.invert_yaxis()
        ax.legend(loc="lower right", fontsize=7)
        headline = [
            f"{k} {v['median']:.2f}x" for k, v in result["ratios"].items() if not k.startswith(("CPU", "whole"))
        ]
        ax.set_title(textwrap.fill(name + ": " + "; ".join(headline[:4]), 120), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0))


def main(names: list[str], config: BenchConfig, out_dir: Path, plot: bool) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    asyncio.run(run(names, config, out_dir, plot))
