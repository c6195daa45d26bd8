"""Real `python -m worker run` processes for the tests that kill, signal or read their output."""

from __future__ import annotations

import os
from typing import Any

from worker.processes import ManagedProcess


class WorkerProcess(ManagedProcess):
    def __init__(self, env: dict[str, str]):
        super().__init__(["-m", "worker", "run"], {**self.clean_env(), **env}, inherit_env=False)

    @staticmethod
    def clean_env() -> dict[str, str]:
        """The test's environment without worker settings, so none leak into a child."""
        return {k: v for k, v in os.environ.items() if not k.startswith(("GEMINI_", "AMQP_", "BATCH_"))}


def worker_env(amqp_url: str, base_url: str, **extra: Any) -> dict[str, str]:
    env = {
        "AMQP_URL": amqp_url,
        "GEMINI_API_KEY": "test-key-not-secret",
        "GEMINI_BASE_URL": base_url,
        "BATCH_MAX_WAIT_MS": "20",
        "AMQP_RECONNECT_INTERVAL_S": "0.5",
        "RETRY_BASE_DELAY_MS": "10",
        "RETRY_MAX_DELAY_MS": "100",
    }
    env.update({k.upper(): str(v) for k, v in extra.items()})
    return env
