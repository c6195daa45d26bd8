"""The protocols and value types the core depends on; adapters implement them.

The core is ``service.py`` (the RPC lanes), ``deferred/`` (fire-and-forget lane), ``upstream.py`` and
``admission.py`` (who goes upstream first). The adapters are
``amqp/`` (``Delivery``, ``ReplyPublisher``, ``DeferredQueue``), ``redis_store.py`` (``VectorStore``) and
``embedders/`` (``Embedder``, ``BatchJobs``). Nothing here imports a broker client, a database client or an SDK.

Settling is a value: the core decides what becomes of each delivery and returns a ``Settle``; ``amqp/settle.py``
applies every one of them, for both lanes, in one place.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

from worker.errors import EmbedError
from worker.inputs import EmbedInput
from worker.lanes import Call
from worker.messages import EmbedConfig, Reply
from worker.vectors import FloatArray, JsonVector, Vector

# What a batch gives each of its inputs: its vector, or the error its request is answered with.
Outcome = Vector | EmbedError


# ---------------------------------------------------------------------- settling
class SettleAction(StrEnum):
    ACK = "ack"  # done: answered, or nothing more to do
    DEAD_LETTER = "dead_letter"  # parked in the dead-letter queue for an operator, with a reason
    REQUEUE = "requeue"  # back to the queue for another try (basic.reject requeue=true: counted by quorum queues)


@dataclass(frozen=True, slots=True)
class Settle:
    action: SettleAction
    reason: str = ""  # DEAD_LETTER: the ``x-embed-error`` header, in words
    label: str = ""  # DEAD_LETTER: the metrics label (``embed_dead_lettered_total{reason}``)


ACK = Settle(SettleAction.ACK)
REQUEUE = Settle(SettleAction.REQUEUE)


def dead_letter(label: str, reason: str) -> Settle:
    return Settle(SettleAction.DEAD_LETTER, reason=reason, label=label)


# ---------------------------------------------------------------------- the broker, as the core sees it
class Delivery(Protocol):
    """One message taken from a queue. Settled only through a ``Settle`` value, never by the core itself."""

    body: bytes
    content_type: str | None
    content_encoding: str | None  # e.g. "gzip": the body is compressed (messages.decode_request undoes it)
    headers: Mapping[str, Any]
    reply_to: str | None
    correlation_id: str | None
    message_id: str | None
    # The first property (or "a header name") that arrived as invalid UTF-8, else None (amqp/codec.py).
    invalid_property: str | None


class ReplyUndeliverable(Exception):
    """The caller is gone: the broker returned the reply (no server-named queue by that name), or failed the
    connection over this reply's Direct Reply-to name alone (541). Nothing more can reach it."""


class ReplyRefused(Exception):
    """The broker refused this one reply (basic.nack: the caller's queue is full or refuses publishes): final for
    its request, never retried. ``reason`` is the broker's answer, in words."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class ReplyTooLarge(ReplyRefused):
    """The broker closed the channel over this reply's size (406 PRECONDITION_FAILED, RabbitMQ 4.x
    ``max_message_size``). ``limit`` is the broker's maximum, as it said it."""

    def __init__(self, size: int, limit: int):
        super().__init__(f"the reply is {size} bytes; the broker takes at most {limit}")
        self.size = size
        self.limit = limit


class ReplyPublisher(Protocol):
    async def publish_reply(self, reply_to: str, correlation_id: str | None, reply: Reply) -> None:
        """Publish and wait for the broker's confirm. Raises ReplyUndeliverable (the caller is gone),
        ReplyRefused or ReplyTooLarge (final for this reply), anything else when the broker could not be reached
        (the request is worth another try)."""

    async def caller_alive(self, reply_to: str) -> bool:
        """False only when the broker says a Direct Reply-to caller has gone."""


@dataclass(frozen=True, slots=True)
class FlushRequest:
    """A request for every worker's deferred lane to drain now, answered on ``reply_to`` with ``{"flushed": N}``."""

    reply_to: str | None
    correlation_id: str | None


class DeferredQueue(Protocol):
    """``embed.deferred`` and its dead-letter queue, for the deferred lane."""

    # The last ``get`` stopped because the worker's byte budget was spent, not because the queue was empty.
    cut_short: bool

    async def get(self, max_messages: int) -> list[Delivery]:
        """Take up to ``max_messages`` waiting messages (basic.get: nothing waits in a prefetch window)."""

    async def depth(self) -> int: ...

    async def settle(self, outcomes: Sequence[tuple[Delivery, Settle]]) -> None: ...

    async def republish(self, body: bytes, headers: dict[str, Any]) -> None:
        """A new message on ``embed.deferred`` (items sent back after a failed Batch API job)."""

    async def park(self, body: bytes, reason: str) -> None:
        """A new message in ``embed.deferred.dlq`` with ``reason`` in its headers (items split off a message)."""


# ---------------------------------------------------------------------- the store, as the deferred lane sees it
class StoreUnavailable(Exception):
    """Redis could not be reached or refused the write as a whole; nothing of the round is acked."""


@dataclass(frozen=True, slots=True)
class StoredVector:
    key: str
    vector: FloatArray
    model: str
    text_hash: str


@dataclass(frozen=True, slots=True)
class Existing:
    """What a key holds already, for skipping unchanged texts; ``error`` when the key cannot take our fields."""

    text_hash: str | None = None
    model: str | None = None
    dimensions: int | None = None
    error: str | None = None


class VectorStore(Protocol):
    async def clock(self) -> int:
        """The store's clock, read once a round has taken its messages: the order (seq) of that round's writes."""

    async def write(self, entries: Sequence[StoredVector], seq: int | None = None) -> list[str | None]:
        """Write every entry; per entry None, or why that key refused it (e.g. it holds another type). A key that
        holds a vector of a round with a larger ``seq`` keeps it (None for it). Raises StoreUnavailable when the
        store as a whole failed."""

    async def existing(self, keys: Sequence[str]) -> list[Existing]: ...

    async def save_job(self, name: str, record: bytes) -> None: ...

    async def jobs(self) -> dict[str, bytes]: ...

    async def complete_job(
        self, name: str, entries: Sequence[StoredVector], seq: int | None = None
    ) -> list[str | None]:
        """The job's vectors and the removal of its record, at once, in the order of ``write`` (``seq``: the round
        that submitted the job); per entry None or why the key refused it."""

    async def drop_job(self, name: str) -> None: ...

    async def writable(self) -> None:
        """Raise StoreUnavailable, saying why, unless the store takes writes now (answering is not enough)."""

    async def ping(self) -> bool: ...


# ---------------------------------------------------------------------- the embedding API
class Unaffordable(Exception):
    """The budget cannot have room for a call before its deadline: ``wait`` seconds, at the least. Raised at once
    (nothing counted), so the requests that cannot wait are answered ``rate_limited`` now, not at their deadline."""

    def __init__(self, wait: float):
        super().__init__(f"the API budget has no room for {wait:.1f}s")
        self.wait = wait


class Limiter(Protocol):
    """The API budget (UPSTREAM_RPM, UPSTREAM_TPM, UPSTREAM_USD_LIMIT) that every upstream call draws from."""

    async def acquire(
        self, tokens: int, *, usd: float = 0.0, urgent: bool = True, deadline: float | None = None
    ) -> None:
        """Wait until one more call of ``tokens`` estimated tokens and ``usd`` estimated dollars fits the budget,
        and count it. ``urgent`` (the default lane) goes before other callers waiting on the same budget, across
        the fleet too; ``deadline`` (the limiter's monotonic clock): raise ``Unaffordable`` if it cannot fit by
        then."""

    async def cool_down(self, seconds: float) -> None:
        """The API asked for a pause (a 429's RetryInfo): every caller sharing this budget waits it out."""


class CacheUnavailable(Exception):
    """The cache did not answer in time, or failed; the caller goes on without it."""


class VectorCache(Protocol):
    """Vectors already paid for, by key (``frugal.cache_key``): float32 bytes."""

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]: ...

    async def put_many(self, entries: Sequence[tuple[str, bytes]]) -> None: ...


class BatchEmbedder(Protocol):
    """What the lanes call to embed one batch: per input a vector or the error its request gets. ``call`` says
    which lane it is for (who goes upstream first) and its deadline; raises ``Unaffordable`` when the API budget
    cannot have room by that deadline."""

    async def embed(
        self, texts: Sequence[EmbedInput], config: EmbedConfig, call: Call | None = None
    ) -> list[Outcome]: ...


class Embedder(Protocol):
    """One API call for one batch: all texts share ``config``; returns one unit-length vector per text, as float32
    rows or as the API wrote them (``vectors.JsonVector``).

    ``call`` raises ``worker.errors.UpstreamError`` (or a subclass) for API failures; ``upstream.UpstreamCaller``
    turns them into the ``BatchEmbedder`` outcomes."""

    async def call(self, texts: Sequence[EmbedInput], config: EmbedConfig) -> FloatArray | list[JsonVector]: ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True, slots=True)
class JobResult:
    """A finished Batch API job: what became of each text, in order (empty if the job failed as a whole)."""

    succeeded: bool
    state: str
    outcomes: list[FloatArray | EmbedError]


class BatchJobs(Protocol):
    async def submit(self, texts: Sequence[str], config: EmbedConfig, display_name: str) -> str: ...

    async def result(self, name: str, config: EmbedConfig, count: int) -> JobResult | None:
        """None while the job runs."""
