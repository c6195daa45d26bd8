"""Real `python -m worker run` processes for the tests that kill, signal or read their output."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any


class WorkerProcess:
    def __init__(self, env: dict[str, str]):
        full_env = {k: v for k, v in os.environ.items() if not k.startswith(("GEMINI_", "AMQP_", "BATCH_"))}
        full_env.update(env)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "worker", "run"],
            env=full_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for_line(self, fragment: str, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines:
                    if fragment in line:
                        return line
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(f"no line containing {fragment!r}; output:\n{self.output}")
                self._cond.wait(remaining)

    @property
    def output(self) -> str:
        with self._cond:
            return "".join(self.lines)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(5)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)


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
