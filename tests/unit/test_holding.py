"""The byte budget's bookkeeping: how many more messages may come in, given what is held and what came lately."""

from __future__ import annotations

from worker.holding import RECENT, HeldBytes

MiB = 1024 * 1024


def test_before_any_message_every_one_is_assumed_as_large_as_the_body_limit() -> None:
    held = HeldBytes(128 * MiB, largest=4 * MiB)
    assert held.credit(900) == 32


def test_small_messages_let_the_window_open_up_to_its_count() -> None:
    held = HeldBytes(128 * MiB, largest=4 * MiB)
    for _ in range(RECENT):
        held.take(200)
    assert held.credit(900) == 900


def test_large_messages_close_it_to_what_the_bytes_can_take() -> None:
    held = HeldBytes(128 * MiB, largest=4 * MiB)
    for _ in range(10):
        held.take(4_000_000)
    assert held.credit(900) == (128 * MiB - 40_000_000) // 4_000_000


def test_a_spent_budget_lets_nothing_in_until_something_is_given_back() -> None:
    held = HeldBytes(10 * MiB, largest=4 * MiB)
    for _ in range(3):
        held.take(4 * MiB)
    assert held.spent and held.credit(900) == 0
    held.give(4 * MiB)
    held.give(4 * MiB)
    assert not held.spent and held.credit(900) == 1


def test_a_message_larger_than_the_whole_budget_is_let_in_alone() -> None:
    held = HeldBytes(1 * MiB, largest=64 * MiB)
    assert held.credit(900) == 1  # nothing held: one may come, whatever its size
    held.take(50 * MiB)
    assert held.credit(900) == 0
    held.give(50 * MiB)
    assert held.credit(900) == 1
