"""Shared fixtures: a real RabbitMQ (AMQP_URL, else testcontainers), a vhost per test, the emulator,
and in-process workers wired exactly as ``embed-worker run`` wires them.

The broker's CLI is RABBITMQCTL, a command prefix (split like a shell would; default ``rabbitmqctl``), so that
``broker.ctl`` manages the broker AMQP_URL points at, e.g. the RabbitMQ 4 node of scripts/rabbitmq4:
    AMQP_URL=amqp://guest:guest@127.0.0.1:5700/ RABBITMQCTL="bash /abs/path/scripts/rabbitmq4 ctl" pytest ...
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import pytest
import redis

from worker.app import run_worker
from worker.emulator import EmulatorState, EmulatorThread
from worker.settings import Settings

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
_CONNECTION_NAME = re.compile(r'\{"connection_name","((?:[^"\\]|\\.)*)"\}')


@dataclass(frozen=True)
class Connection:
    pid: str  # what ``close_connection`` takes
    vhost: str
    name: str  # the client's connection_name property ("" if it sent none), e.g. "embed-worker-publish"


@dataclass
class Broker:
    url: str
    ctl: Callable[[list[str]], str]  # runs rabbitmqctl with these arguments, returns its output

    @functools.cached_property
    def status(self) -> dict[str, Any]:
        """``rabbitmqctl status`` of the node ``ctl`` manages, read once ({} if it is not JSON)."""
        try:
            status: dict[str, Any] = json.loads(self.ctl(["-q", "status", "--formatter", "json"]))
        except (ValueError, subprocess.CalledProcessError):
            return {}
        return status

    @functools.cached_property
    def version(self) -> str:
        """The server's RabbitMQ version, e.g. "3.10.8" or "4.0.5" (read once)."""
        version = self.status.get("rabbitmq_version")
        if isinstance(version, str) and version:
            return version
        return self.ctl(["-q", "version"]).strip()  # the CLI's version: the same release as the node's

    @property
    def version_info(self) -> tuple[int, ...]:
        """``version`` as numbers, for ``if broker.version_info >= (4,)`` or a skip."""
        numbers = []
        for part in self.version.split("."):
            digits = "".join(ch for ch in part if ch.isdigit())
            if not digits:
                break
            numbers.append(int(digits))
        return tuple(numbers)

    def connections(self, vhost: str) -> list[Connection]:
        """The AMQP connections to one vhost (its name, or a URL of it), whoever opened them.

        ``rabbitmqctl list_connections`` lists the whole node and ignores ``-p`` (3.10 and 4.0 alike), so the
        vhost column is compared exactly here: other tests' or programs' connections on the broker never count."""
        if "://" in vhost:
            vhost = unquote(urlsplit(vhost).path[1:]) or "/"
        listing = self.ctl(["list_connections", "-q", "--no-table-headers", "pid", "vhost", "client_properties"])
        found = []
        for line in listing.splitlines():
            pid, _, rest = line.partition("\t")
            line_vhost, _, properties = rest.partition("\t")
            if pid.startswith("<") and line_vhost == vhost:
                match = _CONNECTION_NAME.search(properties)
                found.append(Connection(pid, line_vhost, match.group(1) if match else ""))
        return found

    @functools.cached_property
    def vhosts(self) -> VhostPool:
        return VhostPool(self.ctl)

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


def _ctl_command() -> list[str]:
    """RABBITMQCTL as a command prefix (default: rabbitmqctl on PATH)."""
    return shlex.split(os.environ.get("RABBITMQCTL", "")) or ["rabbitmqctl"]


def _local_ctl(args: list[str]) -> str:
    return subprocess.run([*_ctl_command(), *args], check=True, capture_output=True, text=True, timeout=60).stdout


def _check_ctl_manages(broker: Broker) -> None:
    """Fail early, and say why, when RABBITMQCTL manages another node than the one AMQP_URL points at (the vhost
    fixture would create vhosts on one broker and the tests connect to another)."""
    parts = urlsplit(broker.url)
    if parts.hostname not in {"127.0.0.1", "localhost", "::1"}:
        return  # cannot tell a remote or forwarded port from ours
    listeners = broker.status.get("listeners") or []
    ports = {entry.get("port") for entry in listeners if str(entry.get("protocol", "")).startswith("amqp")}
    if ports and (parts.port or 5672) not in ports:
        pytest.fail(
            f"AMQP_URL {parts.hostname}:{parts.port or 5672} is not a listener of the node {shlex.join(_ctl_command())}"
            f" manages (RabbitMQ {broker.version}, AMQP on {sorted(ports)}): set RABBITMQCTL to that broker's CLI",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def broker() -> Iterator[Broker]:
    url = os.environ.get("AMQP_URL", DEFAULT_AMQP_URL)
    if _answers(url) and shutil.which(_ctl_command()[0]):
        local = Broker(url, _local_ctl)
        _check_ctl_manages(local)
        yield local
        local.vhosts.close()
        return
    # No local broker: start one in Docker (needs a Docker engine).
    from testcontainers.rabbitmq import RabbitMqContainer

    with RabbitMqContainer("rabbitmq:3.13") as container:
        host, port = container.get_container_host_ip(), container.get_exposed_port(5672)

        def ctl(args: list[str]) -> str:
            result = container.exec(["rabbitmqctl", *args])
            return result.output.decode()

        yield Broker(f"amqp://guest:guest@{host}:{port}/", ctl)  # its vhosts go with the container


@contextlib.contextmanager
def new_vhost(broker: Broker) -> Iterator[str]:
    """A fresh vhost (its URL) that no other test used, deleted soon after (see ``VhostPool``)."""
    name = broker.vhosts.take()
    try:
        yield broker.vhost_url(name)
    finally:
        broker.vhosts.done(name)


def _erlang_names(names: list[str]) -> str:
    return "[" + ", ".join(f'<<"{name}">>' for name in names) + "]"


class VhostPool:
    """Vhosts made and deleted VHOST_BATCH at a time, each batch in one ``rabbitmqctl eval``. Every rabbitmqctl call
    boots an Erlang VM (0.6-0.8 s here), and a vhost each test took three (add, permissions, delete): about 2 s a
    test, most of the suite's time. Each test still gets a vhost of its own that no test used before; a used one is
    deleted with the next batch of used ones (at most VHOST_BATCH of them linger), the rest at the end."""

    def __init__(self, ctl: Callable[[list[str]], str]):
        self._ctl = ctl
        self._fresh: list[str] = []
        self._used: list[str] = []

    def take(self) -> str:
        if not self._fresh:
            names = [f"test-{uuid.uuid4().hex[:10]}" for _ in range(VHOST_BATCH)]
            self._ctl(
                [
                    "eval",
                    '[begin ok = rabbit_vhost:add(V, <<"tests">>), ok = rabbit_auth_backend_internal:set_permissions('
                    '<<"guest">>, V, <<".*">>, <<".*">>, <<".*">>, <<"tests">>) end || V <- '
                    f"{_erlang_names(names)}].",
                ]
            )
            self._fresh = names
        return self._fresh.pop()

    def done(self, name: str) -> None:
        self._used.append(name)
        if len(self._used) >= VHOST_BATCH:
            self.delete_used()

    def delete_used(self) -> None:
        names, self._used = self._used, []
        if names:
            with contextlib.suppress(Exception):
                self._ctl(["eval", f'[rabbit_vhost:delete(V, <<"tests">>) || V <- {_erlang_names(names)}].'])

    def close(self) -> None:
        self._used += self._fresh
        self._fresh = []
        self.delete_used()


VHOST_BATCH = 16


@pytest.fixture
def vhost(broker: Broker) -> Iterator[str]:
    """A fresh vhost for one test, so the worker's fixed queue names never collide; its URL."""
    with new_vhost(broker) as url:
        yield url


@pytest.fixture(scope="module")
def module_vhost(broker: Broker) -> Iterator[str]:
    """One vhost for a whole module, for tests that name queues of their own (cheaper than a vhost each)."""
    with new_vhost(broker) as url:
        yield url


DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture
def prefix() -> str:
    """A key prefix of this test's own on a shared Redis."""
    return f"test:{uuid.uuid4().hex[:8]}:"


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


# ---------------------------------------------------------------------- Redis servers of a test's own
class OwnRedis:
    """A redis-server of a test's own (extra arguments as on its command line): its configuration is the test's to
    flip (CONFIG SET, REPLICAOF), and it can be stopped and started again, empty, on the same port."""

    def __init__(self, *args: str):
        self.port = free_port()
        self.args = args
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        command = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.process = subprocess.Popen([*command, "--daemonize", "no", *self.args], stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not _redis_answers(self.port):  # a new server offers no "ready" event but its answer
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server {' '.join(self.args)} did not start")
            time.sleep(0.02)

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=2)

    def command(self, *args: Any) -> Any:
        """One command on this server, from the test."""
        with self.client() as client:
            return client.execute_command(*args)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _redis_answers(port: int) -> bool:
    try:
        with redis.Redis(port=port, socket_timeout=0.5, socket_connect_timeout=0.5) as client:
            return bool(client.ping())
    except redis.RedisError:
        return False


@pytest.fixture
def own_redis() -> Iterator[Callable[..., OwnRedis]]:
    """Start redis-servers of this test's own (extra arguments as on the command line); all stopped after it."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed here")  # .ci/run installs it
    started: list[OwnRedis] = []

    def start(*args: str) -> OwnRedis:
        server = OwnRedis(*args)
        started.append(server)
        server.start()
        return server

    yield start
    for server in started:
        server.stop()


# ---------------------------------------------------------------------- traces
@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    """Spans of this test, in memory: a tracer from the SDK installed as the worker's and the gateway's."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from worker import tracing

    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    tracing.install(provider.get_tracer("tests"))
    yield spans
    tracing.uninstall()
    provider.shutdown()
