"""``gateway``: what the HTTP hop costs. Single-text requests at concurrency ``CONCURRENCY``, through the gateway
(``POST /v1/embeddings``, JSON floats) against the same through ``EmbedClient`` directly, one worker process, the
emulator's 8-dimension model (message cost, not float cost), upstream answering at once.

One worker and one gateway process serve every round; each round runs the direct caller, then the gateway, each
sending ``n`` requests from ``CONCURRENCY`` loops that each await their own answer (a closed loop: throughput is what
the path sustains at that concurrency). Figures per round: requests/s, latency percentiles, the gateway's CPU per
request; over the rounds, medians with min-max of the throughput ratio (gateway / direct), the overhead per request
(p50 and mean latency, gateway minus direct) and the gateway's peak RSS. Every answer's vector is checked.

The HTTP caller is aiohttp rather than the openai SDK: the SDK's own per-request cost (pydantic models, httpx) is the
caller's, not the gateway's, and would share the machine's two cores with what is measured.

Standalone (a smoke run): ``python -m worker.bench.gateway [--requests N] [--repeat R]``.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import orjson

from worker import limits
from worker.bench import stats
from worker.bench.harness import SMALL, Bench, BenchConfig
from worker.client import EmbedClient
from worker.processes import ManagedProcess
from worker.vectors import expected_vector

CONCURRENCY = 64
KEY = "bench-gateway-key"
DIRECT = "EmbedClient directly"
THROUGH = "through the gateway"


def _requests(bench: Bench) -> int:
    return max(CONCURRENCY * 4, bench.config.requests // 4)


async def _closed_loop(n: int, call: Any) -> dict[str, Any]:
    """``n`` calls from CONCURRENCY loops; the wall time and each call's latency."""
    latencies: list[float] = []
    counter = iter(range(n))

    async def loop() -> None:
        for i in counter:
            started = time.perf_counter()
            await call(i)
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(loop() for _ in range(CONCURRENCY)))
    seconds = time.perf_counter() - started
    ms = np.asarray(latencies) * 1000
    return {
        "requests": n,
        "seconds": round(seconds, 3),
        "requests_per_s": round(n / seconds, 1),
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
        "mean_ms": round(float(ms.mean()), 2),
    }


def _check(text: str, vector: Any) -> None:
    want = expected_vector(text, model=SMALL, task_type=None, dims=None, full_dims=limits.full_dimensions(SMALL))
    if not np.allclose(np.asarray(vector, dtype=np.float32), want, atol=1e-6):
        raise AssertionError(f"wrong vector for {text!r}")


async def _direct(url: str, n: int, label: str) -> dict[str, Any]:
    async with EmbedClient(url, max_in_flight=CONCURRENCY) as client:

        async def call(i: int) -> None:
            text = f"{label} {i}"
            _check(text, (await client.embed([text], model=SMALL))[0])

        return await _closed_loop(n, call)


async def _through(port: int, n: int, label: str) -> dict[str, Any]:
    url = f"http://127.0.0.1:{port}/v1/embeddings"
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def call(i: int) -> None:
            text = f"{label} {i}"
            body = orjson.dumps({"model": SMALL, "input": text, "encoding_format": "float"})
            async with session.post(url, data=body, headers=headers) as response:
                answer = orjson.loads(await response.read())
                if response.status != 200:
                    raise AssertionError(f"gateway answered {response.status}: {answer}")
            _check(text, answer["data"][0]["embedding"])

        return await _closed_loop(n, call)


def _gateway_process(url: str) -> tuple[ManagedProcess, int]:
    env = {
        "AMQP_URL": url,
        "GATEWAY_API_KEYS": KEY,
        "ALLOWED_MODELS": orjson.dumps([SMALL]).decode(),
        "GATEWAY_MAX_IN_FLIGHT": str(CONCURRENCY * 4),
        "LOG_LEVEL": "INFO",
    }
    process = ManagedProcess(["-m", "worker.gateway", "--host", "127.0.0.1", "--port", "0"], env)
    line = process.wait_for_line("ready: gateway on", 60)
    return process, int(line.split("http://", 1)[1].split()[0].rsplit(":", 1)[1])


async def scenario_gateway(bench: Bench) -> dict[str, Any]:
    n = _requests(bench)
    bench.emulator_call("/_emulator/reset")
    results: dict[str, list[dict[str, Any]]] = {DIRECT: [], THROUGH: []}
    async with bench.vhost() as url:
        worker = bench.start("worker", url)
        gateway: ManagedProcess | None = None
        try:
            await asyncio.to_thread(worker.wait_for_line, "ready:", 60)
            process, port = await asyncio.to_thread(_gateway_process, url)
            gateway = process
            await _direct(url, CONCURRENCY, "warm-up direct")  # connections, caches and code paths warm on both
            await _through(port, CONCURRENCY, "warm-up gateway")
            for round_ in range(bench.config.repeat):
                results[DIRECT].append(await _direct(url, n, f"direct r{round_}"))
                cpu = process.cpu_seconds() or 0.0
                run = await _through(port, n, f"gateway r{round_}")
                run["gateway_cpu_us_per_request"] = round(((process.cpu_seconds() or 0.0) - cpu) / n * 1e6, 1)
                run["gateway_peak_rss_mb"] = round(process.peak_rss_mb() or 0.0, 1)
                results[THROUGH].append(run)
        finally:
            if gateway is not None:
                gateway.stop(10)
            worker.stop(10)
    pairs = list(zip(results[THROUGH], results[DIRECT], strict=True))
    return {
        "runs": [sorted(runs, key=lambda r: r["requests_per_s"])[len(runs) // 2] for runs in results.values()],
        "all_runs": results,
        "ratios": {"throughput, gateway / direct": stats.ratio(results, THROUGH, DIRECT, "requests_per_s")},
        "overhead_ms_per_request": {
            "p50": stats.spread([g["p50_ms"] - d["p50_ms"] for g, d in pairs], 2),
            "mean": stats.spread([g["mean_ms"] - d["mean_ms"] for g, d in pairs], 2),
        },
        "requests_per_s": {
            label: stats.spread([r["requests_per_s"] for r in runs], 1) for label, runs in results.items()
        },
        "p50_ms": {label: stats.spread([r["p50_ms"] for r in runs], 2) for label, runs in results.items()},
        "gateway_cpu_us_per_request": stats.spread([r["gateway_cpu_us_per_request"] for r in results[THROUGH]], 1),
        "gateway_peak_rss_mb": max(r["gateway_peak_rss_mb"] for r in results[THROUGH]),
        "requests": n,
        "concurrency": CONCURRENCY,
        "model": SMALL,
    }


def table(result: dict[str, Any]) -> str:
    def cell(spread: dict[str, float], digits: int = 1) -> str:
        return f"{spread['median']:.{digits}f} ({spread['min']:.{digits}f}-{spread['max']:.{digits}f})"

    rounds = len(result["all_runs"][DIRECT])
    ratio = result["ratios"]["throughput, gateway / direct"]
    overhead = result["overhead_ms_per_request"]
    lines = [
        f"\n== gateway: {result['requests']} single-text requests at concurrency {result['concurrency']}, "
        f"{result['model']}; medians (min-max) of {rounds} rounds",
        *(
            f"{label:<24} {cell(result['requests_per_s'][label])} req/s, p50 {cell(result['p50_ms'][label], 2)} ms"
            for label in (DIRECT, THROUGH)
        ),
        f"throughput, gateway / direct: {cell(ratio, 2)}x",
        f"overhead per request: p50 +{cell(overhead['p50'], 2)} ms, mean +{cell(overhead['mean'], 2)} ms",
        f"gateway CPU per request {cell(result['gateway_cpu_us_per_request'])} µs, "
        f"peak RSS {result['gateway_peak_rss_mb']} MB",
    ]
    return "\n".join(lines)


async def _main(config: BenchConfig) -> dict[str, Any]:
    async with Bench(config) as bench:
        return await scenario_gateway(bench)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--url", default=BenchConfig.amqp_url)
    parser.add_argument("--requests", type=int, default=2000, help="the scenario sends a quarter, at least 256")
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    figures = asyncio.run(_main(BenchConfig(amqp_url=args.url, requests=args.requests, repeat=args.repeat)))
    print(table(figures))
    print(orjson.dumps({k: v for k, v in figures.items() if k != "all_runs"}, option=orjson.OPT_INDENT_2).decode())


def plot(result: dict[str, Any], path: Path) -> None:
    """Each path's requests/s and p50/p99 per round, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["all_runs"]
    fig, (rate, latency) = plt.subplots(1, 2, figsize=(10, 4))
    for i, (label, rounds) in enumerate(runs.items()):
        xs = [i + 0.25 * (j - 1) for j in range(len(rounds))]
        rate.bar(xs, [r["requests_per_s"] for r in rounds], width=0.22, label=label)
        latency.bar(xs, [r["p50_ms"] for r in rounds], width=0.22, label=f"{label}, p50")
        latency.scatter(xs, [r["p99_ms"] for r in rounds], marker="_", s=200, color="black")
    for ax, title in ((rate, "requests/s per round"), (latency, "p50 per round (bars), p99 (marks), ms")):
        ax.set_xticks(range(len(runs)), list(runs), fontsize=8)
        ax.set_title(title, fontsize=9)
    fig.suptitle(f"gateway: {result['requests']} single-text requests at concurrency {result['concurrency']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
