"""Who goes upstream first (worker/admission.py): slots and budget in lane order, the bulk floor, the headroom only
queries use, and the spend window (issue 18). No wall clock: budgets the test opens by hand, time the test moves."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.clock import JumpingTime, ManualTime
from worker.admission import Admission, headroom
from worker.flow import RateLimiter
from worker.lanes import Lane, floor_slots
from worker.ports import Unaffordable


class Gate:
    """A budget the test opens by hand: each ``open`` lets one more call in, in the order the limiter is asked."""

    def __init__(self) -> None:
        self.room = 0
        self.asked = 0  # acquires started (a withdrawn one counts too)
        self.withdrawn = 0  # acquires cancelled before they got room
        self._changed = asyncio.Event()

    async def acquire(
        self, tokens: int, *, usd: float = 0.0, urgent: bool = True, deadline: float | None = None
    ) -> None:
        self.asked += 1
        try:
            while self.room <= 0:
                self._changed.clear()
                await self._changed.wait()
        except asyncio.CancelledError:
            self.withdrawn += 1
            raise
        self.room -= 1

    def open(self, calls: int = 1) -> None:
        self.room += calls
        self._changed.set()

    async def cool_down(self, seconds: float) -> None:
        pass


class Calls:
    """Calls through an ``Admission``: each records when it was admitted and then holds its slot until released."""

    def __init__(self, admission: Admission) -> None:
        self.admission = admission
        self.order: list[str] = []
        self.release: dict[str, asyncio.Event] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}

    def start(self, name: str, lane: Lane) -> None:
        self.release[name] = asyncio.Event()

        async def call() -> None:
            async with self.admission.call(lane, 1):
                self.order.append(name)
                await self.release[name].wait()

        self.tasks[name] = asyncio.create_task(call())

    async def finish(self, *names: str) -> None:
        for name in names:
            self.release[name].set()
        await asyncio.gather(*(self.tasks[name] for name in names))

    async def aclose(self) -> None:
        for event in self.release.values():
            event.set()
        for task in self.tasks.values():
            task.cancel()
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)


async def settle() -> None:
    """Let every task run until it waits on something the test controls."""
    for _ in range(50):
        await asyncio.sleep(0)


def unlimited() -> RateLimiter:
    return RateLimiter()


async def test_a_query_takes_the_budget_before_bulk_calls_that_waited_longer() -> None:
    gate = Gate()
    calls = Calls(Admission(lambda: 8, gate))
    for name in ("b1", "b2", "b3"):
        calls.start(name, Lane.BULK)
    await settle()
    calls.start("q", Lane.DEFAULT)
    await settle()
    assert gate.withdrawn == 1  # the bulk head waiting for the budget stepped back, nothing counted
    gate.open()
    await settle()
    assert calls.order == ["q"]
    gate.open(3)
    await settle()
    assert calls.order == ["q", "b1", "b2", "b3"]  # bulk in its own arrival order
    await calls.aclose()


async def test_a_query_arriving_while_bulk_fills_every_slot_goes_at_once() -> None:
    calls = Calls(Admission(lambda: 4, unlimited()))
    for i in range(6):
        calls.start(f"b{i}", Lane.BULK)
    await settle()
    assert calls.order == ["b0", "b1", "b2", "b3"]  # bulk holds the limit, no more
    calls.start("q", Lane.DEFAULT)
    await settle()
    assert calls.order[-1] == "q"  # the headroom above the limit is the queries'
    await calls.finish("b0")
    await settle()
    assert calls.order[-1] == "b4"  # a query in flight costs bulk none of its slots
    await calls.aclose()


async def test_queries_first_when_a_slot_frees_and_both_lanes_wait() -> None:
    limit = 4
    calls = Calls(Admission(lambda: limit, unlimited(), bulk_min_share=0))
    for i in range(limit + headroom(limit)):
        calls.start(f"q{i}", Lane.DEFAULT)
    await settle()
    calls.start("b", Lane.BULK)
    calls.start("q-late", Lane.DEFAULT)
    await settle()
    await calls.finish("q0")
    await settle()
    assert calls.order[-1] == "q-late"  # arrived after the bulk call, went before it
    await calls.aclose()


@pytest.mark.parametrize(("share", "bulk_runs"), [(0.25, True), (0.0, False)])
async def test_bulk_keeps_its_floor_under_a_steady_stream_of_queries(share: float, bulk_runs: bool) -> None:
    """Queries fill every slot and more keep waiting: with BULK_MIN_SHARE, bulk still gets its floor; without it,
    bulk waits until the queries stop."""
    limit = 4
    calls = Calls(Admission(lambda: limit, unlimited(), bulk_min_share=share))
    full = limit + headroom(limit)
    for i in range(full):
        calls.start(f"q{i}", Lane.DEFAULT)
    await settle()
    calls.start("b", Lane.BULK)
    for i in range(full, full + 10):
        calls.start(f"q{i}", Lane.DEFAULT)
    await settle()
    # every time a query ends, another waits to take its slot: a stream that never lets up
    for i in range(5):
        await calls.finish(f"q{i}")
        await settle()
    assert ("b" in calls.order) is bulk_runs
    await calls.aclose()


async def test_the_floor_is_at_least_one_slot_and_never_more_than_the_limit() -> None:
    assert floor_slots(0.25, 2) == 1 and floor_slots(0.25, 8) == 2 and floor_slots(1.0, 3) == 3
    assert floor_slots(0.0, 8) == 0
    assert headroom(1) == 2 and headroom(4) == 2 and headroom(32) == 16


async def test_a_call_the_budget_cannot_afford_leaves_the_line_and_the_next_goes() -> None:
    class Refuses(Gate):
        async def acquire(
            self, tokens: int, *, usd: float = 0.0, urgent: bool = True, deadline: float | None = None
        ) -> None:
            if deadline is not None:
                raise Unaffordable(30.0)
            await super().acquire(tokens, usd=usd, urgent=urgent, deadline=deadline)

    gate = Refuses()
    admission = Admission(lambda: 2, gate)
    with pytest.raises(Unaffordable):
        async with admission.call(Lane.DEFAULT, 1, deadline=1.0):
            pass
    gate.open()
    async with admission.call(Lane.DEFAULT, 1):
        assert admission.inflight[True] == 1
    assert admission.inflight == {True: 0, False: 0} and admission.waiting == 0


async def test_a_cancelled_waiter_frees_its_place() -> None:
    gate = Gate()
    calls = Calls(Admission(lambda: 2, gate))
    calls.start("b1", Lane.BULK)
    calls.start("b2", Lane.BULK)
    await settle()
    calls.tasks["b1"].cancel()  # its caller gave up while it waited for the budget
    await settle()
    gate.open()
    await settle()
    assert calls.order == ["b2"]
    await calls.aclose()


# ---------------------------------------------------------------------- the in-process budget, on time we move
async def test_process_budget_a_query_overtakes_bulk_waiting_for_the_window() -> None:
    """UPSTREAM_RPM 1 per 10 s in process scope: the bulk call waiting for the window steps back for a query that
    came later, and goes in the window after it."""
    t = ManualTime()
    limiter = RateLimiter(1, window=10, clock=t.clock, sleep=t.sleep)
    calls = Calls(Admission(lambda: 8, limiter))
    calls.start("b1", Lane.BULK)
    await settle()
    calls.start("b2", Lane.BULK)
    await settle()
    await t.advance(3)
    await settle()
    calls.start("q", Lane.DEFAULT)
    await settle()
    await t.advance(7)
    await settle()
    assert calls.order == ["b1", "q"]
    await t.advance(10)
    await settle()
    assert calls.order == ["b1", "q", "b2"]
    await calls.aclose()


async def test_process_budget_refuses_at_once_what_it_cannot_afford_by_the_deadline() -> None:
    t = ManualTime()
    limiter = RateLimiter(1, window=10, clock=t.clock, sleep=t.sleep)
    await limiter.acquire(1)
    with pytest.raises(Unaffordable) as refused:
        await limiter.acquire(1, deadline=5.0)
    assert refused.value.wait == pytest.approx(10)
    assert t.now == 0  # refused without waiting for the deadline


@settings(max_examples=60, deadline=None)
@given(
    limit=st.floats(min_value=0.001, max_value=10.0),
    window=st.floats(min_value=1.0, max_value=600.0),
    shares=st.lists(st.floats(min_value=0.0, max_value=1.0), min_size=1, max_size=40),
    gaps=st.lists(st.floats(min_value=0.0, max_value=200.0), min_size=40, max_size=40),
)
def test_the_spend_window_is_never_exceeded(
    limit: float, window: float, shares: list[float], gaps: list[float]
) -> None:
    """UPSTREAM_USD_LIMIT per UPSTREAM_USD_WINDOW_S: whatever the calls cost (each at most the whole cap) and
    however they are spaced, no rolling window ever holds more than the cap (to the millionth of a dollar)."""

    async def run() -> list[tuple[float, float]]:
        t = JumpingTime()
        limiter = RateLimiter(usd=limit, usd_window=window, clock=t.clock, sleep=t.sleep)
        admitted = []
        for share, gap in zip(shares, gaps, strict=False):
            t.now += gap
            usd = share * limit
            await limiter.acquire(1, usd=usd)
            admitted.append((t.now, usd))
        return admitted

    admitted = asyncio.run(run())
    for start, _ in admitted:
        spent = sum(usd for at, usd in admitted if start <= at < start + window - 1e-9)
        assert spent <= limit + 1e-6 * len(admitted)
