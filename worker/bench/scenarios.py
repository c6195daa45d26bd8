"""Benchmark scenarios: each starts what it needs (emulator, worker processes, reference workers) on
a fresh vhost, drives load from this process, and returns figures. Ratios are taken against
references measured in the same run, because the machine is shared and noisy.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import shutil
import statistics
import subprocess
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import numpy as np
import orjson

from worker.amqp.connection import declare_once
from worker.bench.load import Driver
from worker.bench.procs import ManagedProcess

SMALL = "emulator-embedding-8d"  # the emulator's 8-dimension model: message cost without float cost
FULL = "gemini-embedding-001"
SMALLEST = 128  # the smallest output_dimensionality a real caller can ask of FULL
ECHOES = ("echo", "batch-echo")  # the reference workers: ready-made replies, no upstream


@dataclass
class BenchConfig:
    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    requests: int = 20_000
    batch_size: int = 100
    max_wait_ms: float = 50
    concurrency: int = 4
    rates: list[float] = field(default_factory=lambda: [5, 50, 200, 500, 1000, 2000])
    rate_seconds: float = 3.0
    progress: bool = True
    prefetch: int | None = None  # None: the worker's own default
    repeat: int = 3  # rounds of paired runs; ratios are medians over rounds
    worker_env: dict[str, str] = field(default_factory=dict)  # extra worker settings (--set KEY=VALUE)


class Bench:
    """Owns the emulator process and hands out fresh vhosts."""

    def __init__(self, config: BenchConfig):
        self.config = config
        self.emulator: ManagedProcess | None = None
        self.emulator_url = ""
        self._vhosts = shutil.which("rabbitmqctl") is not None

    async def __aenter__(self) -> Bench:
        self.emulator = ManagedProcess(["-m", "worker", "emulator", "--port", "0"])
        line = await asyncio.to_thread(self.emulator.wait_for_line, "listening on", 30)
        self.emulator_url = line.rsplit(" ", 1)[1].strip()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.emulator is not None:
            self.emulator.stop(5)

    # ------------------------------------------------------------------ plumbing
    def emulator_call(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """GET for ``stats``, POST (with ``body`` or an empty object) for the control endpoints."""
        data = None if path.endswith("/stats") else orjson.dumps(body or {})
        request = urllib.request.Request(self.emulator_url + path, data=data, method="GET" if data is None else "POST")
        with urllib.request.urlopen(request, timeout=10) as response:
            result: dict[str, Any] = orjson.loads(response.read())
            return result

    @property
    def queue_type(self) -> str:
        return self.config.worker_env.get("QUEUE_TYPE", "quorum")

    @contextlib.asynccontextmanager
    async def vhost(self) -> AsyncIterator[str]:
        if not self._vhosts:
            yield self.config.amqp_url  # no rabbitmqctl here: share the given vhost
            return
        name = f"bench-{uuid.uuid4().hex[:8]}"
        await asyncio.to_thread(_ctl, ["add_vhost", name])
        user = urlsplit(self.config.amqp_url).username or "guest"
        await asyncio.to_thread(_ctl, ["set_permissions", "-p", name, user, ".*", ".*", ".*"])
        try:
            parts = urlsplit(self.config.amqp_url)
            yield urlunsplit(parts._replace(path="/" + quote(name, safe="")))
        finally:
            await asyncio.to_thread(_ctl, ["delete_vhost", name])

    def start(self, target: str, url: str, **settings: Any) -> ManagedProcess:
        c = self.config
        if target in ECHOES:
            module = "worker.bench.echo" if target == "echo" else "worker.bench.batch_echo"
            return ManagedProcess(["-m", module, url, str(c.batch_size * (c.concurrency + 1))])
        if target == "naive":
            return ManagedProcess(["-m", "worker.bench.naive", url, self.emulator_url])
        env = {
            "AMQP_URL": url,
            "GEMINI_API_KEY": "bench",
            "GEMINI_BASE_URL": self.emulator_url,
            "ALLOWED_MODELS": orjson.dumps([SMALL]).decode(),
            "BATCH_MAX_SIZE": str(c.batch_size),
            "BATCH_MAX_WAIT_MS": str(c.max_wait_ms),
            "MAX_CONCURRENT_BATCHES": str(c.concurrency),
            "LOG_LEVEL": "INFO",
            "BREAKER_FAILURES": "0",
        }
        if c.prefetch:
            env["PREFETCH_COUNT"] = str(c.prefetch)
        env.update(c.worker_env)
        env.update({k.upper(): str(v) for k, v in settings.items()})
        return ManagedProcess(["-m", "worker", "run"], env)

    def _progress(self, total: int, desc: str) -> Any:
        if not self.config.progress:
            return None
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit="req", leave=False)

    # ------------------------------------------------------------------ drain
    async def drain(
        self,
        target: str,
        *,
        n: int,
        model: str = SMALL,
        dims: int | None = None,
        processes: int = 1,
        latency_ms: float = 0,
        label: str | None = None,
        reply_encoding: str = "json",
        texts: Callable[[int], str] | None = None,
        bodies: Callable[[int], tuple[bytes, str]] | None = None,
        before: Callable[[], None] | None = None,
        keep_calls: bool = False,
        **settings: Any,
    ) -> dict[str, Any]:
        """Pre-load ``n`` one-input requests, start the target, time until every reply is in. The i-th request
        is the text ``texts(i)``, or the ready-made body of ``bodies(i)`` (with its vector's seed); ``before`` runs
        first (e.g. to empty a cache); ``keep_calls`` adds the emulator's per-call times and sizes."""
        if before is not None:
            before()
        self.emulator_call("/_emulator/reset")
        self.emulator_call("/_emulator/config", {"latency_ms": latency_ms})
        async with self.vhost() as url:
            await declare_once(url, self.queue_type)  # the worker's own topology, declared before the load
            async with Driver(url, reply_encoding=reply_encoding) as driver:
                bar = self._progress(n, f"{label or target}: publish")
                for i in range(n):
                    if bodies is not None:
                        await driver.send_body(*bodies(i))
                    else:
                        text = texts(i) if texts is not None else f"{target} drain {i}"
                        await driver.send(text, model=model, dims=dims)
                    if bar is not None and i % 500 == 0:
                        bar.update(min(500, n - i))
                if bar is not None:
                    bar.close()
                bar = self._progress(n, f"{label or target}: drain")
                driver.on_reply = (lambda: bar.update(1)) if bar is not None else None
                procs = [self.start(target, url, **settings) for _ in range(processes)]
                try:
                    await asyncio.gather(*(asyncio.to_thread(p.wait_for_line, "ready:", 60) for p in procs))
                    cpu_at_ready = [p.cpu_seconds() or 0.0 for p in procs]  # start-up (imports) excluded
                    await driver.wait_for(n, timeout=max(120.0, n / 50))
                    cpu = sum((p.cpu_seconds() or 0.0) - c for p, c in zip(procs, cpu_at_ready, strict=True))
                    # The clock starts when the first process said it consumes (it prints that right after
                    # basic.consume), or at the first reply if our reader thread saw the line late.
                    started = min([p.line_time("ready:") for p in procs] + [min(driver.received.values())])
                    finished = max(driver.received.values())
                    rss = [p.peak_rss_mb() or 0.0 for p in procs]
                    # Settled a moment after the last reply is out (the acks follow it); then what is kept.
                    await asyncio.sleep(1.0)
                    rss_after = [p.rss_mb() or 0.0 for p in procs]
                finally:
                    for p in procs:
                        p.stop(10)
                    if bar is not None:
                        bar.close()
                checked = driver.check_sample(model=model, dims=dims, echo=target in ECHOES)
        stats = self.emulator_call("/_emulator/stats")
        seconds = finished - started
        calls = {"call_times": stats["call_times"], "call_bytes": stats["call_bytes"]} if keep_calls else {}
        return {
            "label": label or target,
            "target": target,
            "processes": processes,
            "requests": n,
            "dimensions": dims or _full(model),
            "emulator_latency_ms": latency_ms,
            "seconds": round(seconds, 3),
            "requests_per_s": round(n / seconds, 1),
            "texts_per_s": round(n / seconds, 1),
            "upstream_calls": stats["calls"],
            "upstream_texts": stats["texts"],
            "mean_batch": round(stats["texts"] / stats["calls"], 2) if stats["calls"] else None,
            "peak_rss_mb": round(max(rss), 1),
            "rss_after_drain_mb": round(max(rss_after), 1),
            # CPU the target's processes spent per request: less sensitive to a noisy neighbour than rates.
            "cpu_us_per_request": round(cpu / n * 1e6, 1),
            "replies_checked": checked,
            **calls,
        }

    # ------------------------------------------------------------------ open-loop latency
    async def latency(self, target: str = "worker", *, rates: list[float] | None = None) -> list[dict[str, Any]]:
        """Open-loop arrivals at each rate; reply latency percentiles and mean batch per rate."""
        c = self.config
        self.emulator_call("/_emulator/reset")
        rows = []
        async with self.vhost() as url:
            if target == "echo":  # the echo worker declares nothing: give it the worker's topology
                await declare_once(url, self.queue_type)
            proc = self.start(target, url)
            try:
                await asyncio.to_thread(proc.wait_for_line, "ready:", 60)
                async with Driver(url, sample_every=10) as driver:
                    for rate in rates or c.rates:
                        rows.append(await self._one_rate(driver, rate))
                    driver.check_sample(model=SMALL, dims=None, echo=target == "echo")
            finally:
                proc.stop(10)
        return rows

    async def _one_rate(self, driver: Driver, rate: float) -> dict[str, Any]:
        c = self.config
        count = max(20, int(rate * c.rate_seconds))
        self.emulator_call("/_emulator/stats/reset")
        before = set(driver.sent)
        await driver.open_loop(rate, count, model=SMALL, dims=None, prefix=f"rate {rate}")
        await driver.wait_for(len(driver.sent), timeout=60)
        stats = self.emulator_call("/_emulator/stats")
        lat = driver.latencies_ms([cid for cid in driver.sent if cid not in before])
        mean_batch = stats["texts"] / stats["calls"] if stats["calls"] else 0.0
        return {
            "rate_per_s": rate,
            "requests": count,
            "p50_ms": round(float(np.percentile(lat, 50)), 2),
            "p95_ms": round(float(np.percentile(lat, 95)), 2),
            "p99_ms": round(float(np.percentile(lat, 99)), 2),
            "mean_batch": round(mean_batch, 2),
            "batch_fill": round(mean_batch / c.batch_size, 3),
        }


def _ctl(args: list[str]) -> None:
    # RABBITMQCTL: the CLI of the broker under test, as a command prefix (as in tests/conftest.py).
    command = shlex.split(os.environ.get("RABBITMQCTL", "")) or ["rabbitmqctl"]
    subprocess.run([*command, "-q", *args], check=True, capture_output=True, timeout=60)


def _full(model: str) -> int:
    from worker import limits

    return limits.full_dimensions(model)


# ---------------------------------------------------------------------- scenarios
Scenario = Callable[[Bench], Any]


@dataclass(frozen=True)
class RunSpec:
    label: str
    target: str
    options: dict[str, Any] = field(default_factory=dict)


async def _rounds(bench: Bench, specs: list[RunSpec]) -> dict[str, list[dict[str, Any]]]:
    """Every spec once per round, in turn (A B C A B C ...), so drift in the machine's speed hits all alike."""
    results: dict[str, list[dict[str, Any]]] = {spec.label: [] for spec in specs}
    for _ in range(bench.config.repeat):
        for spec in specs:
            results[spec.label].append(await bench.drain(spec.target, label=spec.label, **spec.options))
    return results


def _ratio(results: dict[str, list[dict[str, Any]]], a: str, b: str, key: str = "texts_per_s") -> dict[str, float]:
    """Pairwise ratios a/b over the rounds: median, min and max."""
    return _spread([float(x[key]) / float(y[key]) for x, y in zip(results[a], results[b], strict=True)])


def _spread(values: list[float], digits: int = 3) -> dict[str, float]:
    return {
        "median": round(statistics.median(values), digits),
        "min": round(min(values), digits),
        "max": round(max(values), digits),
    }


def _summary(results: dict[str, list[dict[str, Any]]], ratios: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """The median run of each spec for the table, every run for the record, and each spec's CPU per request
    over the rounds (the median run by rate need not be the median by CPU)."""
    median_runs = [sorted(runs, key=lambda r: r["texts_per_s"])[len(runs) // 2] for runs in results.values()]
    cpu = {label: _spread([r["cpu_us_per_request"] for r in runs], 1) for label, runs in results.items()}
    return {"runs": median_runs, "all_runs": results, "ratios": ratios, "cpu_us_per_request": cpu, **extra}


def _against(
    results: dict[str, list[dict[str, Any]]], name: str, run: str, refs: dict[str, str], suffix: str = ""
) -> dict[str, dict[str, float]]:
    """``run`` against each reference run beside it (``refs``: reference name -> its spec's label), as rate
    ratios ("{name} / {ref}{suffix}") and CPU-per-request ratios ("CPU per request, {name} / {ref}{suffix}")."""
    rates = {f"{name} / {ref}{suffix}": _ratio(results, run, label) for ref, label in refs.items()}
    cpu = {
        f"CPU per request, {name} / {ref}{suffix}": _ratio(results, run, label, key="cpu_us_per_request")
        for ref, label in refs.items()
    }
    return {**rates, **cpu}


async def scenario_drain(bench: Bench) -> dict[str, Any]:
    """A pre-loaded queue at 128 dims of gemini-embedding-001, the smallest size a real caller can ask for,
    against both references; with the upstream answering at once and after 100 ms. (The emulator's 8-dimension
    model is measured in ``baseline``.)"""
    n = bench.config.requests
    common = {"n": n, "model": FULL, "dims": SMALLEST}
    echo, batch_echo, worker = f"echo {SMALLEST}d", f"batch-echo {SMALLEST}d", f"worker {SMALLEST}d"
    slow = f"worker {SMALLEST}d, upstream 100 ms"
    results = await _rounds(
        bench,
        [
            RunSpec(echo, "echo", common),
            RunSpec(batch_echo, "batch-echo", common),
            RunSpec(worker, "worker", common),
            RunSpec(slow, "worker", {**common, "latency_ms": 100}),
        ],
    )
    refs = {"echo": echo, "batch-echo": batch_echo}
    return _summary(
        results,
        {
            **_against(results, "worker", worker, refs),
            **_against(results, "worker (100 ms upstream)", slow, refs),
            **_against(results, "batch-echo", batch_echo, {"echo": echo}),
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
    results = await _rounds(bench, specs)
    for dims in (768, 3072):
        refs = {"echo": f"echo {dims}d", "batch-echo": f"batch-echo {dims}d"}
        ratios.update(_against(results, "worker", f"worker {dims}d", refs, f" at {dims}d"))
        ratios.update(
            _against(results, "worker float32 replies", f"worker {dims}d, float32 replies", refs, f" (JSON) at {dims}d")
        )
        ratios.update(_against(results, "batch-echo", f"batch-echo {dims}d", {"echo": refs["echo"]}, f" at {dims}d"))
    return _summary(results, ratios)


async def scenario_upstream_bound(bench: Bench) -> dict[str, Any]:
    c = bench.config
    n = max(c.batch_size * c.concurrency * 4, c.requests // 4)
    results = await _rounds(
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
        return _spread(
            [w["texts_per_s"] / min(ideal, e["texts_per_s"]) for w, e in zip(worker, results[ref], strict=True)]
        )

    return _summary(
        results,
        {
            "worker / min(ideal, echo)": fraction_of("echo 8d"),
            "worker / min(ideal, batch-echo)": fraction_of("batch-echo 8d"),
            "batch fill (mean texts per call / BATCH_MAX_SIZE)": _spread(
                [w["mean_batch"] / c.batch_size for w in worker]
            ),
        },
        ideal_texts_per_s=round(ideal, 1),
    )


async def scenario_scale(bench: Bench) -> dict[str, Any]:
    n = bench.config.requests
    results = await _rounds(bench, [RunSpec(f"worker x{k}", "worker", {"n": n, "processes": k}) for k in (1, 2, 4)])
    return _summary(results, {f"x{k} / x1": _ratio(results, f"worker x{k}", "worker x1") for k in (2, 4)})


async def scenario_baseline(bench: Bench) -> dict[str, Any]:
    """The emulator's 8-dimension model (message cost without float cost): references, naive, worker."""
    n = max(100, bench.config.requests // 4)
    naive = "naive 8d (1 call/message)"
    results = await _rounds(
        bench,
        [
            RunSpec("echo 8d", "echo", {"n": n}),
            RunSpec("batch-echo 8d", "batch-echo", {"n": n}),
            RunSpec(naive, "naive", {"n": n}),
            RunSpec("worker 8d", "worker", {"n": n}),
        ],
    )
    refs = {"echo": "echo 8d", "batch-echo": "batch-echo 8d"}
    return _summary(
        results,
        {
            "naive / echo": _ratio(results, naive, "echo 8d"),
            "naive / batch-echo": _ratio(results, naive, "batch-echo 8d"),
            **_against(results, "worker", "worker 8d", refs),
            "worker / naive (batching speed-up)": _ratio(results, "worker 8d", naive),
            **_against(results, "batch-echo", "batch-echo 8d", {"echo": "echo 8d"}),
        },
    )


async def scenario_memory(bench: Bench) -> dict[str, Any]:
    n = max(bench.config.requests, 1000)
    small, big = f"worker, {max(100, n // 10)} backlog", f"worker, {n} backlog"
    results = await _rounds(
        bench,
        [
            RunSpec(small, "worker", {"n": max(100, n // 10)}),
            RunSpec(big, "worker", {"n": n}),
        ],
    )
    return _summary(results, {"peak RSS big / small backlog": _ratio(results, big, small, key="peak_rss_mb")})


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


async def scenario_frugality(bench: Bench) -> dict[str, Any]:
    from worker.bench.quota import scenario_frugality as run  # worker/bench/quota.py builds on this module

    return await run(bench)


async def scenario_images(bench: Bench) -> dict[str, Any]:
    from worker.bench.quota import scenario_images as run

    return await run(bench)


async def scenario_image_flood(bench: Bench) -> dict[str, Any]:
    from worker.bench.quota import scenario_image_flood as run

    return await run(bench)


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
}
