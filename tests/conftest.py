"""Shared fixtures: a real RabbitMQ (AMQP_URL, else testcontainers), a vhost per test, the emulator,
and in-process workers wired exactly as ``embed-worker run`` wires them."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import pytest

from worker.app import run_worker
from worker.emulator import EmulatorState, EmulatorThread
from worker.settings import Settings

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"


@dataclass
class Broker:
    url: str
    ctl: Callable[[list[str]], str]  # runs rabbitmqctl with these arguments, returns its output

    def vhost_url(self, vhost: str) -> str:
        parts = urlsplit(self.url)
        return urlunsplit(parts._replace(path="/" + quote(vhost, safe="")))


def _answers(url: str) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "localhost", parts.port or 5672), timeout=2):
            return True
    except OSError:
        return False


def _local_ctl(args: list[str]) -> str:
    return subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, text=True, timeout=60).stdout


@pytest.fixture(scope="session")
def broker() -> Iterator[Broker]:
    url = os.environ.get("AMQP_URL", DEFAULT_AMQP_URL)
    if _answers(url) and shutil.which("rabbitmqctl"):
        yield Broker(url, _local_ctl)
        return
    # No local broker: start one in Docker (needs a Docker engine).
    from testcontainers.rabbitmq import RabbitMqContainer

    with RabbitMqContainer("rabbitmq:3.13") as container:
        host, port = container.get_container_host_ip(), container.get_exposed_port(5672)

        def ctl(args: list[str]) -> str:
            result = container.exec(["rabbitmqctl", *args])
            return result.output.decode()

        yield Broker(f"amqp://guest:guest@{host}:{port}/", ctl)


@pytest.fixture
def vhost(broker: Broker) -> Iterator[str]:
    """A fresh vhost for one test, so the worker's fixed queue names never collide; its URL."""
    name = f"test-{uuid.uuid4().hex[:10]}"
    broker.ctl(["add_vhost", name])
    broker.ctl(["set_permissions", "-p", name, "guest", ".*", ".*", ".*"])
    yield broker.vhost_url(name)
    with contextlib.suppress(Exception):
        broker.ctl(["delete_vhost", name])


DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """REDIS_URL when a server answers there, otherwise a Redis in Docker (testcontainers)."""
    url = os.environ.get("REDIS_URL", DEFAULT_REDIS_URL)
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "localhost", parts.port or 6379), timeout=2):
            yield url
            return
    except OSError:
        pass
    from testcontainers.redis import RedisContainer

    with RedisContainer("redis:7") as container:
        yield f"redis://{container.get_container_host_ip()}:{container.get_exposed_port(6379)}/0"


@pytest.fixture(scope="session")
def emulator_thread() -> Iterator[EmulatorThread]:
    thread = EmulatorThread()
    thread.start()
    yield thread
    thread.stop()


@pytest.fixture
def emulator(emulator_thread: EmulatorThread) -> Iterator[EmulatorThread]:
    emulator_thread.emulator.state.reset()
    yield emulator_thread
    emulator_thread.emulator.state.reset()


@pytest.fixture
def emulator_state(emulator: EmulatorThread) -> EmulatorState:
    return emulator.emulator.state


@dataclass
class RunningWorker:
    settings: Settings
    stop: asyncio.Event
    task: asyncio.Task[None]

    async def shutdown(self, timeout: float = 30) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, timeout)


def worker_settings(amqp_url: str, base_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "amqp_url": amqp_url,
        "embed_backend": "gemini",
        "gemini_api_key": "test-key-not-secret",
        "gemini_base_url": base_url,
        "batch_max_wait_ms": 20,
        "retry_base_delay_ms": 10,
        "retry_max_delay_ms": 100,
        "shutdown_grace_s": 10,
        "allowed_models": ["text-embedding-004"],
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


@pytest.fixture
async def start_worker(vhost: str, emulator: EmulatorThread) -> AsyncIterator[Callable[..., Any]]:
    """Start in-process workers on this test's vhost; each returns once it is consuming."""
    running: list[RunningWorker] = []

    async def start(**overrides: Any) -> RunningWorker:
        url = overrides.pop("amqp_url", vhost)  # a test may connect as another user
        settings = worker_settings(url, emulator.base_url, **overrides)
        stop, ready = asyncio.Event(), asyncio.Event()
        task = asyncio.create_task(run_worker(settings, stop=stop, ready=ready))
        ready_wait = asyncio.create_task(ready.wait())
        done, _ = await asyncio.wait({task, ready_wait}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            ready_wait.cancel()
            task.result()  # raises the start-up error
        assert ready_wait in done, "worker did not become ready"
        worker = RunningWorker(settings, stop, task)
        running.append(worker)
        return worker

    yield start
    for worker in running:
        if not worker.task.done():
            await worker.shutdown()
