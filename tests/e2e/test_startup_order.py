"""What a start waits for, and what it does not (issue 21, "Start fast"): consuming starts before the SDK is built
and whatever Redis says, a metrics port in use fails the start before any delivery is taken, and neither a start
nor a client command imports what it does not need. Each check is an ordering or an import, never a duration."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import aiormq
import pytest

from tests.conftest import worker_settings
from tests.integration.helpers import RawCaller, consumers
from worker.amqp.connection import declare_once
from worker.app import run_worker
from worker.emulator import EmulatorThread
from worker.errors import ConfigurationError

pytestmark = pytest.mark.integration


class SilentRedis:
    """Takes connections and reads what it is sent, and never answers: a Redis that hangs."""

    def __init__(self) -> None:
        self.connections = 0
        self._writers: list[asyncio.StreamWriter] = []

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(writer)
        with contextlib.suppress(ConnectionError):
            while await reader.read(65536):
                pass

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[str]:
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            for writer in self._writers:
                writer.close()
            server.close()


async def _start(settings: Any) -> tuple[asyncio.Event, asyncio.Event, asyncio.Task[None]]:
    stop, ready = asyncio.Event(), asyncio.Event()
    return stop, ready, asyncio.create_task(run_worker(settings, stop=stop, ready=ready))


async def _consumed(url: str, worker: asyncio.Task[None], timeout: float = 30) -> None:
    """Until the broker counts a consumer on the default lane's queue (it offers no event for it)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not await _consumers(url):
        assert not worker.done(), worker.result()
        assert asyncio.get_running_loop().time() < deadline, "no consumer on embed.requests"
        await asyncio.sleep(0.02)


async def _consumers(url: str) -> int:
    try:
        return await consumers(url, "embed.requests")
    except aiormq.exceptions.ChannelNotFoundEntity:
        return 0  # not declared yet


async def test_consuming_does_not_wait_for_a_redis_that_does_not_answer(
    vhost: str, emulator: EmulatorThread, caplog: pytest.LogCaptureFixture
) -> None:
    """The fleet limiter's announcement and the deferred lane's eviction check ask Redis; both end only by their
    own timeouts here. The consumers started before either was even asked."""
    redis = SilentRedis()
    async with redis.running() as url:
        fleet = {"upstream_limit_scope": "fleet", "upstream_rpm": 600}
        settings = worker_settings(vhost, emulator.base_url, redis_url=url, **fleet)
        with caplog.at_level(logging.INFO):
            stop, ready, worker = await _start(settings)
            try:
                await _consumed(vhost, worker)
                await asyncio.wait_for(ready.wait(), 30)  # after the Redis calls' timeouts
            finally:
                stop.set()
                await asyncio.wait_for(worker, 30)
    assert redis.connections >= 1  # it was asked
    lines = [record.getMessage() for record in caplog.records]

    def first(fragment: str) -> int:
        return next(i for i, line in enumerate(lines) if fragment in line)

    consuming = first("consuming from embed.requests ")
    assert consuming < first("fleet rate limit:") and consuming < first("deferred lane on"), lines


async def test_a_metrics_port_in_use_fails_the_start_before_any_delivery_is_taken(
    vhost: str, emulator: EmulatorThread, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker that cannot start must not take (and so redeliver, counting toward the delivery limit) a request."""
    await declare_once(vhost)
    async with RawCaller(vhost) as caller:
        await caller.send({"text": "waiting"})
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = worker_settings(vhost, emulator.base_url, metrics_host="127.0.0.1", metrics_port=port)
        with caplog.at_level(logging.INFO), pytest.raises(ConfigurationError, match="METRICS_PORT"):
            await run_worker(settings)
    assert "consuming from" not in caplog.text
    connection = await aio_pika.connect(vhost)
    try:
        queue = await (await connection.channel()).get_queue("embed.requests", ensure=False)
        message = await queue.get(timeout=5)
        assert message is not None and not message.redelivered
        await message.ack()
    finally:
        await connection.close()


def _imported_after(code: str, modules: list[str]) -> list[str]:
    """Which of ``modules`` a fresh interpreter has imported after running ``code``."""
    check = f"{code}\nimport sys\nprint(' '.join(m for m in {modules!r} if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=60, check=True)
    return done.stdout.split()


def test_a_start_imports_neither_the_sdk_nor_what_its_settings_leave_off() -> None:
    """google-genai is imported for the first error answer (embedders/gemini.py); Redis, the deferred lane,
    the Batch API and the bundled emulator only when a setting asks for them."""
    heavy = [
        "google.genai",
        "worker.embedders.gemini",
        "worker.embedders.gemini_batch",
        "redis",
        "worker.deferred.jobs",
        "worker.deferred.scheduler",
        "worker.amqp.deferred",
        "worker.emulator",
    ]
    assert _imported_after("import worker.cli, worker.app, worker.settings", heavy) == []


def test_a_client_command_imports_no_pydantic() -> None:
    """`embed` and `flush` check their broker URL without Settings: pydantic was a third of `embed`'s time."""
    code = (
        "from worker.cli import main\n"
        "try:\n"
        "    main(['embed', 'hi', '--url', 'amqp://guest:guest@127.0.0.1:9/'])\n"
        "except SystemExit:\n"
        "    pass"
    )
    assert _imported_after(code, ["pydantic", "pydantic_settings", "google.genai", "worker.settings"]) == []
