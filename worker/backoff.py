"""The one back-off rule: full-jitter exponential (AWS Architecture Blog, "Exponential Backoff and Jitter").

Used by upstream retries, broker connection attempts, the deferred lane's pauses and the supervisor's restarts,
so that a fleet that failed together does not retry together.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class Backoff:
    base: float
    cap: float
    jitter: bool = True
    rng: random.Random = field(default_factory=random.Random)

    def delay(self, attempt: int, hint: float | None = None) -> float:
        """Seconds to wait before try ``attempt + 1`` (``attempt`` counts from 1); never shorter than ``hint``
        (the server's own retry-after), which is itself capped."""
        ceiling = min(self.cap, self.base * 2 ** (attempt - 1))
        wait = self.rng.uniform(0, ceiling) if self.jitter else ceiling
        if hint is not None:
            return max(wait, min(hint, self.cap))
        return wait
