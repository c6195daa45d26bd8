"""Reads a worker's ``/metrics`` every ~100 ms during a run: the adaptive concurrency limit
(``embed_upstream_concurrency_limit``), every other ``embed_upstream_*`` gauge (calls in flight, when the worker
exports such a gauge), the deliveries held, and the upstream latency histogram's sum and count (so the mean latency
of the calls between two scrapes can be plotted beside the limit).

Times are seconds since the target process was started, the clock every other figure of a run uses. A worker
without the gauge is reported as such (``concurrency_limit`` None and a ``note``); a worker whose endpoint never
answered too. Nothing here raises into the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

LIMIT = "embed_upstream_concurrency_limit"
HELD = "embed_inflight_messages"  # deliveries held (not calls): recorded for context
LATENCY = "embed_upstream_latency_seconds"
KEPT_PREFIX = "embed_upstream_"  # every gauge under it is recorded


def free_port() -> int:
    """A port nobody listens on now, for METRICS_PORT (the worker binds it a moment later)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def parse(text: str) -> tuple[dict[str, float], float, float]:
    """The gauges worth keeping (name -> value, labelled samples summed), and the latency histogram's sum and count."""
    kinds: dict[str, str] = {}
    gauges: dict[str, float] = {}
    latency_sum = latency_count = 0.0
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            parts = line.split()
            if len(parts) >= 4:
                kinds[parts[2]] = parts[3]
            continue
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        name = key.split("{", 1)[0]
        try:
            number = float(value)
        except ValueError:
            continue
        if name == LATENCY + "_sum":
            latency_sum += number
        elif name == LATENCY + "_count":
            latency_count += number
        elif (
            kinds.get(name) == "gauge"
            and (name.startswith(KEPT_PREFIX) or name == HELD)
            and not name.endswith(
                "_created"  # prometheus_client's creation timestamps of counters and histograms, typed as gauges
            )
        ):
            gauges[name] = gauges.get(name, 0.0) + number
    return gauges, latency_sum, latency_count


def in_flight_names(gauges: dict[str, Any]) -> list[str]:
    """The gauges that look like upstream calls in flight (whatever the worker names them)."""
    return [n for n in gauges if n.startswith(KEPT_PREFIX) and ("inflight" in n or "in_flight" in n)]


@dataclass
class Scraper:
    url: str  # http://127.0.0.1:PORT/metrics
    started: float  # perf_counter() when the target process was started
    interval_s: float = 0.1
    gauges: dict[str, list[list[float]]] = field(default_factory=dict)  # name -> [[t, value], ...]
    latency: list[list[float]] = field(default_factory=list)  # [t, cumulative sum s, cumulative count]
    scrapes: int = 0
    failures: int = 0
    last_error: str = ""

    async def run(self, stop: asyncio.Event) -> None:
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=1.0)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            next_at = time.perf_counter()
            while not stop.is_set():
                try:
                    async with session.get(self.url) as response:
                        text = await response.text()
                    self._take(time.perf_counter() - self.started, text)
                except (aiohttp.ClientError, TimeoutError, OSError) as exc:  # not up yet, or gone
                    self.failures += 1
                    self.last_error = f"{type(exc).__name__}: {exc}"
                next_at += self.interval_s
                delay = max(0.0, next_at - time.perf_counter())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)

    def _take(self, t: float, text: str) -> None:
        self.scrapes += 1
        gauges, latency_sum, latency_count = parse(text)
        for name, value in gauges.items():
            self.gauges.setdefault(name, []).append([round(t, 3), value])
        if latency_count:
            self.latency.append([round(t, 3), latency_sum, latency_count])

    def result(self, first_reply_s: float | None, last_reply_s: float | None) -> dict[str, Any]:
        """The series, and the limit's figures over the steady state (first to last reply)."""
        limit = self.gauges.get(LIMIT)
        note = None
        if not self.scrapes:
            note = f"the worker's /metrics never answered ({self.failures} tries; last: {self.last_error})"
        elif limit is None:
            note = f"the worker exports no {LIMIT} ({self.scrapes} scrapes of /metrics): no adaptive limit to show"
        summary = None
        if limit:
            lo, hi = first_reply_s or 0.0, last_reply_s or float("inf")
            steady = [v for t, v in limit if lo <= t <= hi] or [v for _, v in limit]
            summary = {
                "first": limit[0][1],
                "last": limit[-1][1],
                "min": min(v for _, v in limit),
                "max": max(v for _, v in limit),
                "steady_median": statistics.median(steady),
            }
        return {
            "url": self.url,
            "interval_s": self.interval_s,
            "scrapes": self.scrapes,
            "failed_scrapes": self.failures,
            "concurrency_limit": limit,
            "concurrency_limit_summary": summary,
            "in_flight": {name: self.gauges[name] for name in in_flight_names(self.gauges)},
            "gauges": self.gauges,
            "upstream_mean_latency_ms": _window_means(self.latency),
            "first_reply_s": first_reply_s,
            "last_reply_s": last_reply_s,
            "note": note,
        }


def _window_means(points: list[list[float]]) -> list[list[float]]:
    """[t, mean latency in ms of the calls that ended since the scrape before, calls] for each scrape with calls."""
    out = []
    for (_, s0, c0), (t, s1, c1) in itertools.pairwise(points):
        if c1 > c0:
            out.append([t, round((s1 - s0) / (c1 - c0) * 1000, 2), c1 - c0])
    return out
