"""Who calls the upstream next: an upstream slot and the API's budget, taken together, in lane order.

Every upstream call waits here for two things: a free slot (``AdaptiveConcurrency``'s limit of calls at once) and
room in the API's budget (``ports.Limiter``: RPM, TPM, spend). Calls wait in two queues, urgent (the default lane)
and the rest (bulk, deferred), each in arrival order, and one *head* at a time is chosen from them:

- the first urgent call whenever a slot is free for it, else the first of the others when a slot is free for them;
- non-urgent calls hold at most the limit (MAX_CONCURRENT_BATCHES, lowered after 429s), and all calls together
  the limit and a ``headroom`` above it (half the limit, at least two): so a query arriving while bulk fills
  every slot is sent at once instead of waiting for a bulk call to end (up to a whole upstream call), and bulk
  keeps every slot it has today while queries come and go (measured: ``bench lanes``, README "Lanes");
- non-urgent calls keep a floor (``BULK_MIN_SHARE`` of the limit, at least one slot): while they hold fewer,
  queries leave them that many slots, so a steady stream of queries never starves ingestion;
- the head is chosen only while a slot is free, and it alone waits for the budget, holding nothing, so no bulk
  call sits in a slot or in the budget's window while a query waits for either;
- a non-urgent head still waiting for the budget when an urgent call arrives steps back (its wait is cancelled,
  nothing was counted) and waits again behind it. A call admitted is never cancelled for another.

Slots are taken only by heads, so the slot seen free when the head was chosen is still free once its budget comes
(unless a 429 lowered the limit meanwhile: then one call may run over it).
Pure asyncio: no transport, no SDK.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator, Callable

from worker.lanes import Lane, floor_slots
from worker.ports import Limiter


def headroom(limit: int) -> int:
    """Slots above ``limit`` that only urgent calls may use: queries come one or two at a time, each its own call,
    so two slots serve a steady stream at the default limit of four."""
    return max(2, limit // 2)


class _Ticket:
    """One call waiting to be admitted."""

    __slots__ = ("preempt", "urgent", "wake")

    def __init__(self, urgent: bool):
        self.urgent = urgent
        self.wake = asyncio.Event()  # chosen as head
        self.preempt = asyncio.Event()  # an urgent call arrived while this non-urgent head waited for the budget


class Admission:
    def __init__(
        self,
        limit: Callable[[], int],
        limiter: Limiter,
        *,
        bulk_min_share: float = 0.25,
        on_budget_wait: Callable[[Lane, float], None] | None = None,
    ):
        """``limit()``: how many calls may run at once now (it may change between calls)."""
        self._limit = limit
        self._limiter = limiter
        self._min_share = bulk_min_share
        self._on_budget_wait = on_budget_wait
        self._waiting: dict[bool, deque[_Ticket]] = {True: deque(), False: deque()}  # urgent -> tickets
        self.inflight: dict[bool, int] = {True: 0, False: 0}
        self._head: _Ticket | None = None

    @property
    def waiting(self) -> int:
        return len(self._waiting[True]) + len(self._waiting[False])

    @contextlib.asynccontextmanager
    async def call(
        self, lane: Lane, tokens: int, *, usd: float = 0.0, deadline: float | None = None
    ) -> AsyncIterator[None]:
        """Hold a slot, with this call's ``tokens`` and ``usd`` counted in the budget, for the ``async with`` body.
        ``deadline`` (this loop's monotonic clock): raises ``ports.Unaffordable`` when the budget cannot have room
        by then, at once rather than at the deadline."""
        ticket = _Ticket(lane.urgent)
        self._waiting[ticket.urgent].append(ticket)
        try:
            await self._admit(ticket, lane, tokens, usd, deadline)
        except BaseException:
            with contextlib.suppress(ValueError):
                self._waiting[ticket.urgent].remove(ticket)
            if self._head is ticket:
                self._head = None
            self._dispatch()
            raise
        try:
            yield
        finally:
            self.inflight[ticket.urgent] -= 1
            self._dispatch()

    async def _admit(self, ticket: _Ticket, lane: Lane, tokens: int, usd: float, deadline: float | None) -> None:
        self._dispatch()
        while True:
            await ticket.wake.wait()
            ticket.wake.clear()
            ticket.preempt.clear()
            started = time.monotonic()
            if ticket.urgent:  # never asked to step back: no race to set up
                try:
                    await self._limiter.acquire(tokens, usd=usd, urgent=True, deadline=deadline)
                finally:
                    self._waited(lane, started)
                self._admitted(ticket)
                return
            acquire = asyncio.ensure_future(self._limiter.acquire(tokens, usd=usd, urgent=False, deadline=deadline))
            stepped_back = asyncio.ensure_future(ticket.preempt.wait())
            try:
                await asyncio.wait({acquire, stepped_back}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stepped_back.cancel()
                if not acquire.done():
                    acquire.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await acquire
            self._waited(lane, started)
            if acquire.cancelled():  # an urgent call came first: wait again, still at the front of this queue
                self._head = None
                self._dispatch()
                continue
            acquire.result()  # Unaffordable, or a limiter that failed: raised to the caller
            self._admitted(ticket)
            return

    def _admitted(self, ticket: _Ticket) -> None:
        self._waiting[ticket.urgent].remove(ticket)
        self._head = None
        self.inflight[ticket.urgent] += 1
        self._dispatch()

    def _waited(self, lane: Lane, started: float) -> None:
        if self._on_budget_wait is not None:
            self._on_budget_wait(lane, time.monotonic() - started)

    def _preferred(self) -> _Ticket | None:
        """The next head, or None: none waits, or no slot is free for the ones that wait.

        Slots: non-urgent calls may start while they hold fewer than ``limit`` and all calls fewer than ``limit +
        headroom``; urgent ones while all calls hold fewer than ``limit + headroom``, less the floor slots that
        waiting bulk calls do not hold yet. Where both may start, the urgent call goes first: the floor is room
        kept, not a turn taken."""
        limit = max(1, self._limit())
        room = limit + headroom(limit) - self.inflight[True] - self.inflight[False]
        urgent, rest = self._waiting[True], self._waiting[False]
        owed = max(0, floor_slots(self._min_share, limit) - self.inflight[False]) if rest else 0
        if urgent and room > owed:
            return urgent[0]
        if rest and room > 0 and self.inflight[False] < limit:
            return rest[0]
        return None

    def _dispatch(self) -> None:
        """Choose the next head when there is none and a slot is free; ask a non-urgent head to step back when an
        urgent call should go first."""
        head = self._head
        if head is not None:
            if not head.urgent and self._preferred() is not head:
                head.preempt.set()
            return
        chosen = self._preferred()
        if chosen is not None:
            self._head = chosen
            chosen.wake.set()
