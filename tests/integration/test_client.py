"""The caller library and the `embed` command against a real worker."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import aio_pika
import numpy as np
import pytest

from tests.integration.helpers import assert_right_vectors, queue_depth, wait_until
from worker.amqp.connection import declare_once
from worker.client import EmbedClient, EmbedClientError, EmbedClientRefused, EmbedTimeout, SyncEmbedClient
from worker.emulator import EmulatorState

pytestmark = pytest.mark.integration


async def test_timeout_raises_and_the_deadline_spares_the_upstream_call(
    start_worker: Any, vhost: str, emulator_state: EmulatorState
) -> None:
    # The worker holds the request for its batch wait (2 s); the caller gives up after 0.5 s.
    await start_worker(batch_max_wait_ms=2000)
    async with EmbedClient(vhost) as client:
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await client.embed(["too slow"], timeout=0.5)
        assert time.monotonic() - started < 1.9
        # A request from another caller forces nothing: wait until the worker has settled the first.
        vectors = await client.embed(["on time"], timeout=10)
    assert_right_vectors(
        {"embeddings": vectors.tolist(), "model": "gemini-embedding-001", "dimensions": 3072}, ["on time"]
    )
    assert emulator_state.texts == 1  # the abandoned request cost no upstream slot (deadline passed)


async def test_in_flight_requests_are_bounded(start_worker: Any, vhost: str) -> None:
    await start_worker(batch_max_size=5, batch_max_wait_ms=10)
    async with EmbedClient(vhost, max_in_flight=3) as client:
        peak = 0

        async def one(i: int) -> np.ndarray:
            nonlocal peak
            result = client.embed([f"bounded {i}"], output_dimensionality=128)
            peak = max(peak, len(client._pending))
            return await result

        results = await asyncio.gather(*(one(i) for i in range(20)))
    assert peak <= 3
    for i, vec in enumerate(results):
        assert_right_vectors(
            {"embeddings": vec.tolist(), "model": "gemini-embedding-001", "dimensions": 128}, [f"bounded {i}"], dims=128
        )


async def test_sync_client(start_worker: Any, vhost: str) -> None:
    await start_worker()

    def call() -> np.ndarray:
        with SyncEmbedClient(vhost, timeout=20) as client:
            return client.embed(["sync a", "sync b"], task_type="CLUSTERING")

    vectors = await asyncio.to_thread(call)
    assert_right_vectors(
        {"embeddings": vectors.tolist(), "model": "gemini-embedding-001", "dimensions": 3072},
        ["sync a", "sync b"],
        task_type="CLUSTERING",
    )


@pytest.mark.parametrize("suffix", [".jsonl", ".npy"])
async def test_embed_file_command(start_worker: Any, vhost: str, tmp_path: Path, suffix: str) -> None:
    await start_worker(batch_max_size=50)
    lines = [f"line number {i}" for i in range(230)]
    source = tmp_path / "texts.txt"
    source.write_text("\n".join(lines[:100]) + "\n\n" + "\n".join(lines[100:]) + "\n")
    output = tmp_path / f"out{suffix}"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "worker",
        "embed",
        "--file",
        str(source),
        "--output",
        str(output),
        "--dimensions",
        "256",
        "--chunk",
        "40",
        "--url",
        vhost,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    if suffix == ".npy":
        matrix = np.load(output)
    else:
        rows = [json.loads(line) for line in output.read_text().splitlines()]
        assert [r["text"] for r in rows] == lines and [r["line"] for r in rows] == list(range(230))
        matrix = np.asarray([r["embedding"] for r in rows], dtype=np.float32)
    assert matrix.shape == (230, 256)
    assert_right_vectors(
        {"embeddings": matrix.tolist(), "model": "gemini-embedding-001", "dimensions": 256}, lines, dims=256
    )


# ---------------------------------------------------------------------- every failure typed (issue: client errors)
async def _spy(vhost: str, client: EmbedClient) -> tuple[str, aio_pika.abc.AbstractIncomingMessage]:
    """Send one request to a spy queue and return the Direct Reply-to name it carried, and the request."""
    connection = await aio_pika.connect(vhost)
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue("", exclusive=True)
        await queue.bind("embed.requests", routing_key=queue.name)
        with pytest.raises(EmbedTimeout):
            await client.request(b"{}", routing_key=queue.name, exchange="embed.requests", timeout=0.3)
        request = await queue.get(timeout=5)
        assert request is not None
        return request.reply_to or "", request
    finally:
        await connection.close()


async def _answer(vhost: str, reply_to: str, correlation_id: str, body: bytes) -> None:
    connection = await aio_pika.connect(vhost)
    try:
        channel = await connection.channel()
        await channel.default_exchange.publish(
            aio_pika.Message(body, correlation_id=correlation_id, content_type="application/json"), routing_key=reply_to
        )
    finally:
        await connection.close()


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"not json", "JSONDecodeError"),
        (b'{"embeddings": [[0.1, 0.2]], "model": "m", "dimensions": 2}', "1 vectors for 2 texts"),
        (b'{"nothing": 1}', "KeyError"),
    ],
)
async def test_malformed_replies_are_typed_errors(vhost: str, body: bytes, fragment: str) -> None:
    """A reply that breaks the contract (or a peer writing into our Direct Reply-to name) is an EmbedClientError,
    not a JSONDecodeError/KeyError, and never a short result."""
    await declare_once(vhost)
    async with EmbedClient(vhost, timeout=10) as client:
        reply_to, _ = await _spy(vhost, client)
        call = asyncio.create_task(client.embed(["a", "b"]))
        while not client._pending:  # noqa: ASYNC110  # the call registers its correlation id synchronously
            await asyncio.sleep(0)
        [cid] = client._pending
        await _answer(vhost, reply_to, cid, body)
        with pytest.raises(EmbedClientError) as info:
            await call
    assert info.value.code == "malformed_reply" and fragment in info.value.message


async def test_requests_carry_a_deadline_not_a_broker_ttl(vhost: str) -> None:
    """An AMQP expiration would dead-letter abandoned requests into the DLQ, which is for work worth replaying."""
    await declare_once(vhost)
    async with EmbedClient(vhost) as client:
        _, request = await _spy(vhost, client)
    assert request.expiration is None and "x-deadline" in (request.headers or {})


async def test_timeouts_are_taken_literally(start_worker: Any, vhost: str, emulator_state: EmulatorState) -> None:
    await start_worker()
    async with EmbedClient(vhost) as client:
        with pytest.raises(EmbedTimeout) as info:
            await client.embed(["never sent"], timeout=0)
        assert info.value.code == "timeout" and isinstance(info.value, TimeoutError)
    assert await queue_depth(vhost, "embed.requests") == 0 and emulator_state.texts == 0
    with pytest.raises(ValueError, match="positive"):
        EmbedClient(vhost, timeout=0)


async def test_an_unreachable_broker_is_a_typed_error() -> None:
    with pytest.raises(EmbedClientError) as info:
        await EmbedClient("amqp://guest:guest@127.0.0.1:9/").connect()
    assert info.value.code == "unreachable" and info.value.retryable


async def test_a_dropped_connection_fails_calls_in_flight_at_once_and_the_client_recovers(
    broker: Any, start_worker: Any, vhost: str, emulator_state: EmulatorState
) -> None:
    await start_worker()
    emulator_state.latency_ms = 5000  # the first call is still upstream when the connection drops
    async with EmbedClient(vhost + "?reconnect_interval=0.2", timeout=30) as client:
        call = asyncio.create_task(client.embed(["in flight"]))
        await wait_until(lambda: queue_depth(vhost, "embed.requests"), 0)  # the worker holds it
        # This test's vhost only: another program's EmbedClient on the same broker is not ours to drop.
        [pid] = [c.pid for c in broker.connections(vhost) if c.name == "embed-client"]
        broker.ctl(["close_connection", pid, "test: the caller's connection drops"])
        with pytest.raises(EmbedClientError) as info:
            await asyncio.wait_for(call, 10)  # not the call's 30 s timeout: its reply can never come
        assert info.value.code == "connection_lost" and info.value.retryable
        emulator_state.latency_ms = 0
        for _ in range(100):  # a caller retries connection_lost; the robust connection comes back
            try:
                vectors = await client.embed(["after the drop"], timeout=5)
                break
            except EmbedClientError as exc:
                assert exc.code == "connection_lost"
                await asyncio.sleep(0.1)
        else:
            raise AssertionError("the client did not recover")
    assert_right_vectors(
        {"embeddings": vectors.tolist(), "model": "gemini-embedding-001", "dimensions": 3072}, ["after the drop"]
    )


# ---------------------------------------------------------------------- a broker that refuses us, nobody to route to
@pytest.mark.parametrize(
    ("password", "vhost_name", "fragment"),
    [("guest", "no-such-vhost", "the vhost does not exist"), ("wrong", "", "refused the login")],
)
async def test_a_broker_that_refuses_us_is_not_retryable(
    broker: Any, password: str, vhost_name: str, fragment: str
) -> None:
    """A wrong password or a missing vhost will not heal by retrying; the words are the ones `run` uses."""
    url = broker.vhost_url(vhost_name).replace("guest:guest@", f"guest:{password}@")
    with pytest.raises(EmbedClientRefused) as info:
        await EmbedClient(url).connect()
    assert info.value.code == "unreachable" and not info.value.retryable
    assert fragment in info.value.message and "guest:wrong" not in info.value.message


async def test_flush_fails_at_once_when_no_worker_of_the_deferred_lane_listens(start_worker: Any, vhost: str) -> None:
    await start_worker()  # no REDIS_URL: the RPC lane only, so no flush queue is bound
    async with EmbedClient(vhost, timeout=300) as client:
        with pytest.raises(EmbedClientError) as info:
            await asyncio.wait_for(client.flush(), 20)  # far less than the client's timeout
        assert info.value.code == "unroutable" and info.value.retryable
        assert "no worker of the deferred lane is listening" in info.value.message
        vectors = await client.embed(["still works"], timeout=10)  # the RPC lane is unaffected
    assert vectors.shape == (1, 3072)


@pytest.mark.parametrize("call", ["embed", "flush"])
async def test_a_request_on_a_vhost_without_the_topology_fails_at_once(vhost: str, call: str) -> None:
    """No worker ever started here: no queue embed.requests (embed), no exchange embed.requests (flush)."""
    async with EmbedClient(vhost, timeout=300) as client:
        request = client.embed(["x"]) if call == "embed" else client.flush()
        with pytest.raises(EmbedClientError) as info:
            await asyncio.wait_for(request, 20)
    assert info.value.code == "unroutable" and info.value.retryable, info.value
