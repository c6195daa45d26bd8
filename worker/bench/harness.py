"""The bench's harness: the emulator process, a fresh vhost per run, the target processes, and ``Bench.drain``, the
one measured run every scenario is made of (pre-load a queue, start the target, time the replies, check them).
Ratios are taken against references measured in the same run, because the machine is shared and noisy: ``rounds``
alternates the runs of a scenario, ``worker.bench.stats`` turns them into medians with min-max.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import shutil
import subprocess
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import aio_pika
import numpy as np
import orjson

from worker import topology
from worker.amqp.connection import declare_once
from worker.bench.load import Driver
from worker.bench.scrape import Scraper, free_port
from worker.processes import ManagedProcess

SMALL = "emulator-embedding-8d"  # the emulator's 8-dimension model: message cost without float cost
FULL = "gemini-embedding-001"
SMALLEST = 128  # the smallest output_dimensionality a real caller can ask of FULL
# The reference workers: ready-made replies, no upstream. "echo" settles one message at a time; the two batching
# echoes (worker/bench/batch_echo.py) differ only in aiormq's write queue: "batch-echo" is issue 21's reference
# (widened as the worker widens its own), "batch-echo-aiormq" keeps aiormq's default of 10 frames.
ECHOES = ("echo", "batch-echo", "batch-echo-aiormq")
BATCH_ECHOES = ("batch-echo", "batch-echo-aiormq")


@dataclass(frozen=True)
class Lane:
    """An RPC lane: its queue, and the routing key that reaches it on exchange ``embed.requests``."""

    queue: str
    routing_key: str


DEFAULT_LANE = Lane(topology.QUEUE, topology.ROUTING_KEY)
BULK_LANE = Lane(topology.BULK_QUEUE, topology.BULK_KEY)

# Runs beside a drain from the moment the target is ready: gets the vhost's URL and that moment (perf_counter);
# what it returns joins the run's figures.
Alongside = Callable[[str, float], Coroutine[Any, Any, dict[str, Any]]]


class LaneNotDeclared(RuntimeError):
    """The worker's topology has no queue for a lane the run publishes to."""


def _env(name: str) -> str:
    return os.environ.get(name, "")


def worker_default(name: str) -> Any:
    """A worker setting's default (``worker.settings.Settings``), e.g. ``max_concurrent_batches``."""
    from worker.settings import Settings

    return Settings.model_fields[name].default


@dataclass
class BenchConfig:
    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    requests: int = 20_000
    # None: the worker's own default (what the figures are measured with); a number is passed to the worker.
    batch_size: int | None = None  # BATCH_MAX_SIZE
    max_wait_ms: float | None = None  # BATCH_MAX_WAIT_MS
    concurrency: int | None = None  # MAX_CONCURRENT_BATCHES (with an adaptive limit: its ceiling)
    rates: list[float] = field(default_factory=lambda: [5, 50, 200, 500, 1000, 2000])
    rate_seconds: float = 3.0
    progress: bool = True
    prefetch: int | None = None  # None: the worker's own default
    repeat: int = 3  # rounds of paired runs; ratios are medians over rounds
    worker_env: dict[str, str] = field(default_factory=dict)  # extra worker settings (--set KEY=VALUE)
    # The emulator of the ``adaptive`` scenario's knee run, whose latency rises with the calls in flight: extra
    # command-line arguments of ``embed-worker emulator``, environment, and a body for POST /_emulator/config.
    # Any given: they replace the scenario's own knee (worker.bench.scenarios.KNEE_*). Until the CLI has flags, from the
    # environment: BENCH_KNEE_EMULATOR_ARGS (split like a shell would), BENCH_KNEE_EMULATOR_ENV ("K=V K=V"),
    # BENCH_KNEE_EMULATOR_CONFIG (a JSON object).
    knee_emulator_args: list[str] = field(default_factory=lambda: shlex.split(_env("BENCH_KNEE_EMULATOR_ARGS")))
    knee_emulator_env: dict[str, str] = field(
        default_factory=lambda: dict(item.split("=", 1) for item in shlex.split(_env("BENCH_KNEE_EMULATOR_ENV")))
    )
    knee_emulator_config: dict[str, Any] = field(
        default_factory=lambda: orjson.loads(_env("BENCH_KNEE_EMULATOR_CONFIG") or "{}")
    )
    # Names of the vhosts the bench makes (and deletes) for its runs: PREFIX-<8 hex digits>.
    vhost_prefix: str = field(default_factory=lambda: _env("BENCH_VHOST_PREFIX") or "bench")

    @property
    def batch(self) -> int:
        return self.batch_size or int(worker_default("batch_max_size"))

    @property
    def wait_ms(self) -> float:
        return self.max_wait_ms if self.max_wait_ms is not None else float(worker_default("batch_max_wait_ms"))

    @property
    def slots(self) -> int:
        return self.concurrency or int(worker_default("max_concurrent_batches"))

    @property
    def reference_prefetch(self) -> int:
        """The echo references' prefetch: five batches, as before the worker's default concurrency grew."""
        return self.batch * 5


class Bench:
    """Owns the emulator process and hands out fresh vhosts."""

    def __init__(self, config: BenchConfig):
        self.config = config
        self.emulator: ManagedProcess | None = None
        self.emulator_url = ""
        self._vhosts = shutil.which("rabbitmqctl") is not None or bool(os.environ.get("RABBITMQCTL"))

    async def __aenter__(self) -> Bench:
        self.emulator, self.emulator_url = await _start_emulator([], {})
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.emulator is not None:
            self.emulator.stop(5)

    # ------------------------------------------------------------------ plumbing
    def emulator_call(
        self, path: str, body: dict[str, Any] | None = None, *, base: str | None = None
    ) -> dict[str, Any]:
        """GET for ``stats``, POST (with ``body`` or an empty object) for the control endpoints; of the bench's
        emulator, or of the one at ``base``."""
        data = None if path.endswith("/stats") else orjson.dumps(body or {})
        request = urllib.request.Request(
            (base or self.emulator_url) + path, data=data, method="GET" if data is None else "POST"
        )
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
        name = f"{self.config.vhost_prefix}-{uuid.uuid4().hex[:8]}"
        await asyncio.to_thread(_ctl, ["add_vhost", name])
        try:
            user = urlsplit(self.config.amqp_url).username or "guest"
            await asyncio.to_thread(_ctl, ["set_permissions", "-p", name, user, ".*", ".*", ".*"])
            parts = urlsplit(self.config.amqp_url)
            yield urlunsplit(parts._replace(path="/" + quote(name, safe="")))
        finally:
            await asyncio.to_thread(_ctl, ["delete_vhost", name])

    @contextlib.asynccontextmanager
    async def upstream(
        self,
        latency_ms: float,
        args: list[str] | None = None,
        env: dict[str, str] | None = None,
        config: dict[str, Any] | None = None,
    ) -> AsyncIterator[tuple[str, ManagedProcess | None]]:
        """The emulator a run calls, reset and configured: the bench's own, or (with ``args`` or ``env``) one
        started for this run with those command-line arguments and environment, and not reset (what its arguments
        set stays set). ``config`` is POSTed to its /_emulator/config after ``latency_ms``."""
        if args or env:
            process, url = await _start_emulator(args or [], env or {})
            try:
                if latency_ms:
                    self.emulator_call("/_emulator/config", {"latency_ms": latency_ms}, base=url)
                if config:
                    self.emulator_call("/_emulator/config", config, base=url)
                yield url, process
            finally:
                process.stop(5)
            return
        self.emulator_call("/_emulator/reset")
        self.emulator_call("/_emulator/config", {"latency_ms": latency_ms})
        if config:
            self.emulator_call("/_emulator/config", config)
        yield self.emulator_url, self.emulator

    def start(
        self, target: str, url: str, *, upstream: str | None = None, env: dict[str, str] | None = None, **settings: Any
    ) -> ManagedProcess:
        """A target process on vhost ``url``: a reference (``ECHOES``), the naive worker, or the worker, which gets
        the config's settings, then ``settings`` (KEY=value), then ``env``. ``upstream``: the emulator it calls."""
        c = self.config
        upstream = upstream or self.emulator_url
        if target in ECHOES:
            module = "worker.bench.echo" if target == "echo" else "worker.bench.batch_echo"
            args = ["-m", module, url, str(c.reference_prefetch)]
            if target == "batch-echo":  # the reference: the write queue widened as the worker widens its own
                from worker.bench.batch_echo import WRITE_QUEUE_FRAMES

                args.append(str(WRITE_QUEUE_FRAMES))
            return ManagedProcess(args)
        if target == "naive":
            return ManagedProcess(["-m", "worker.bench.naive", url, upstream])
        worker_env = {
            "AMQP_URL": url,
            "GEMINI_API_KEY": "bench",
            "GEMINI_BASE_URL": upstream,
            "ALLOWED_MODELS": orjson.dumps([SMALL]).decode(),
            "LOG_LEVEL": "INFO",
            "BREAKER_FAILURES": "0",
        }
        for key, value in (
            ("BATCH_MAX_SIZE", c.batch_size),
            ("BATCH_MAX_WAIT_MS", c.max_wait_ms),
            ("MAX_CONCURRENT_BATCHES", c.concurrency),
            ("PREFETCH_COUNT", c.prefetch),
        ):
            if value is not None:  # unset: the worker's own default
                worker_env[key] = str(value)
        worker_env.update(c.worker_env)
        worker_env.update({k.upper(): str(v) for k, v in settings.items()})
        worker_env.update(env or {})
        return ManagedProcess(["-m", "worker", "run"], worker_env)

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
        lane: Lane | None = None,
        check_every: int = 50,
        alongside: Alongside | None = None,
        scrape: bool = False,
        emulator_args: list[str] | None = None,
        emulator_env: dict[str, str] | None = None,
        emulator_config: dict[str, Any] | None = None,
        **settings: Any,
    ) -> dict[str, Any]:
        """Pre-load ``n`` one-input requests, start the target, time until every reply is in. The i-th request
        is the text ``texts(i)``, or the ready-made body of ``bodies(i)`` (with its vector's seed); ``before`` runs
        first (e.g. to empty a cache); ``keep_calls`` adds the emulator's per-call times and sizes.

        ``lane``: publish to exchange embed.requests with that lane's routing key, after checking that the worker's
        topology declares its queue, and check that the queue holds all ``n`` before the target starts (without a
        lane: the default exchange and the default lane, as callers do). Every ``check_every``-th reply is checked
        for its vector (1: every reply). ``alongside`` runs with the drain (queries, say) from the target's ready
        line; the run ends when both are done, and times the drain alone. ``n`` may be 0 (no backlog: the rates
        are then None). ``scrape``: read the worker's /metrics every ~100 ms (``worker.bench.scrape``).
        ``emulator_args``/``_env``/``_config``: the upstream of this run (``upstream``).

        The clock starts when the target process is started (the queue is full by then): ``startup_s`` is to the
        first reply, ``requests_per_s`` the steady state from the first reply to the last ((n - 1) replies over
        that time), ``whole_run_per_s`` n over process start to last reply. The ready line is only recorded."""
        if before is not None:
            before()
        if scrape and (target != "worker" or processes != 1):
            raise ValueError("scrape reads one worker process's /metrics")
        async with (
            self.upstream(latency_ms, emulator_args, emulator_env, emulator_config) as (upstream, emulator),
            self.vhost() as url,
        ):
            await declare_once(url, self.queue_type)  # the worker's own topology, declared before the load
            exchange, key = (topology.EXCHANGE, lane.routing_key) if lane else ("", topology.ROUTING_KEY)
            driver = Driver(url, check_every, reply_encoding=reply_encoding, exchange=exchange, routing_key=key)
            async with driver:
                if lane is not None:
                    await _check_lane(driver.connection, lane, expected=None)
                await self._publish(
                    driver, target=target, n=n, model=model, dims=dims, texts=texts, bodies=bodies, label=label
                )
                if lane is not None:
                    await _check_lane(driver.connection, lane, expected=n)
                timing = await self._timed(
                    driver,
                    target=target,
                    n=n,
                    processes=processes,
                    upstream=upstream,
                    emulator=emulator,
                    scrape=scrape,
                    alongside=alongside,
                    label=label,
                    settings=settings,
                )
                checked = driver.check_sample(model=model, dims=dims, echo=target in ECHOES)
            stats = self.emulator_call("/_emulator/stats", base=upstream)
        calls = {"call_times": stats["call_times"], "call_bytes": stats["call_bytes"]} if keep_calls else {}
        return {
            "label": label or target,
            "target": target,
            "processes": processes,
            "requests": n,
            "dimensions": dims or _full(model),
            "emulator_latency_ms": latency_ms,
            "emulator_args": emulator_args or [],
            "emulator_config": emulator_config or {},
            **timing,
            "upstream_calls": stats["calls"],
            "upstream_texts": stats["texts"],
            "mean_batch": round(stats["texts"] / stats["calls"], 2) if stats["calls"] else None,
            "upstream_max_in_flight": stats.get("max_in_flight"),  # None: an emulator that does not count them
            "replies_checked": checked,
            "check_every": check_every,
            **calls,
        }

    async def _publish(
        self,
        driver: Driver,
        *,
        target: str,
        n: int,
        model: str,
        dims: int | None,
        texts: Callable[[int], str] | None,
        bodies: Callable[[int], tuple[bytes, str]] | None,
        label: str | None,
    ) -> None:
        bar = self._progress(n, f"{label or target}: publish")
        for i in range(n):
            if bodies is not None:
                await driver.send_body(*bodies(i))
            else:
                await driver.send(texts(i) if texts is not None else f"{target} drain {i}", model=model, dims=dims)
            if bar is not None and i % 500 == 0:
                bar.update(min(500, n - i))
        if bar is not None:
            bar.close()

    async def _timed(
        self,
        driver: Driver,
        *,
        target: str,
        n: int,
        processes: int,
        upstream: str,
        emulator: ManagedProcess | None,
        scrape: bool,
        alongside: Alongside | None,
        label: str | None,
        settings: dict[str, Any],
    ) -> dict[str, Any]:
        """Start the target on the full queue and time it: start-up, steady state, whole run; CPU and memory."""
        bar = self._progress(n, f"{label or target}: drain")
        env: dict[str, str] = {}
        if scrape:
            port = free_port()
            env = {"METRICS_PORT": str(port), "METRICS_HOST": "127.0.0.1"}
        procs: list[ManagedProcess] = []
        cpu_at_first: list[float] = []

        def on_reply() -> None:
            if not cpu_at_first:  # the first reply: what the processes spent getting there
                cpu_at_first.extend(p.cpu_seconds() or 0.0 for p in procs)
            if bar is not None:
                bar.update(1)

        driver.on_reply = on_reply
        emulator_cpu = (emulator.cpu_seconds() or 0.0) if emulator is not None else 0.0
        url = driver.url
        spawned = time.perf_counter()
        procs.extend(self.start(target, url, upstream=upstream, env=env, **settings) for _ in range(processes))
        # Each process's ready line and its CPU at that moment, read by a thread as the line comes (never awaited
        # before the run: the clock does not wait for it). None: the process said no such line.
        readiness = [asyncio.ensure_future(asyncio.to_thread(_ready_and_cpu, p, 60.0)) for p in procs]
        scraper = Scraper(f"http://127.0.0.1:{env['METRICS_PORT']}/metrics", spawned) if scrape else None
        stop_scraping = asyncio.Event()
        scraping = asyncio.ensure_future(scraper.run(stop_scraping)) if scraper is not None else None

        async def beside() -> dict[str, Any]:
            assert alongside is not None
            ready = await asyncio.gather(*readiness)
            if any(r is None for r in ready):
                raise AssertionError(f"{target} printed no ready line:\n{procs[0].output}")
            return await alongside(url, min(r[0] for r in ready if r is not None))

        beside_result: dict[str, Any] = {}
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(_until_replies(driver, n, procs, timeout=max(120.0, n / 50)))
                side = group.create_task(beside()) if alongside is not None else None
            if side is not None:
                beside_result = side.result()
            cpu_end = [p.cpu_seconds() or 0.0 for p in procs]
            emulator_cpu = ((emulator.cpu_seconds() or 0.0) - emulator_cpu) if emulator is not None else 0.0
            rss = [p.peak_rss_mb() or 0.0 for p in procs]
            stop_scraping.set()
            # Settled a moment after the last reply is out (the acks follow it); then what is kept.
            await asyncio.sleep(1.0)
            rss_after = [p.rss_mb() or 0.0 for p in procs]
        finally:
            stop_scraping.set()
            for p in procs:
                p.stop(10)
            if bar is not None:
                bar.close()
            driver.on_reply = None
            if scraping is not None:
                await scraping
            ready = await asyncio.gather(*readiness)
        times = list(driver.received.values())
        first = min(times) if n else None
        last = max(times) if n else None
        ready_at = min((r[0] for r in ready if r is not None), default=None)
        # CPU per request from each process's ready line (start-up excluded: imports, connecting, declaring), or
        # from the first reply for a process that printed no ready line. A process that got ready only after the
        # last reply (one of several, its siblings took the whole backlog) served nothing: it counts 0.
        at_first = cpu_at_first or [0.0] * len(procs)
        base = [r[1] if r is not None else first_cpu for r, first_cpu in zip(ready, at_first, strict=True)]
        cpu_from = "ready line" if all(r is not None for r in ready) else "first reply"
        cpu = sum(max(0.0, end - b) for end, b in zip(cpu_end, base, strict=True))
        steady = (last - first) if first is not None and last is not None else None
        whole = (last - spawned) if last is not None else None

        def s(value: float | None, digits: int = 3) -> float | None:
            return round(value, digits) if value is not None else None

        rate = round((n - 1) / steady, 1) if steady and n > 1 else None
        timing: dict[str, Any] = {
            "startup_s": s(first - spawned) if first is not None else None,
            "ready_s": s(ready_at - spawned) if ready_at is not None else None,
            "seconds": s(steady) if steady is not None else 0.0,  # the steady state, first reply to last
            "whole_s": s(whole),
            "ready_to_last_s": s(last - ready_at) if last is not None and ready_at is not None else None,
            "requests_per_s": rate,
            "texts_per_s": rate,
            "whole_run_per_s": round(n / whole, 1) if whole and n else None,
            "peak_rss_mb": round(max(rss), 1),
            "rss_after_drain_mb": round(max(rss_after), 1),
            # CPU the target's processes spent per request: less sensitive to a noisy neighbour than rates.
            "cpu_us_per_request": round(cpu / n * 1e6, 1) if n else None,
            "cpu_from": cpu_from,
            "cpu_s_whole_run": round(sum(cpu_end), 3),  # from process start, imports included
            "startup_cpu_s": round(sum(r[1] for r in ready if r is not None), 3) if cpu_from == "ready line" else None,
            "emulator_cpu_us_per_request": round(emulator_cpu / n * 1e6, 1) if n and emulator is not None else None,
        }
        if scraper is not None:
            timing["metrics"] = scraper.result(
                s(first - spawned) if first is not None else None, s(last - spawned) if last is not None else None
            )
        return {**timing, **beside_result}

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
            "batch_fill": round(mean_batch / c.batch, 3),
        }


async def _check_lane(connection: aio_pika.abc.AbstractConnection, lane: Lane, *, expected: int | None) -> None:
    """The lane's queue exists (a passive declare, on a channel of its own: a 404 closes it) and, with
    ``expected``, holds that many messages: what was published landed in the lane meant."""
    channel = await connection.channel()
    try:
        queue = await channel.declare_queue(lane.queue, passive=True)
    except aio_pika.exceptions.ChannelNotFoundEntity:
        raise LaneNotDeclared(
            f"no queue {lane.queue!r} once the worker's topology is declared (worker.amqp.connection."
            f"declare_topology): this worker does not serve routing key {lane.routing_key!r} yet"
        ) from None
    finally:
        if not channel.is_closed:
            await channel.close()
    held = queue.declaration_result.message_count
    if expected is not None and held != expected:
        raise AssertionError(f"queue {lane.queue!r} holds {held} messages, {expected} were published to it")


def _ctl(args: list[str]) -> None:
    # RABBITMQCTL: the CLI of the broker under test, as a command prefix (as in tests/conftest.py).
    command = shlex.split(os.environ.get("RABBITMQCTL", "")) or ["rabbitmqctl"]
    subprocess.run([*command, "-q", *args], check=True, capture_output=True, timeout=60)


async def _start_emulator(args: list[str], env: dict[str, str]) -> tuple[ManagedProcess, str]:
    process = ManagedProcess(["-m", "worker", "emulator", "--port", "0", *args], env)
    try:
        line = await asyncio.to_thread(process.wait_for_line, "listening on", 30)
    except BaseException:
        process.stop(5)
        raise
    return process, line.rsplit(" ", 1)[1].strip()


def _ready_and_cpu(process: ManagedProcess, timeout: float) -> tuple[float, float] | None:
    """When ``process`` printed its ready line (perf_counter) and its CPU seconds right then; None: it did not."""
    try:
        process.wait_for_line("ready:", timeout)
    except AssertionError:
        return None
    cpu = process.cpu_seconds() or 0.0
    return process.line_time("ready:"), cpu


async def _until_replies(driver: Driver, n: int, procs: list[ManagedProcess], *, timeout: float) -> None:
    """Wait for ``n`` replies; fail at once, with its output, if a target process exits first."""
    wait = asyncio.ensure_future(driver.wait_for(n, timeout))
    try:
        while not wait.done():
            for p in procs:
                if p.proc.poll() is not None:
                    raise AssertionError(
                        f"target exited ({p.proc.returncode}) after {len(driver.received)} of {n} replies:\n{p.output}"
                    )
            await asyncio.wait({wait}, timeout=0.2)
        wait.result()
    finally:
        wait.cancel()


def _full(model: str) -> int:
    from worker import limits

    return limits.full_dimensions(model)


# ---------------------------------------------------------------------- rounds
Scenario = Callable[[Bench], Any]


@dataclass(frozen=True)
class RunSpec:
    label: str
    target: str
    options: dict[str, Any] = field(default_factory=dict)


async def rounds(bench: Bench, specs: list[RunSpec]) -> dict[str, list[dict[str, Any]]]:
    """Every spec once per round, in turn (A B C A B C ...), so drift in the machine's speed hits all alike."""
    results: dict[str, list[dict[str, Any]]] = {spec.label: [] for spec in specs}
    for _ in range(bench.config.repeat):
        for spec in specs:
            results[spec.label].append(await bench.drain(spec.target, label=spec.label, **spec.options))
    return results
