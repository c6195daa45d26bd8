"""The caller library and the `embed` command against a real worker."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.integration.helpers import assert_right_vectors
from worker.client import EmbedClient, SyncEmbedClient
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
