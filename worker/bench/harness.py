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
from worker.processes import ManagedProcess

SMALL = "emulator-embedding-8d"  # the emulator's 8-dimension model: message cost without float cost
FULL = "gemini-embedding-001"
SMALLEST = 128  # the smallest output_dimensionality a real caller can ask of FULL
ECHOES = ("echo", "batch-echo")  # the reference workers: ready-made replies, no upstream


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
        lane: Lane | None = None,
        check_every: int = 50,
        alongside: Alongside | None = None,
        **settings: Any,
    ) -> dict[str, Any]:
        """Pre-load ``n`` one-input requests, start the target, time until every reply is in. The i-th request
        is the text ``texts(i)``, or the ready-made body of ``bodies(i)`` (with its vector's seed); ``before`` runs
        first (e.g. to empty a cache); ``keep_calls`` adds the emulator's per-call times and sizes.

        ``lane``: publish to exchange embed.requests with that lane's routing key, after checking that the worker's
        topology declares its queue, and check that the queue holds all ``n`` before the target starts (without a
        lane: the default exchange and the default lane, as callers do). Every ``check_every``-th reply is checked
        for its vector (1: every reply). ``alongside`` runs with the drain (queries, say); the run ends when both
        are done, and times the drain alone. ``n`` may be 0 (no backlog: the rates are then None)."""
        if before is not None:
            before()
        self.emulator_call("/_emulator/reset")
        self.emulator_call("/_emulator/config", {"latency_ms": latency_ms})
        async with self.vhost() as url:
            await declare_once(url, self.queue_type)  # the worker's own topology, declared before the load
            exchange, key = (topology.EXCHANGE, lane.routing_key) if lane else ("", topology.ROUTING_KEY)
            driver = Driver(url, check_every, reply_encoding=reply_encoding, exchange=exchange, routing_key=key)
            async with driver:
                if lane is not None:
                    await _check_lane(driver.connection, lane, expected=None)
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
                if lane is not None:
                    await _check_lane(driver.connection, lane, expected=n)
                bar = self._progress(n, f"{label or target}: drain")
                driver.on_reply = (lambda: bar.update(1)) if bar is not None else None
                procs = [self.start(target, url, **settings) for _ in range(processes)]
                try:
                    await asyncio.gather(*(asyncio.to_thread(p.wait_for_line, "ready:", 60) for p in procs))
                    cpu_at_ready = [p.cpu_seconds() or 0.0 for p in procs]  # start-up (imports) excluded
                    ready_at = min(p.line_time("ready:") for p in procs)
                    async with asyncio.TaskGroup() as group:
                        group.create_task(driver.wait_for(n, timeout=max(120.0, n / 50)))
                        beside = group.create_task(alongside(url, ready_at)) if alongside is not None else None
                    cpu = sum((p.cpu_seconds() or 0.0) - c for p, c in zip(procs, cpu_at_ready, strict=True))
                    # The clock starts when the first process said it consumes (it prints that right after
                    # basic.consume), or at the first reply if our reader thread saw the line late.
                    started = min([ready_at, *driver.received.values()])
                    finished = max(driver.received.values(), default=started)
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
        rate = round(n / seconds, 1) if n else None
        calls = {"call_times": stats["call_times"], "call_bytes": stats["call_bytes"]} if keep_calls else {}
        return {
            "label": label or target,
            "target": target,
            "processes": processes,
            "requests": n,
            "dimensions": dims or _full(model),
            "emulator_latency_ms": latency_ms,
            "seconds": round(seconds, 3),
            "requests_per_s": rate,
            "texts_per_s": rate,
            "upstream_calls": stats["calls"],
            "upstream_texts": stats["texts"],
            "mean_batch": round(stats["texts"] / stats["calls"], 2) if stats["calls"] else None,
            "peak_rss_mb": round(max(rss), 1),
            "rss_after_drain_mb": round(max(rss_after), 1),
            # CPU the target's processes spent per request: less sensitive to a noisy neighbour than rates.
            "cpu_us_per_request": round(cpu / n * 1e6, 1) if n else None,
            "replies_checked": checked,
            **calls,
            **(beside.result() if beside is not None else {}),
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
