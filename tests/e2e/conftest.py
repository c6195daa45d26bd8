"""Worker processes a test starts are killed when it ends, whatever happened."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.e2e.processes import WorkerProcess


@pytest.fixture
def processes() -> Iterator[list[WorkerProcess]]:
    procs: list[WorkerProcess] = []
    yield procs
    for proc in procs:
        proc.kill()
