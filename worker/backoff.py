"""The one back-off rule: exponential and capped, with full jitter unless told otherwise (AWS Architecture Blog,
"Exponential Backoff and Jitter").

Upstream retries, broker connection attempts and the deferred lane's pauses keep the jitter, so that a fleet
that failed together does not retry together. The supervisor's restarts of its own children turn it off
(``jitter=False``): one parent spreads nothing across a fleet, and a fixed schedule is predictable for operators.
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
