"""The fire-and-forget lane: ``(key, text)`` items embedded when convenient, vectors written to Redis.

The durable queue ``embed.deferred`` is the buffer, not worker memory: the lane wakes on its flush interval, on a
flush request, or when the queue holds enough messages, then *takes what is there* (basic.get, so nothing waits
unacked in a consumer's prefetch window for minutes and runs into RabbitMQ's consumer timeout), embeds it, writes
it, and settles. A round holds messages only for the seconds it takes to embed and write them.

- ``scheduler.py``: when to drain (interval, flush requests, queue depth), back-off, answering flush requests.
- ``rounds.py``: one synchronous round: decode, keep each key's latest text, skip unchanged ones, embed each
  distinct text once, write, and decide a ``Settle`` per message.
- ``jobs.py``: the same through Gemini Batch API jobs: submit, record in Redis, acknowledge; collect later.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from worker.settings import Settings


@dataclass(frozen=True, slots=True)
class DeferredConfig:
    batch_max_size: int
    max_concurrent: int
    max_messages: int  # per round
    flush_interval_s: float
    wake_depth: int  # drain early once this many messages wait (0 = never)
    poll_s: float
    skip_unchanged: bool
    batch_api: bool  # submit Batch API jobs instead of synchronous calls
    batch_api_poll_s: float
    batch_api_attempts: int = 3  # failed jobs before items take the synchronous path

    @classmethod
    def from_settings(cls, settings: Settings) -> DeferredConfig:
        return cls(
            batch_max_size=settings.deferred_batch_max_size,
            max_concurrent=settings.deferred_max_concurrent_batches,
            max_messages=settings.deferred_max_messages,
            flush_interval_s=settings.deferred_flush_interval_s,
            wake_depth=settings.deferred_wake_messages,
            poll_s=settings.deferred_poll_s,
            skip_unchanged=settings.deferred_skip_unchanged,
            batch_api=settings.deferred_batch_api,
            batch_api_poll_s=settings.deferred_batch_api_poll_s,
        )
