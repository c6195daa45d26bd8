"""Child processes (``embed-worker run``, the emulator, reference workers) for the bench and the end-to-end tests:
start one, wait for a line of its output (``ready:``), read what it wrote, signal it, measure its memory and CPU,
stop it.

It lives in ``worker``, beside neither of its users, so that the tests do not depend on the bench (nor the bench on
the tests); the worker itself never imports it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence


class ManagedProcess:
    """A child whose combined output is collected by a thread, so waiting on a line never blocks it."""

    def __init__(
        self, args: Sequence[str], env: dict[str, str] | None = None, *, python: bool = True, inherit_env: bool = True
    ):
        argv = [sys.executable, *args] if python else list(args)
        full_env = dict(os.environ) if inherit_env else {}
        full_env.update(env or {})
        self.proc = subprocess.Popen(argv, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.line_times: list[float] = []  # perf_counter when each line was read
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.line_times.append(time.perf_counter())
                self.lines.append(line)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for_line(self, fragment: str, timeout: float = 30, *, count: int = 1) -> str:
        """The ``count``-th line containing ``fragment``, waiting for it as the child writes."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [line for line in self.lines if fragment in line]
                if len(found) >= count:
                    return found[count - 1]
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(f"no line containing {fragment!r}; output:\n{''.join(self.lines)}")
                self._cond.wait(remaining)

    def line_time(self, fragment: str) -> float:
        """When the first line containing ``fragment`` was read (after ``wait_for_line`` found it)."""
        with self._cond:
            return next(t for line, t in zip(self.lines, self.line_times, strict=True) if fragment in line)

    @property
    def output(self) -> str:
        with self._cond:
            return "".join(self.lines)

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout: float = 30) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(5)
        return code

    def peak_rss_mb(self) -> float | None:
        """Peak resident memory so far (VmHWM), while the process lives."""
        return self._status_mb("VmHWM:")

    def rss_mb(self) -> float | None:
        """Resident memory now (VmRSS), while the process lives."""
        return self._status_mb("VmRSS:")

    def _status_mb(self, field: str) -> float | None:
        try:
            with open(f"/proc/{self.proc.pid}/status") as status:
                for line in status:
                    if line.startswith(field):
                        return int(line.split()[1]) / 1024
        except OSError:
            return None
        return None

    def cpu_seconds(self) -> float | None:
        """User plus system CPU time the process has used so far (from /proc/PID/stat)."""
        try:
            with open(f"/proc/{self.proc.pid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            return None
        ticks = os.sysconf("SC_CLK_TCK")
        return (int(fields[11]) + int(fields[12])) / ticks  # utime, stime (fields 14 and 15 of stat)

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM, then SIGKILL if it does not exit in time."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
