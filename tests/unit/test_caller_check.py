"""The Direct Reply-to caller check is bounded: a probe that cannot answer never holds requests back."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest

from worker.amqp import replies as rpc
from worker.amqp.publish import Publisher
from worker.amqp.replies import RpcReplies

CALLER = "amq.rabbitmq.reply-to.g1h2AA5yZXBseUAxMjM0NTY3OAAAAB4AAAAAZf8OGA==.4M8Jxn9j5lNvSqKUcw7vRg=="


class HangingProbe:
    """Connecting never finishes: a node that accepted the TCP connection and is still booting."""

    def __init__(self) -> None:
        self.attempts = 0

    async def __call__(self) -> Any:
        self.attempts += 1
        await asyncio.Event().wait()


async def test_a_hanging_probe_is_inconclusive_and_vouches_for_the_caller(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rpc, "PROBE_TIMEOUT_S", 0.2)
    probe = HangingProbe()
    replies = RpcReplies(cast(Publisher, None), probe)
    # A burst of requests from one new caller: one probe times out, and the rest are served on its verdict
    # instead of each waiting out a probe of its own behind the lock.
    verdicts = await asyncio.wait_for(asyncio.gather(*(replies.caller_alive(CALLER) for _ in range(20))), 5)
    assert verdicts == [True] * 20
    assert probe.attempts == 1
    assert await asyncio.wait_for(replies.caller_alive(CALLER), 0.1)  # vouched for: no probe at all
    assert probe.attempts == 1
