"""A real three-node RabbitMQ cluster (``scripts/cluster``) loses the node that leads ``embed.requests``.

Two worker processes list every node in AMQP_URL, each starting at a different one (one of them on the leader).
Callers on a surviving node publish continuously, over Direct Reply-to and over a classic callback queue; a third
caller sits on the doomed node. The leader's beam is SIGKILLed mid-stream and started again later. Every request
must be answered with the right vector (duplicates allowed, counted), nothing may reach a DLQ, both workers must
be consuming at the end, and deferred items published around the kill must all land in Redis. The gap (longest
time without a reply) and the duplicates are printed; the README reports them.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import redis.asyncio as aioredis

from tests.e2e.processes import WorkerProcess, worker_env
from tests.integration.helpers import RawCaller
from worker.amqp.connection import declare_once
from worker.client import EmbedClient, EmbedClientError
from worker.emulator import EmulatorThread
from worker.vectors import expected_vector

# Booting three nodes takes ~20 s here, and over two minutes on a loaded machine: more than the suite default.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "cluster"
PORTS = {"embed1": 5681, "embed2": 5682, "embed3": 5683}
DIMS = 128
RATE = 200  # requests per second, both callers together
SECONDS = 12


def cluster(*args: str, timeout: float = 180) -> str:
    result = subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, check=False)
    if result.returncode != 0:
        raise AssertionError(f"scripts/cluster {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result.stdout.strip()


@pytest.fixture(scope="module")
def nodes() -> Iterator[None]:
    if shutil.which("rabbitmq-server") is None or os.geteuid() != 0:
        pytest.skip("scripts/cluster needs RabbitMQ's Debian package and root (.ci/run has both)")
    cluster("up")
    yield
    cluster("down")


def url(node: str, vhost: str) -> str:
    return f"amqp://guest:guest@127.0.0.1:{PORTS[node]}/{vhost}"


def expected(text: str) -> np.ndarray:
    return expected_vector(text, model="gemini-embedding-001", task_type=None, dims=DIMS, full_dims=3072)


@dataclass
class Ledger:
    """Every request sent, every reply seen (with its arrival time), and what was wrong."""

    sent: dict[str, str] = field(default_factory=dict)  # correlation id or call id -> text
    answered: dict[str, int] = field(default_factory=dict)  # -> replies seen (more than 1: a duplicate)
    arrivals: list[float] = field(default_factory=list)
    wrong: list[str] = field(default_factory=list)
    lost: set[str] = field(default_factory=set)  # calls that failed with connection_lost (their caller's node died)
    recovered_at: float = 0.0  # the first answer to the dead node's caller after one of its calls was lost

    def reply(self, key: str, vector: np.ndarray) -> None:
        self.arrivals.append(time.monotonic())
        self.answered[key] = self.answered.get(key, 0) + 1
        if not np.allclose(vector, expected(self.sent[key]), atol=1e-6):
            self.wrong.append(key)


async def test_losing_the_leader_node_loses_no_request(
    nodes: None, emulator: EmulatorThread, redis_url: str, processes: list[WorkerProcess]
) -> None:
    emulator.emulator.state.latency_ms = 200  # calls are in flight on every connection when the node dies
    vhost = f"cluster-{uuid.uuid4().hex[:8]}"
    cluster("ctl", "embed1", "add_vhost", vhost)
    cluster("ctl", "embed1", "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    await declare_once(url("embed1", vhost))
    leader = cluster("leader", "embed.requests", vhost).split("@")[0]
    survivor = next(n for n in PORTS if n != leader)
    members = cluster("ctl", "embed1", "-q", "list_queues", "-p", vhost, "name", "members", "--no-table-headers")
    assert all(members.count("@localhost") >= 3 for line in members.splitlines() if "embed." in line), members

    everyone = [leader, *[n for n in PORTS if n != leader]]
    env = {"redis_url": redis_url, "deferred_flush_interval_s": 0.5, "deferred_wake_messages": 0}
    for first in (leader, survivor):  # worker A starts on the leader, worker B on a survivor
        order = [first, *[n for n in everyone if n != first]]
        addresses = ",".join(url(n, vhost) for n in order)
        processes.append(WorkerProcess(worker_env(addresses, emulator.base_url, amqp_reconnect_interval_s=0.5, **env)))
    for proc in processes:
        await asyncio.to_thread(proc.wait_for_line, "ready:", 60)

    ledger = Ledger()
    prefix = f"cluster:{uuid.uuid4().hex[:8]}:"
    deferred: list[tuple[str, str]] = []
    killed_at = 0.0
    async with (
        RawCaller(url(survivor, vhost)) as classic,
        EmbedClient(url(survivor, vhost), timeout=60, max_in_flight=512) as direct,
        EmbedClient(",".join(url(n, vhost) + "?reconnect_interval=0.3" for n in everyone), timeout=60) as doomed,
    ):

        async def one_direct(client: EmbedClient, key: str, text: str) -> None:
            while True:  # a caller's remedy for connection_lost: send again (a new call, on the new connection)
                try:
                    [vector] = await client.embed([text], output_dimensionality=DIMS, timeout=60)
                    ledger.reply(key, vector)
                    if client is doomed and ledger.lost and not ledger.recovered_at:
                        ledger.recovered_at = time.monotonic()
                    return
                except EmbedClientError as exc:
                    assert exc.code == "connection_lost", exc
                    ledger.lost.add(key)
                    await asyncio.sleep(0.2)

        async def one_classic(text: str) -> None:
            cid = await classic.send({"text": text, "output_dimensionality": DIMS})
            ledger.sent[cid] = text
            reply = await classic.reply(cid, timeout=60)
            ledger.reply(cid, np.asarray(reply["embeddings"][0], dtype=np.float32))

        calls = []
        started = time.monotonic()
        for i in range(RATE * SECONDS):
            text = f"cluster text {i}"
            if i % 2:
                calls.append(asyncio.create_task(one_classic(text)))
            else:
                key = f"direct-{i}"
                ledger.sent[key] = text
                client = doomed if i % 10 == 0 else direct
                calls.append(asyncio.create_task(one_direct(client, key, text)))
            if i % 100 == 0:  # deferred items all along, around the kill too
                batch = [(f"{prefix}{i}:{k}", f"deferred {i} {k}") for k in range(5)]
                deferred += batch
                await direct.defer(batch)
            if i == RATE * 3:
                await asyncio.to_thread(cluster, "kill", leader)
                killed_at = time.monotonic()
            if i == RATE * 7:
                restart = asyncio.create_task(asyncio.to_thread(cluster, "start", leader))
            await asyncio.sleep(max(0.0, started + (i + 1) / RATE - time.monotonic()))
        done, pending = await asyncio.wait(calls, timeout=90)
        failures = [t.exception() for t in done if t.exception() is not None]
        if pending or failures:
            missing = sorted(set(ledger.sent) - set(ledger.answered))
            state = cluster(
                "ctl",
                survivor,
                "-q",
                "list_queues",
                "-p",
                vhost,
                "name",
                "messages_ready",
                "messages_unacknowledged",
                "consumers",
                "leader",
                "--no-table-headers",
            )
            conns = cluster("ctl", survivor, "-q", "list_connections", "-p", vhost, "name", "client_properties")
            raise AssertionError(
                f"{len(missing)} unanswered, e.g. {missing[:5]}; {len(failures)} calls failed, e.g. {failures[:3]!r}\n"
                f"{state}\n{conns}\n" + "".join(p.output[-3000:] for p in processes)
            )
        await restart

    arrivals = sorted(ledger.arrivals)
    gap = max(b - a for a, b in itertools.pairwise(arrivals))
    duplicates = sum(n - 1 for n in ledger.answered.values())
    assert set(ledger.answered) == set(ledger.sent) and not ledger.wrong
    assert ledger.lost and ledger.recovered_at  # the dead node's caller saw connection_lost, sent again, was answered
    assert await _depth(url(survivor, vhost), "embed.requests.dlq") == 0
    assert await _depth(url(survivor, vhost), "embed.deferred.dlq") == 0
    for _ in range(200):  # consuming again: the worker from the dead node reconnected to another one
        if await _consumers(url(survivor, vhost), "embed.requests") == 2:
            break
        await asyncio.sleep(0.1)
    assert await _consumers(url(survivor, vhost), "embed.requests") == 2
    redis = aioredis.Redis.from_url(redis_url)
    for _ in range(100):
        if await redis.exists(*(k for k, _ in deferred)) == len(deferred):
            break
        await asyncio.sleep(0.1)
    for key, text in deferred:
        stored = np.frombuffer((await redis.hgetall(key))[b"embedding"], dtype="<f4")
        assert np.allclose(
            stored,
            expected_vector(text, model="gemini-embedding-001", task_type=None, dims=None, full_dims=3072),
            atol=1e-6,
        ), key
    await redis.aclose()
    figures = {
        "requests": len(ledger.sent),
        "gap_s": round(gap, 3),
        "duplicates": duplicates,
        "calls_lost_on_the_dead_node": len(ledger.lost),
        "dead_node_caller_served_again_after_s": round(ledger.recovered_at - killed_at, 2),
        "killed_after_s": round(killed_at - started, 2),
        "deferred_items": len(deferred),
    }
    print("cluster failover:", orjson.dumps(figures).decode())


async def _passive(address: str, queue: str) -> Any:
    import aio_pika

    connection = await aio_pika.connect(address)
    try:
        return (await (await connection.channel()).declare_queue(queue, passive=True)).declaration_result
    finally:
        await connection.close()


async def _depth(address: str, queue: str) -> int:
    return int((await _passive(address, queue)).message_count or 0)


async def _consumers(address: str, queue: str) -> int:
    return int((await _passive(address, queue)).consumer_count or 0)
