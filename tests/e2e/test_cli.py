"""The client commands (`embed`, `flush`) as a user meets them: each mistake is one readable line, no traceback,
and the documented exit code (README, Commands). Real `embed-worker` processes; workers in-process."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Broker
from tests.integration.helpers import queue_depth
from worker import topology
from worker.amqp.connection import declare_once
from worker.processes import ManagedProcess
from worker.vectors import expected_vector

pytestmark = pytest.mark.integration

OTHER = 1
BAD_CONFIGURATION = 2
NO_WORKER = 3
COMMANDS = [["embed", "hi"], ["flush"]]
NO_DEFERRED_WORKER = "no worker of the deferred lane is listening"


@pytest.fixture
def cli() -> Iterator[Any]:
    """Start `python -m worker ARGS...`; every process started is killed when the test ends."""
    started: list[ManagedProcess] = []

    def start(*args: str, env: dict[str, str] | None = None) -> ManagedProcess:
        proc = ManagedProcess(["-m", "worker", *args], {"PYTHONPATH": ":".join(sys.path), **(env or {})})
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.kill()


async def exit_code(proc: ManagedProcess, timeout: float = 30) -> int:
    """Its exit code; fails the test (subprocess.TimeoutExpired) if it has not exited within ``timeout``."""
    return await asyncio.to_thread(proc.wait, timeout)


def one_clean_line(output: str) -> str:
    lines = output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in output, output
    return lines[0]


@pytest.mark.parametrize("command", COMMANDS, ids=["embed", "flush"])
@pytest.mark.parametrize("port", ["notaport", "99999", "0"])
async def test_a_bad_port_in_amqp_url_is_one_line_and_a_configuration_error(
    cli: Any, command: list[str], port: str
) -> None:
    proc = cli(*command, env={"AMQP_URL": f"amqp://guest:s3cret@127.0.0.1:{port}/"})
    assert await exit_code(proc) == BAD_CONFIGURATION
    line = one_clean_line(proc.output)
    assert "AMQP_URL" in line and f"port '{port}'" in line and "s3cret" not in line


@pytest.mark.parametrize("command", COMMANDS, ids=["embed", "flush"])
async def test_a_bad_port_in_url_names_the_option(cli: Any, command: list[str]) -> None:
    proc = cli(*command, "--url", "amqp://guest:s3cret@127.0.0.1:5672/,amqp://guest:s3cret@127.0.0.2:x5672/")
    assert await exit_code(proc) == BAD_CONFIGURATION
    line = one_clean_line(proc.output)
    assert "--url" in line and "port 'x5672'" in line and "127.0.0.2" in line and "s3cret" not in line


@pytest.mark.parametrize("command", COMMANDS, ids=["embed", "flush"])
async def test_a_vhost_that_does_not_exist_is_a_configuration_error(
    cli: Any, broker: Broker, command: list[str]
) -> None:
    proc = cli(*command, "--url", broker.vhost_url("no-such-vhost"))
    assert await exit_code(proc) == BAD_CONFIGURATION
    assert "the vhost does not exist" in one_clean_line(proc.output)  # the words `run` uses


@pytest.mark.parametrize("command", COMMANDS, ids=["embed", "flush"])
async def test_a_refused_login_is_a_configuration_error(cli: Any, command: list[str]) -> None:
    proc = cli(*command, "--url", "amqp://guest:wrong@127.0.0.1:5672/")
    assert await exit_code(proc) == BAD_CONFIGURATION
    line = one_clean_line(proc.output)
    assert "refused the login" in line and "guest:wrong" not in line


@pytest.mark.parametrize("command", COMMANDS, ids=["embed", "flush"])
@pytest.mark.parametrize("timeout", ["0", "-1", "nan", "inf"])
async def test_a_timeout_that_is_not_a_positive_number_is_refused_at_parsing(
    cli: Any, command: list[str], timeout: str
) -> None:
    proc = cli(*command, f"--timeout={timeout}", "--url", "amqp://guest:guest@127.0.0.1:9/")
    assert await exit_code(proc) == BAD_CONFIGURATION  # argparse's code for a usage error
    assert "argument --timeout: must be a positive number of seconds" in proc.output
    assert "Traceback" not in proc.output


async def test_flush_says_at_once_when_no_worker_of_the_deferred_lane_listens(
    cli: Any, start_worker: Any, vhost: str
) -> None:
    await start_worker()  # the RPC lane only (no REDIS_URL): nobody hears flush requests
    proc = cli("flush", "--url", vhost)  # default --timeout: 300 s
    assert await exit_code(proc) == NO_WORKER
    assert NO_DEFERRED_WORKER in one_clean_line(proc.output)


async def test_flush_on_a_vhost_where_no_worker_ever_started(cli: Any, vhost: str) -> None:
    proc = cli("flush", "--url", vhost)
    assert await exit_code(proc) == NO_WORKER
    assert NO_DEFERRED_WORKER in one_clean_line(proc.output)


async def test_flush_with_a_worker_of_the_deferred_lane(
    cli: Any, start_worker: Any, vhost: str, redis_url: str
) -> None:
    await start_worker(redis_url=redis_url, deferred_flush_interval_s=3600, deferred_wake_messages=0)
    proc = cli("flush", "--url", vhost)
    assert await exit_code(proc) == 0, proc.output
    assert one_clean_line(proc.output) == "flushed: 0 vectors written"


async def test_embed_prints_the_vector(cli: Any, start_worker: Any, vhost: str) -> None:
    await start_worker()
    proc = cli("embed", "hello world", "--url", vhost)
    assert await exit_code(proc) == 0, proc.output
    want = expected_vector("hello world", model="gemini-embedding-001", task_type=None, dims=None, full_dims=3072)
    head = ", ".join(f"{x:.4f}" for x in want[:4])
    assert one_clean_line(proc.output) == f"'hello world': 3072 dims [{head}, ...]"


async def test_embed_on_a_vhost_where_no_worker_ever_started(cli: Any, vhost: str) -> None:
    """No queue embed.requests: the broker returns the request, so say so instead of waiting out the timeout."""
    proc = cli("embed", "hi", "--url", vhost, "--timeout", "300")
    assert await exit_code(proc) == NO_WORKER
    assert "embed.requests" in one_clean_line(proc.output)


async def test_embed_with_no_worker_running_still_times_out(cli: Any, start_worker: Any, vhost: str) -> None:
    """The queue exists (a worker declared it) but nobody consumes: the request waits there, as before."""
    worker = await start_worker()
    await worker.shutdown()
    proc = cli("embed", "hi", "--url", vhost, "--timeout", "0.5")
    assert await exit_code(proc) == OTHER
    assert "no reply in time" in one_clean_line(proc.output)


@pytest.mark.parametrize(
    ("args", "lane_queue"),
    [
        (["--file", "{file}"], topology.BULK_QUEUE),  # a file is ingestion: bulk unless told otherwise
        (["--file", "{file}", "--lane", "default"], topology.QUEUE),
        (["a query"], topology.QUEUE),
        (["a query", "--lane", "bulk"], topology.BULK_QUEUE),
    ],
)
async def test_embed_sends_a_file_on_the_bulk_lane_and_texts_on_the_default_lane(
    cli: Any, vhost: str, tmp_path: Path, args: list[str], lane_queue: str
) -> None:
    """No worker consumes: the request waits in the queue of the lane it was sent on."""
    await declare_once(vhost)
    lines = tmp_path / "docs.txt"
    lines.write_text("one document\n")
    proc = cli("embed", *(a.format(file=lines) for a in args), "--url", vhost, "--timeout", "0.5")
    assert await exit_code(proc) == OTHER
    assert await queue_depth(vhost, lane_queue) == 1
    other = topology.QUEUE if lane_queue == topology.BULK_QUEUE else topology.BULK_QUEUE
    assert await queue_depth(vhost, other) == 0
