"""The batcher on its own: flush rules, splitting, keys, concurrency, errors, cancellation."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

import pytest

from tests.clock import ManualClock
from worker.batcher import Batcher, BatcherClosed, BatchStats

WAIT = 0.05


class Recorder:
    """An honest process function: results derive from the items; calls are recorded."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[str]]] = []
        self.gate: asyncio.Event | None = None
        self.active = 0
        self.max_active = 0
        self.fail_on: str | None = None

    async def __call__(self, key: str, items: list[str]) -> Sequence[str]:
        self.calls.append((key, list(items)))
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            if self.gate is not None:
                await self.gate.wait()
            if self.fail_on is not None and self.fail_on in items:
                raise ValueError(f"boom on {self.fail_on}")
            return [f"{key}:{item.upper()}" for item in items]
        finally:
            self.active -= 1


def make(
    rec: Recorder,
    clock: ManualClock,
    *,
    max_size: int = 4,
    max_concurrent: int = 2,
    on_batch: Callable[[BatchStats], None] | None = None,
) -> Batcher[str, str, str]:
    return Batcher(rec, max_size=max_size, max_wait=WAIT, max_concurrent=max_concurrent, clock=clock, on_batch=on_batch)


async def settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


async def test_flushes_when_size_is_reached_without_waiting_for_the_clock() -> None:
    rec, clock = Recorder(), ManualClock()
    b = make(rec, clock)
    tasks = [asyncio.create_task(b.submit("k", [f"t{i}"])) for i in range(4)]
    results = await asyncio.wait_for(asyncio.gather(*tasks), 1)
    assert results == [[f"k:T{i}"] for i in range(4)]
    assert rec.calls == [("k", ["t0", "t1", "t2", "t3"])]
    assert clock.now() == 0.0


async def test_partial_batch_waits_for_max_wait_then_flushes() -> None:
    rec, clock = Recorder(), ManualClock()
    b = make(rec, clock)
    task = asyncio.create_task(b.submit("k", ["lone"]))
    await settle()
    await clock.advance(WAIT * 0.9)
    assert rec.calls == [] and not task.done()
    await clock.advance(WAIT * 0.2)
    assert await asyncio.wait_for(task, 1) == ["k:LONE"]
    assert rec.calls == [("k", ["lone"])]


async def test_age_counts_from_the_oldest_item() -> None:
    rec, clock = Recorder(), ManualClock()
    b = make(rec, clock)
    first = asyncio.create_task(b.submit("k", ["a"]))
    await settle()
    await clock.advance(WAIT * 0.6)
    second = asyncio.create_task(b.submit("k", ["b"]))
    await settle()
    await clock.advance(WAIT * 0.6)  # oldest is now 1.2 x max_wait old
    assert await asyncio.wait_for(asyncio.gather(first, second), 1) == [["k:A"], ["k:B"]]
    assert rec.calls == [("k", ["a", "b"])]


async def test_large_submission_is_split_and_answered_once_in_order() -> None:
    rec, clock = Recorder(), ManualClock()
    b = make(rec, clock, max_concurrent=3)
    items = [f"x{i}" for i in range(10)]
    task = asyncio.create_task(b.submit("k", items))
    await settle()
    assert [len(c[1]) for c in rec.calls] == [4, 4]  # the remainder of 2 waits for company or time
    await clock.advance(WAIT)
    assert await asyncio.wait_for(task, 1) == [f"k:X{i}" for i in range(10)]
    assert [c[1] for c in rec.calls] == [items[0:4], items[4:8], items[8:10]]


async def test_split_submission_shares_its_last_batch_with_later_items() -> None:
    rec, clock = Recorder(), ManualClock()
    b = make(rec, clock)
    big = asyncio.create_task(b.submit("k", ["a", "b", "c", "d", "e", "f"]))
    small = asyncio.create_task(b.submit("k", ["g", "h"]))
    assert await asyncio.wait_for(big, 1) == ["k:A", "k:B", "k:C", "k:D", "k:E", "k:F"]
    assert await asyncio.wait_for(small, 1) == ["k:G", "k:H"]
    assert [c[1] for c in rec.calls] == [["a", "b", "c", "d"], ["e", "f", "g", "h"]]


async def test_keys_are_never_mixed_in_one_batch() -> None:
    rec, clock = Recorder(), ManualClock()
    b = make(rec, clock)
    tasks = [asyncio.create_task(b.submit(key, [f"{key}{i}"])) for i in range(4) for key in ("p", "q")]
    results = await asyncio.wait_for(asyncio.gather(*tasks), 1)
    assert sorted(r[0] for r in results) == sorted(f"{k}:{k.upper()}{i}" for i in range(4) for k in "pq")
    assert len(rec.calls) == 2
    for key, items in rec.calls:
        assert all(item.startswith(key) for item in items)


async def test_concurrency_is_bounded_and_a_slow_batch_does_not_stop_the_next_forming() -> None:
    rec, clock = Recorder(), ManualClock()
    rec.gate = asyncio.Event()
    b = make(rec, clock, max_size=2, max_concurrent=2)
    tasks = [asyncio.create_task(b.submit("k", [f"t{i}"])) for i in range(8)]
    await settle()
    assert rec.active == 2 and b.active_batches == 2
    assert b.pending_items == 4  # two more full batches formed while both slots were busy
    rec.gate.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 1)
    assert rec.max_active == 2
    assert len(rec.calls) == 4


async def test_batch_that_timed_out_while_slots_were_busy_keeps_filling() -> None:
    rec, clock = Recorder(), ManualClock()
    rec.gate = asyncio.Event()
    b = make(rec, clock, max_size=4, max_concurrent=1)
    blocker = asyncio.create_task(b.submit("k", ["a", "b", "c", "d"]))
    await settle()
    late = [asyncio.create_task(b.submit("k", ["e"]))]
    await settle()
    await clock.advance(WAIT * 2)  # due, but the only slot is busy
    late += [asyncio.create_task(b.submit("k", [x])) for x in ("f", "g")]
    await settle()
    rec.gate.set()
    await asyncio.wait_for(asyncio.gather(blocker, *late), 1)
    assert [c[1] for c in rec.calls] == [["a", "b", "c", "d"], ["e", "f", "g"]]


async def test_error_reaches_every_waiter_of_the_batch_and_only_them() -> None:
    rec, clock = Recorder(), ManualClock()
    rec.fail_on = "bad"
    b = make(rec, clock, max_size=2)
    t1 = asyncio.create_task(b.submit("k", ["ok1"]))
    t2 = asyncio.create_task(b.submit("k", ["bad"]))
    t3 = asyncio.create_task(b.submit("k", ["ok2"]))
    t4 = asyncio.create_task(b.submit("k", ["ok3"]))
    done = await asyncio.wait_for(asyncio.gather(t1, t2, t3, t4, return_exceptions=True), 1)
    assert isinstance(done[0], ValueError) and isinstance(done[1], ValueError)
    assert done[2:] == [["k:OK2"], ["k:OK3"]]


async def test_failure_in_one_part_fails_the_split_submission_and_withdraws_unsent_parts() -> None:
    rec, clock = Recorder(), ManualClock()
    rec.fail_on = "x1"
    b = make(rec, clock, max_size=2, max_concurrent=1)
    task = asyncio.create_task(b.submit("k", ["x0", "x1", "x2", "x3", "x4"]))
    with pytest.raises(ValueError, match="boom on x1"):
        await asyncio.wait_for(task, 1)
    await settle()
    assert rec.calls == [("k", ["x0", "x1"])]  # the later parts were never sent
    assert b.pending_items == 0


async def test_cancelled_submission_is_withdrawn_from_its_open_batch() -> None:
    rec, clock = Recorder(), ManualClock()
    b = make(rec, clock)
    gone = asyncio.create_task(b.submit("k", ["gone"]))
    kept = asyncio.create_task(b.submit("k", ["kept"]))
    await settle()
    gone.cancel()
    await settle()
    assert b.pending_items == 1
    await clock.advance(WAIT)
    assert await asyncio.wait_for(kept, 1) == ["k:KEPT"]
    assert rec.calls == [("k", ["kept"])]


async def test_cancelling_the_only_waiter_leaves_no_batch_behind() -> None:
    rec, clock = Recorder(), ManualClock()
    b = make(rec, clock)
    gone = asyncio.create_task(b.submit("k", ["gone"]))
    await settle()
    gone.cancel()
    await settle()
    await clock.advance(WAIT * 2)
    await asyncio.wait_for(b.join(), 1)
    assert rec.calls == []


async def test_flush_and_close_send_partial_batches_now_and_refuse_new_work() -> None:
    rec, clock = Recorder(), ManualClock()
    b = make(rec, clock)
    task = asyncio.create_task(b.submit("k", ["a"]))
    await settle()
    await asyncio.wait_for(b.close(timeout=1), 1)
    assert task.result() == ["k:A"]
    assert clock.now() == 0.0
    with pytest.raises(BatcherClosed):
        await b.submit("k", ["b"])


async def test_close_timeout_cancels_stuck_batches_and_tells_their_waiters() -> None:
    rec, clock = Recorder(), ManualClock()
    rec.gate = asyncio.Event()  # never set: upstream hangs
    b = make(rec, clock)
    task = asyncio.create_task(b.submit("k", ["a"]))
    await settle()
    await b.close(timeout=0.01)
    with pytest.raises(BatcherClosed):
        await asyncio.wait_for(task, 1)


async def test_wrong_result_count_is_an_error_not_a_silent_misalignment() -> None:
    async def short(key: str, items: list[str]) -> list[str]:
        return items[:-1]

    b: Batcher[str, str, str] = Batcher(short, max_size=2, max_wait=0)
    with pytest.raises(RuntimeError, match="1 results for 2 items"):
        await asyncio.wait_for(b.submit("k", ["a", "b"]), 1)


async def test_on_batch_reports_size_reason_and_wait() -> None:
    seen: list[BatchStats] = []
    rec, clock = Recorder(), ManualClock()
    b = make(rec, clock, on_batch=seen.append)
    task = asyncio.create_task(b.submit("k", ["a"]))
    await settle()
    await clock.advance(WAIT)
    await asyncio.wait_for(task, 1)
    await asyncio.wait_for(asyncio.gather(*[b.submit("k", [x]) for x in "wxyz"]), 1)
    assert [(s.size, s.reason) for s in seen] == [(1, "timeout"), (4, "size")]
    assert seen[0].waited == pytest.approx(WAIT)


async def test_real_clock_timeout_flush() -> None:
    rec = Recorder()
    b: Batcher[str, str, str] = Batcher(rec, max_size=100, max_wait=0.01)
    assert await asyncio.wait_for(b.submit("k", ["a"]), 2) == ["k:A"]
