"""Start-up as a new user meets it: every mistake is one readable line and a documented exit code, and a broker
that is not up yet is waited for. Real `embed-worker` processes."""

from __future__ import annotations

import asyncio
import socket
import sys

import pytest

from tests.e2e.processes import WorkerProcess, worker_env
from tests.integration.proxy import Proxy
from worker.emulator import EmulatorThread
from worker.processes import ManagedProcess

pytestmark = pytest.mark.integration

BAD_CONFIGURATION = 2
UNREACHABLE = 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize(
    ("env", "fragment", "code"),
    [
        ({"AMQP_URL": "amqp://guest:wrong@127.0.0.1:5672/"}, "refused the login", BAD_CONFIGURATION),
        ({"AMQP_URL": "amqp://guest:guest@127.0.0.1:5672/no-such-vhost"}, "vhost does not exist", BAD_CONFIGURATION),
        ({"REPLY_TO_PATTERN": "("}, "REPLY_TO_PATTERN: not a valid regular expression", BAD_CONFIGURATION),
        ({"ALLOWED_MODELS": "not-json"}, "ALLOWED_MODELS: cannot be parsed", BAD_CONFIGURATION),
        ({"METRICS_PORT": "notaport"}, "METRICS_PORT", BAD_CONFIGURATION),
        ({"REDIS_URL": "http://not-redis"}, "REDIS_URL: must start with redis://", BAD_CONFIGURATION),
        (
            {"AMQP_URL": "amqp://guest:guest@127.0.0.1:9/", "AMQP_CONNECT_TIMEOUT_S": "1"},
            "no broker answered at amqp://guest:***@127.0.0.1:9/ within AMQP_CONNECT_TIMEOUT_S=1 s",
            UNREACHABLE,
        ),
    ],
)
async def test_start_up_mistakes_are_one_readable_line(
    vhost: str, emulator: EmulatorThread, env: dict[str, str], fragment: str, code: int
) -> None:
    worker = WorkerProcess({**worker_env(vhost, emulator.base_url), **env})
    assert await asyncio.to_thread(worker.wait, 30) == code
    assert fragment in worker.output
    assert "Traceback" not in worker.output and "guest:wrong" not in worker.output


@pytest.mark.parametrize(
    ("url", "port"),
    [
        ("amqp://guest:wrong@127.0.0.1:notaport/", "notaport"),
        ("amqp://guest:wrong@127.0.0.1:99999/", "99999"),
        ("amqp://guest:wrong@127.0.0.1:0/", "0"),
        ("amqp://guest:wrong@127.0.0.1:5672/,amqps://guest:wrong@[::1]:56x72/", "56x72"),  # a cluster's second node
    ],
)
async def test_a_bad_port_in_amqp_url_is_one_line(vhost: str, emulator: EmulatorThread, url: str, port: str) -> None:
    worker = WorkerProcess({**worker_env(vhost, emulator.base_url), "AMQP_URL": url})
    assert await asyncio.to_thread(worker.wait, 30) == BAD_CONFIGURATION
    lines = worker.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in worker.output, worker.output
    assert "AMQP_URL" in lines[0] and f"port '{port}'" in lines[0] and "wrong" not in lines[0]


async def test_a_port_in_use_is_a_configuration_error(vhost: str, emulator: EmulatorThread) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = worker_env(vhost, emulator.base_url, metrics_port=port, metrics_host="127.0.0.1")
        worker = WorkerProcess(env)
        assert await asyncio.to_thread(worker.wait, 30) == BAD_CONFIGURATION
    assert f"METRICS_PORT: cannot serve metrics on 127.0.0.1:{port}" in worker.output
    assert "Traceback" not in worker.output


async def test_a_broker_that_is_not_up_yet_is_waited_for(vhost: str, emulator: EmulatorThread) -> None:
    """Orchestrators start containers in any order: the worker retries (logging each attempt) until it answers."""
    port = _free_port()
    url = vhost.replace("127.0.0.1:5672", f"127.0.0.1:{port}")
    worker = WorkerProcess(worker_env(url, emulator.base_url, amqp_connect_timeout_s=60))
    try:
        await asyncio.to_thread(worker.wait_for_line, "attempt 2, retrying", 30)
        proxy = await Proxy("127.0.0.1", 5672).start(port)  # the broker comes up
        await asyncio.to_thread(worker.wait_for_line, "ready:", 30)
        await proxy.cut()
    finally:
        worker.stop(10)


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["embed", "hi", "--url", "amqp://guest:guest@127.0.0.1:9/"], "cannot connect to the broker at"),
        (["flush", "--url", "amqp://guest:guest@127.0.0.1:9/"], "cannot connect to the broker at"),
    ],
)
async def test_client_commands_without_a_broker_say_so(args: list[str], fragment: str) -> None:
    proc = ManagedProcess(["-m", "worker", *args], {"PYTHONPATH": ":".join(sys.path)})
    assert await asyncio.to_thread(proc.wait, 30) == UNREACHABLE
    assert fragment in proc.output and "Traceback" not in proc.output
