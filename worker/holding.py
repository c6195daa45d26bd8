"""What one worker holds, in bytes: the bodies of the messages it has taken and not yet settled, both lanes.

A prefetch window counts messages, and a message may be 4 MiB (MAX_BODY_BYTES): 900 of them would be 3.6 GB.
``HeldBytes`` is the budget (MAX_HELD_BYTES) the lanes draw on: the RPC consumer asks it how many more deliveries
it may let the broker send (``credit``) and stops consuming while it is spent; the deferred lane stops taking
messages for its round. One message larger than the whole budget is still taken when nothing else is held, so it
is served alone rather than never.

The broker cannot be told "at most N bytes" (RabbitMQ ignores ``prefetch_size``), only "at most N messages" per
consumer, fixed when the consumer starts. So a credit is a count sized from the largest body among the last
``RECENT`` deliveries, MAX_BODY_BYTES before any has arrived. If the stream turns from small to large messages
after the credit grew, the worker may briefly hold more than the budget, up to the credit in force times the new
size, and then takes nothing until it is back under it; credit grows at most twofold at a time to keep that small.

Pure bookkeeping and asyncio: no broker here. ``release_memory`` gives freed memory back to the system (glibc).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import logging
from collections import deque

log = logging.getLogger(__name__)

RECENT = 32  # deliveries whose sizes size the next credit


class HeldBytes:
    def __init__(self, limit: int, largest: int):
        self.limit = limit
        self._largest = largest  # what a message not seen yet may weigh (MAX_BODY_BYTES)
        self.held = 0
        self.peak = 0  # the most held since the last trim
        self.most = 0  # the most held since start
        self._released = 0  # bytes given back since the last cycle collection
        self._recent: deque[int] = deque(maxlen=RECENT)
        self._room = asyncio.Event()
        self._room.set()

    def take(self, size: int) -> None:
        self.held += size
        self.peak = max(self.peak, self.held)
        self.most = max(self.most, self.held)
        self._recent.append(size)
        if self.held >= self.limit:
            self._room.clear()

    def give(self, size: int) -> None:
        self.held -= size
        if self.held < self.limit:
            self._room.set()
        self._released += size
        if self._released >= COLLECT_AFTER_BYTES:
            # What held these bodies (httpx's request and response objects of the call, which form reference
            # cycles) is freed only by the cycle collector, and that runs by object counts (cli.py raises them):
            # a few hundred 4 MB requests allocate few objects. Measured: RSS grew by a body per request served,
            # 850 MB after 136 image requests, until a full collection. A young collection per 32 MiB is ~1 ms.
            self._released = 0
            gc.collect(1)
        if not self.held and self.peak >= TRIM_AFTER_BYTES:
            self.peak = 0
            release_memory()

    @property
    def spent(self) -> bool:
        return self.held >= self.limit

    def estimate(self) -> int:
        """The weight to assume for each message the broker may still send."""
        return max(self._recent, default=self._largest) or 1

    def credit(self, ceiling: int, limit: int | None = None) -> int:
        """How many more messages may be let in now, at most ``ceiling``, while at most ``limit`` bytes (the whole
        budget by default) are held: 0 while the budget cannot afford one, except that with nothing held one is
        always let in (a message larger than the budget is served alone)."""
        n = ((self.limit if limit is None else limit) - self.held) // self.estimate()
        if n <= 0:
            return 0 if self.held else 1
        return min(n, ceiling)

    async def wait_room(self) -> None:
        await self._room.wait()

    def share(self, reserve: int = 0) -> HeldShare:
        """A lane's view of this budget: the same bytes held, counted together, but the lane stops taking messages
        ``reserve`` bytes earlier, leaving that room to the others (bulk leaves it to queries)."""
        return HeldShare(self, reserve)


class HeldShare:
    """What one lane may hold of a ``HeldBytes``: everything it takes and gives is counted in the whole budget;
    ``limit`` is the whole budget less the room this lane leaves to others."""

    def __init__(self, budget: HeldBytes, reserve: int):
        self.budget = budget
        self.limit = max(1, budget.limit - reserve)

    @property
    def held(self) -> int:
        return self.budget.held

    @property
    def spent(self) -> bool:
        return self.budget.held >= self.limit

    def take(self, size: int) -> None:
        self.budget.take(size)

    def give(self, size: int) -> None:
        self.budget.give(size)

    def estimate(self) -> int:
        return self.budget.estimate()

    def credit(self, ceiling: int) -> int:
        return self.budget.credit(ceiling, self.limit)


# ---------------------------------------------------------------------- giving memory back
# glibc serves large allocations (our message bodies, upstream responses) with mmap, and gives them back on free.
# But each such free raises its mmap threshold to the freed size (up to 32 MiB), so after one burst of 4 MB bodies
# the next ones come from the heap, which it keeps: measured, RSS stayed at 2.1 GB after a drain. Setting the
# threshold explicitly turns that adjustment off (mallopt(3)), and malloc_trim hands back the heap's free top.
MMAP_THRESHOLD_BYTES = 128 * 1024  # glibc's own starting value, kept fixed
TRIM_AFTER_BYTES = 16 * 1024 * 1024
COLLECT_AFTER_BYTES = 32 * 1024 * 1024  # after holding this much at once, trim when the worker holds nothing again
_M_MMAP_THRESHOLD = -3
_glibc: list[ctypes.CDLL] = []  # the C library, once tune_allocator found it is glibc


def tune_allocator() -> bool:
    """Fix glibc's mmap threshold (see above); False where the C library is not glibc."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
    except (OSError, AttributeError):
        return False
    if not libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES):
        return False
    _glibc[:] = [libc]
    return True


def release_memory() -> None:
    for libc in _glibc:
        libc.malloc_trim(0)
