"""Scenarios about spending the upstream quota well, and about big inputs.

``frugality``: a drain where half the requests repeat earlier texts, with the embedding cache off and on
(upstream texts sent, what was saved, throughput); then two worker processes under one rate limit, per process
and for the fleet, counting the calls in every sliding window against the limit.

``images``: gemini-embedding-2 requests carrying 200-500 KB images, with texts among them, drained within
the default request budget (UPSTREAM_MAX_REQUEST_BYTES, 4 MiB): calls, bytes per call, inputs per second.
"""

from __future__ import annotations

import base64
import bisect
import os
import random
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from worker import inputs
from worker.bench import stats
from worker.bench.harness import FULL, SMALLEST, Bench, RunSpec, rounds
from worker.vectors import seed_of

# A Redis database of its own, emptied before each run that uses it, so every run starts with a cold cache and
# an empty rate-limit log.
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/7")
G2 = "gemini-embedding-2"

# The fleet part shrinks Gemini's one-minute window to a few seconds so that a run takes seconds, not minutes;
# the limiter works the same for any window (UPSTREAM_WINDOW_S exists for this). One text per call, so that calls,
# not texts, are what runs out.
WINDOW_S = 2.0
LIMIT = 10  # calls per window, for the fleet (scope fleet) or for each process (scope process)
# Calls are timed where they arrive, at the emulator, while the limiter admits them on its clock: the two differ by
# the time a call takes to get from one to the other, so windows are counted this much shorter than WINDOW_S.
# Measured: a few milliseconds on a warm connection, up to 0.13 s for a process's first calls, which open their
# connections all at once (up to the adaptive limit's ceiling of 32; with the old fixed 4, under 0.05 s).
JITTER_S = 0.15


def _flush_redis() -> None:
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.flushdb()
    finally:
        client.close()


async def scenario_frugality(bench: Bench) -> dict[str, Any]:
    n = max(200, bench.config.requests // 2)
    rng = random.Random(7)
    texts: list[str] = []
    for i in range(n):  # every other request repeats a text sent before it (RAG traffic repeats queries)
        texts.append(texts[rng.randrange(i)] if i % 2 else f"frugal text {i}")
    common = {"n": n, "model": FULL, "dims": SMALLEST, "texts": texts.__getitem__}
    off, on = "cache off (in-call dedup only)", "cache on"
    results = await rounds(
        bench,
        [
            RunSpec(off, "worker", common),
            RunSpec(on, "worker", {**common, "before": _flush_redis, "cache_ttl_s": 600, "redis_url": REDIS_URL}),
        ],
    )
    distinct = len(set(texts))
    saved = {
        label: stats.spread([1 - r["upstream_texts"] / n for r in runs]) for label, runs in results.items()
    }  # the share of requests that cost no upstream input
    summary = stats.summary(
        results,
        {"throughput, cache on / off": stats.ratio(results, on, off)},
        requests=n,
        distinct_texts=distinct,
        saved_share=saved,
        upstream_texts={label: [r["upstream_texts"] for r in runs] for label, runs in results.items()},
    )
    summary["windows"] = await _fleet(bench)
    return summary


async def _fleet(bench: Bench) -> dict[str, Any]:
    """Two worker processes, one limit: per process (each may spend LIMIT) and for the fleet (LIMIT in all)."""
    n = LIMIT * 4
    out: dict[str, Any] = {"limit": LIMIT, "window_s": WINDOW_S, "jitter_s": JITTER_S, "requests": n, "runs": {}}
    for scope in ("process", "fleet"):
        run = await bench.drain(
            "worker",
            n=n,
            model=FULL,
            dims=SMALLEST,
            processes=2,
            label=f"2 workers, UPSTREAM_LIMIT_SCOPE={scope}",
            before=_flush_redis,
            keep_calls=True,
            batch_max_size=1,
            batch_max_wait_ms=5,
            upstream_limit_scope=scope,
            upstream_rpm=LIMIT,
            upstream_window_s=WINDOW_S,
            redis_url=REDIS_URL,
        )
        times = sorted(run.pop("call_times"))
        run.pop("call_bytes")
        out["runs"][scope] = {
            **run,
            "max_calls_in_a_window": _max_in_window(times, WINDOW_S - JITTER_S),
            "call_times": [round(t - times[0], 4) for t in times],
        }
    return out


def _max_in_window(times: list[float], window: float) -> int:
    """The most calls in any window [t, t + window) (sorted times)."""
    return max((bisect.bisect_left(times, t + window) - i for i, t in enumerate(times)), default=0)


def png(seed: int, size: int) -> bytes:
    """A PNG-shaped blob of ``size`` bytes: a real signature and IHDR (the worker reads the image size from it for
    its token estimate), then random bytes."""
    ihdr = struct.pack(">IIBBBBB", 1024, 768, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    head = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))
    return head + np.random.default_rng(seed).integers(0, 256, size - len(head), dtype=np.uint8).tobytes()


async def scenario_images(bench: Bench) -> dict[str, Any]:
    n = max(40, bench.config.requests // 50)
    rng = random.Random(11)
    sizes = [rng.randrange(200_000, 500_001) for _ in range(n)]

    def body(i: int) -> tuple[bytes, str]:
        if i % 4 == 3:  # a text among the images
            text = f"caption {i}"
            return orjson.dumps({"model": G2, "texts": [text]}), text
        data = png(i, sizes[i])
        part = {"inline_data": {"mime_type": "image/png", "data": base64.b64encode(data).decode()}}
        item = inputs.Content((inputs.Part(mime_type="image/png", data=data),))
        return orjson.dumps({"model": G2, "inputs": [{"parts": [part]}]}), seed_of(inputs.seed_parts(item))

    label = "worker, images 200-500 KB and texts"
    spec = RunSpec(label, "worker", {"n": n, "model": G2, "bodies": body, "keep_calls": True})
    results = await rounds(bench, [spec])
    budget = 4_194_304  # UPSTREAM_MAX_REQUEST_BYTES' default, the smallest payload limit reported for the API
    per_call = [max(r["call_bytes"]) for r in results[label]]
    mean_call = [float(np.mean(r["call_bytes"])) for r in results[label]]
    for runs in results.values():
        for r in runs:
            r["max_call_bytes"], r["mean_call_bytes"] = max(r["call_bytes"]), round(float(np.mean(r["call_bytes"])))
            del r["call_bytes"], r["call_times"]
    return stats.summary(
        results,
        {"mean bytes per call / budget": stats.spread([m / budget for m in mean_call])},
        requests=n,
        image_bytes={"min": min(sizes), "max": max(sizes), "mean": round(float(np.mean(sizes)))},
        budget_bytes=budget,
        max_call_bytes=max(per_call),
        mean_call_bytes=stats.spread(mean_call, 0),
    )


async def scenario_image_flood(bench: Bench) -> dict[str, Any]:
    """Large requests held at once: 60 (then 200) gemini-embedding-2 requests of six 475 KB images each (3.8 MB of
    base64), queued before the worker starts, upstream 1.5 s a call. The worker with its defaults against the
    same worker with the byte budget out of the way (MAX_HELD_BYTES of 8 GiB: only the 900-message window binds,
    as before the budget existed). Peak RSS and RSS once drained."""
    images = [png(i, 475_000) for i in range(6)]
    parts = [{"inline_data": {"mime_type": "image/png", "data": base64.b64encode(d).decode()}} for d in images]

    def body(i: int) -> tuple[bytes, str]:
        # One input of six images and a caption that makes it distinct, so no two requests share a vector.
        caption = {"text": f"flood {i}"}
        item = inputs.Content(
            (*(inputs.Part(mime_type="image/png", data=d) for d in images), inputs.Part(text=f"flood {i}"))
        )
        return orjson.dumps({"model": G2, "inputs": [{"parts": [*parts, caption]}]}), seed_of(inputs.seed_parts(item))

    # The figures at full size; a smoke run (few --requests) keeps the shape, small and quick.
    full = bench.config.requests >= 1000
    sizes, latency = ((60, 200), 1500) if full else ((8,), 100)
    specs = []
    for n in sizes:
        common = {"n": n, "model": G2, "bodies": body, "latency_ms": latency}
        specs += [
            RunSpec(f"worker, {n} image requests, defaults", "worker", common),
            RunSpec(f"worker, {n} image requests, no byte budget", "worker", {**common, "max_held_bytes": 8 << 30}),
        ]
    results = await rounds(bench, specs)
    return stats.summary(
        results,
        {
            f"peak RSS, defaults / no byte budget, {n}": stats.ratio(
                results,
                f"worker, {n} image requests, defaults",
                f"worker, {n} image requests, no byte budget",
                "peak_rss_mb",
            )
            for n in sizes
        },
        body_bytes=len(body(0)[0]),
    )


def plot_windows(result: dict[str, Any], path: Path) -> None:
    """Calls in the sliding window ending at each moment, per scope, against the limit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    windows = result["windows"]
    window = windows["window_s"] - windows["jitter_s"]  # as the maximum is counted (see JITTER_S)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for scope, run in windows["runs"].items():
        times = run["call_times"]
        grid = np.arange(0.0, (times[-1] if times else 0.0) + window, 0.02)
        counts = [bisect.bisect_right(times, t) - bisect.bisect_right(times, t - window) for t in grid]
        ax.plot(grid, counts, label=f"2 workers, scope {scope} (max {run['max_calls_in_a_window']})")
    ax.axhline(windows["limit"], color="red", linestyle="--", label=f"UPSTREAM_RPM = {windows['limit']} per window")
    ax.set_xlabel("seconds since the first call")
    ax.set_ylabel(f"upstream calls in the last {window:g} s (window {windows['window_s']:g} s)")
    saved = result["saved_share"]
    ax.set_title(  # the share of requests answered without an input of their own in any call
        "frugality: "
        + ", ".join(f"{k}: {v['median']:.0%} of requests cost nothing upstream" for k, v in saved.items()),
        fontsize=8,
    )
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
