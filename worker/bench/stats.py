"""Figures over the rounds of a scenario: pairwise ratios, medians with min-max, the summary every scenario returns.

Plain arithmetic on the runs' dicts (what ``Bench.drain`` returns), shared by every scenario module; it imports
nothing of the bench, so any of them may import it.
"""

from __future__ import annotations

import statistics
from typing import Any

Results = dict[str, list[dict[str, Any]]]  # a spec's label -> its run in each round, in round order


def ratio(results: Results, a: str, b: str, key: str = "texts_per_s") -> dict[str, float]:
    """Pairwise ratios a/b over the rounds: median, min and max."""
    return spread([float(x[key]) / float(y[key]) for x, y in zip(results[a], results[b], strict=True)])


def spread(values: list[float], digits: int = 3) -> dict[str, float]:
    return {
        "median": round(statistics.median(values), digits),
        "min": round(min(values), digits),
        "max": round(max(values), digits),
    }


def summary(results: Results, ratios: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """The median run of each spec for the table, every run for the record, and over the rounds each spec's CPU
    per request, start-up time (process start to first reply) and peak RSS (the median run by rate need not be
    the median by the others)."""
    median_runs = [sorted(runs, key=lambda r: r["texts_per_s"] or 0.0)[len(runs) // 2] for runs in results.values()]
    return {
        "runs": median_runs,
        "all_runs": results,
        "ratios": ratios,
        "cpu_us_per_request": over_rounds(results, "cpu_us_per_request", 1),
        "startup_s": over_rounds(results, "startup_s", 3),
        "peak_rss_mb": over_rounds(results, "peak_rss_mb", 1),
        **extra,
    }


def over_rounds(results: Results, key: str, digits: int) -> dict[str, dict[str, float]]:
    """Each spec's ``key`` over its rounds (median, min, max), for the specs that have it in every round."""
    return {
        label: spread([float(r[key]) for r in runs], digits)
        for label, runs in results.items()
        if runs and all(r.get(key) is not None for r in runs)
    }


def against(
    results: Results, name: str, run: str, refs: dict[str, str], suffix: str = "", *, whole: bool = False
) -> dict[str, dict[str, float]]:
    """``run`` against each reference run beside it (``refs``: reference name -> its spec's label), each ratio taken
    within a round: steady-state rate ratios ("{name} / {ref}{suffix}", first reply to last), with ``whole`` the
    whole run's too ("whole run, {name} / {ref}{suffix}", process start to last reply), and CPU-per-request ratios
    ("CPU per request, {name} / {ref}{suffix}")."""
    rates = {f"{name} / {ref}{suffix}": ratio(results, run, label) for ref, label in refs.items()}
    runs = (
        {
            f"whole run, {name} / {ref}{suffix}": ratio(results, run, label, "whole_run_per_s")
            for ref, label in refs.items()
        }
        if whole
        else {}
    )
    cpu = {
        f"CPU per request, {name} / {ref}{suffix}": ratio(results, run, label, key="cpu_us_per_request")
        for ref, label in refs.items()
    }
    return {**rates, **runs, **cpu}
