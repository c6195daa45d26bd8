"""`embed-worker run --processes N`: children restart after a crash; SIGTERM stops them all cleanly."""

from __future__ import annotations

import asyncio
import os
import re
import signal

import pytest

from tests.e2e.processes import WorkerProcess, worker_env
from tests.integration.helpers import RawCaller, assert_right_vectors
from worker.emulator import EmulatorThread
from worker.processes import ManagedProcess

pytestmark = pytest.mark.integration


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_supervisor_restarts_a_killed_child_and_stops_cleanly(vhost: str, emulator: EmulatorThread) -> None:
    env = worker_env(vhost, emulator.base_url)
    parent = ManagedProcess(
        ["-m", "worker", "run", "--processes", "2"], {**WorkerProcess.clean_env(), **env}, inherit_env=False
    )
    try:
        await asyncio.to_thread(parent.wait_for_line, "ready:", 30, count=2)
        pids = [int(p) for p in re.findall(r"started worker \d \(pid (\d+)\)", parent.output)]
        os.kill(pids[0], signal.SIGKILL)
        await asyncio.to_thread(parent.wait_for_line, "restarting in", 30)
        await asyncio.to_thread(parent.wait_for_line, "started worker 0 (pid", 30, count=2)
        await asyncio.to_thread(parent.wait_for_line, "ready:", 30, count=3)

        async with RawCaller(vhost) as caller:
            texts = [f"supervised {i}" for i in range(30)]
            cids = [await caller.send({"text": t}) for t in texts]
            for text, cid in zip(texts, cids, strict=True):
                assert_right_vectors(await caller.reply(cid), [text])

        children = [int(p) for p in re.findall(r"started worker \d \(pid (\d+)\)", parent.output)]
        assert len(children) == 3
        parent.signal(signal.SIGTERM)
        assert await asyncio.to_thread(parent.wait, 40) == 0
        assert "all workers stopped" in parent.output
        assert not any(_alive(pid) for pid in children)
    finally:
        parent.kill()
