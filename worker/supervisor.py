"""``embed-worker run --processes N``: N worker processes under one parent.

The parent forwards SIGTERM/SIGINT to its children, restarts a child that dies unexpectedly (with
exponential back-off, reset once a child has stayed up a while), and exits when every child has
stopped. Each child is an ordinary ``python -m worker run``; with ``METRICS_PORT`` set, child ``i`` serves its
metrics on ``METRICS_PORT + i``.
In containers, prefer one process per container and let the orchestrator do this job.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from types import FrameType

from worker.backoff import Backoff

log = logging.getLogger(__name__)

STABLE_AFTER_S = 30.0  # a child that ran this long resets its back-off
RESTART_BACKOFF = Backoff(base=0.5, cap=30.0, jitter=False)  # 0.5 s doubling to 30 s: predictable for operators


@dataclass
class _Slot:
    index: int
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    failures: int = 0
    restart_at: float | None = None


class Supervisor:
    def __init__(self, processes: int, *, grace_s: float, metrics_port: int | None = None):
        self.slots = [_Slot(i) for i in range(processes)]
        self.grace_s = grace_s
        self.metrics_port = metrics_port
        self.stopping = False

    def _spawn(self, slot: _Slot) -> None:
        env = dict(os.environ)
        if self.metrics_port is not None:
            env["METRICS_PORT"] = str(self.metrics_port + slot.index)
        slot.proc = subprocess.Popen([sys.executable, "-m", "worker", "run"], env=env)
        slot.started = time.monotonic()
        slot.restart_at = None
        log.info("started worker %d (pid %d)", slot.index, slot.proc.pid)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if not self.stopping:
            log.info("%s: stopping %d workers", signal.Signals(signum).name, len(self.slots))
        self.stopping = True
        for slot in self.slots:
            if slot.proc is not None and slot.proc.poll() is None:
                slot.proc.send_signal(signal.SIGTERM)

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        for slot in self.slots:
            self._spawn(slot)
        while not self.stopping:
            now = time.monotonic()
            for slot in self.slots:
                if slot.proc is not None and slot.proc.poll() is not None and slot.restart_at is None:
                    code = slot.proc.returncode
                    slot.failures = 1 if now - slot.started > STABLE_AFTER_S else slot.failures + 1
                    delay = RESTART_BACKOFF.delay(slot.failures)
                    slot.restart_at = now + delay
                    log.warning(
                        "worker %d (pid %d) exited with %s; restarting in %.1fs", slot.index, slot.proc.pid, code, delay
                    )
                if slot.restart_at is not None and now >= slot.restart_at and not self.stopping:
                    self._spawn(slot)
            time.sleep(0.1)
        return self._wait_all()

    def _wait_all(self) -> int:
        deadline = time.monotonic() + self.grace_s + 5
        worst = 0
        for slot in self.slots:
            if slot.proc is None:
                continue
            try:
                code = slot.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("worker %d did not stop in time; killing it", slot.index)
                slot.proc.kill()
                code = slot.proc.wait()
            worst = worst or (code if code not in (0, -signal.SIGTERM) else 0)
        log.info("all workers stopped")
        return worst
