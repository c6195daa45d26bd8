"""Process faults with real worker processes: SIGTERM drain, SIGKILL mid-batch, secrets in logs."""

from __future__ import annotations

import asyncio
import signal
import uuid

import pytest

from tests.conftest import Broker
from tests.e2e.processes import WorkerProcess, worker_env
from tests.integration.helpers import RawCaller, assert_right_vectors, queue_depth, wait_until
from worker.emulator import EmulatorState, EmulatorThread, Fault

pytestmark = pytest.mark.integration


async def test_sigterm_flushes_partial_batches_answers_and_exits_zero(
    vhost: str, emulator: EmulatorThread, processes: list[WorkerProcess]
) -> None:
    # A huge max wait: only the shutdown flush can send these requests.
    worker = WorkerProcess(worker_env(vhost, emulator.base_url, batch_max_size=100, batch_max_wait_ms=600_000))
    processes.append(worker)
    await asyncio.to_thread(worker.wait_for_line, "ready:")
    texts = [f"pending {i}" for i in range(5)]
    async with RawCaller(vhost) as caller:
        cids = [await caller.send({"text": t}) for t in texts]
        await wait_until(lambda: queue_depth(vhost, "embed.requests"), 0)  # all five are in the worker's hands
        worker.signal(signal.SIGTERM)
        replies = [await caller.reply(cid) for cid in cids]
    for text, reply in zip(texts, replies, strict=True):
        assert_right_vectors(reply, [text])
    assert await asyncio.to_thread(worker.wait, 30) == 0
    assert emulator.emulator.state.batch_sizes == [5]


async def test_sigkill_mid_batch_loses_nothing_with_two_workers(
    vhost: str, emulator: EmulatorThread, emulator_state: EmulatorState, processes: list[WorkerProcess]
) -> None:
    emulator_state.latency_ms = 200  # batches are in flight for a while
    env = worker_env(vhost, emulator.base_url, batch_max_size=10, max_concurrent_batches=2, prefetch_count=30)
    victim, survivor = WorkerProcess(env), WorkerProcess(env)
    processes += [victim, survivor]
    await asyncio.to_thread(victim.wait_for_line, "ready:")
    await asyncio.to_thread(survivor.wait_for_line, "ready:")
    texts = [f"request {i}" for i in range(120)]
    async with RawCaller(vhost) as caller:
        cids = [await caller.send({"text": t}) for t in texts]
        await caller.reply(cids[0], timeout=30)  # work is flowing; both workers hold deliveries
        victim.kill()
        replies = [await caller.reply(cid, timeout=60) for cid in cids]
    for text, reply in zip(texts, replies, strict=True):
        assert_right_vectors(reply, [text])


async def test_secrets_never_reach_logs_even_at_debug(
    broker: Broker,
    vhost: str,
    emulator: EmulatorThread,
    emulator_state: EmulatorState,
    processes: list[WorkerProcess],
) -> None:
    vhost_name = vhost.rsplit("/", 1)[1]
    user, password, api_key = f"u{uuid.uuid4().hex[:8]}", f"pw-{uuid.uuid4().hex}", f"AIza-{uuid.uuid4().hex}"
    broker.ctl(["add_user", user, password])
    broker.ctl(["set_permissions", "-p", vhost_name, user, ".*", ".*", ".*"])
    try:
        url = vhost.replace("guest:guest@", f"{user}:{password}@")
        env = worker_env(url, emulator.base_url, gemini_api_key=api_key, log_level="DEBUG", retry_max_attempts=2)
        worker = WorkerProcess(env)
        processes.append(worker)
        await asyncio.to_thread(worker.wait_for_line, "ready:")
        async with RawCaller(vhost) as caller:
            ok = await caller.call({"text": "fine"})
            bad = await caller.call({"text": "x", "model": "nope"})
            emulator_state.faults = [Fault(403, times=-1)]
            denied = await caller.call({"text": "denied"})
            emulator_state.faults = []
        worker.signal(signal.SIGTERM)
        assert await asyncio.to_thread(worker.wait, 30) == 0
    finally:
        broker.ctl(["delete_user", user])
    output = worker.output
    assert "batch " in output and "DEBUG" in output  # it really logged at debug level
    assert_right_vectors(ok, ["fine"])
    assert bad["error"]["code"] == "invalid_request" and denied["error"]["code"] == "upstream_error"
    for secret in (password, api_key):
        assert secret not in output
        assert secret not in str(bad) + str(denied)
    assert "***" in output  # the broker URL is logged, redacted


def test_missing_api_key_is_a_clear_start_up_error() -> None:
    worker = WorkerProcess({"AMQP_URL": "amqp://guest:guest@127.0.0.1:5672/"})
    assert worker.wait(30) != 0
    assert "GEMINI_API_KEY is not set" in worker.output
    assert "Traceback" not in worker.output


async def test_invalid_setting_fails_readably() -> None:
    worker = WorkerProcess({"GEMINI_API_KEY": "k", "BATCH_MAX_SIZE": "500"})
    assert await asyncio.to_thread(worker.wait, 30) != 0
    assert "BATCH_MAX_SIZE" in worker.output and "Traceback" not in worker.output
