"""The lanes a request can take, and who gets the upstream first.

Callers choose the lane by routing key (``worker.topology``): ``embed.requests`` is the default lane, for queries a
person waits on; ``embed.requests.bulk`` carries the same requests for ingestion, which can wait. The deferred lane
(``embed.deferred``, into Redis) is ingestion too. When an upstream slot or the API's budget frees and more than
one lane has a call waiting, the default lane's goes first; bulk and deferred keep a floor of the slots
(``BULK_MIN_SHARE``) so that a steady stream of queries never starves ingestion. No AMQP here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum


class Lane(StrEnum):
    DEFAULT = "default"  # embed.requests: RPC, a person waits
    BULK = "bulk"  # embed.requests.bulk: RPC, ingestion
    DEFERRED = "deferred"  # embed.deferred: into Redis, no reply

    @property
    def urgent(self) -> bool:
        """Served first when calls of several lanes wait for the upstream."""
        return self is Lane.DEFAULT


@dataclass(frozen=True, slots=True)
class LaneConfig:
    """How one RPC lane's consumer takes its deliveries (its batches' max wait is ``EmbedService``'s)."""

    lane: Lane
    prefetch: int  # deliveries the broker may send ahead (also bounded by the byte budget)
    # Bytes of the shared budget (MAX_HELD_BYTES) this lane leaves to others: bulk leaves room for queries.
    reserve_bytes: int = 0


def floor_slots(min_share: float, limit: int) -> int:
    """Slots of ``limit`` that the non-urgent lanes keep while queries wait: ``min_share`` of them, at least one
    when the share is above zero (a share too small to round to a slot would otherwise be none)."""
    if min_share <= 0 or limit <= 0:
        return 0
    return min(limit, max(1, math.floor(min_share * limit)))


@dataclass(slots=True)
class Call:
    """What a lane tells the upstream about one batch's call, and what the upstream tells back."""

    lane: Lane = Lane.DEFAULT
    deadline: float | None = None  # epoch seconds: the earliest x-deadline among the batch's requests
    admitted_at: float | None = None  # monotonic: when its first attempt had a slot and the budget (UpstreamCaller)
