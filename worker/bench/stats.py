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
    """The median run of each spec for the table, every run for the record, and each spec's CPU per request
    over the rounds (the median run by rate need not be the median by CPU)."""
    median_runs = [sorted(runs, key=lambda r: r["texts_per_s"])[len(runs) // 2] for runs in results.values()]
    cpu = {label: spread([r["cpu_us_per_request"] for r in runs], 1) for label, runs in results.items()}
    return {"runs": median_runs, "all_runs": results, "ratios": ratios, "cpu_us_per_request": cpu, **extra}


def against(
    results: Results, name: str, run: str, refs: dict[str, str], suffix: str = ""
) -> dict[str, dict[str, float]]:
    """``run`` against each reference run beside it (``refs``: reference name -> its spec's label), as rate
    ratios ("{name} / {ref}{suffix}") and CPU-per-request ratios ("CPU per request, {name} / {ref}{suffix}")."""
    rates = {f"{name} / {ref}{suffix}": ratio(results, run, label) for ref, label in refs.items()}
    cpu = {
        f"CPU per request, {name} / {ref}{suffix}": ratio(results, run, label, key="cpu_us_per_request")
        for ref, label in refs.items()
    }
    return {**rates, **cpu}
