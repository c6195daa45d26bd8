"""The deferred lane's rounds on the in-memory broker and store: the real scheduler, rounds, queue adapter and
settler. Each test is one row of the settle tables in ``worker/deferred/rounds.py`` and ``jobs.py``."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
import pytest

from tests.fakes import FakeEmbedder, MemoryStore
from tests.memory import MemoryBroker, MemoryChannel, MemoryPublisher
from worker import topology
from worker.amqp.deferred import AmqpDeferredQueue
from worker.amqp.settle import Settler
from worker.backoff import Backoff
from worker.deferred import DeferredConfig
from worker.deferred.rounds import SyncRounds, text_hash
from worker.deferred.scheduler import DeferredLane
from worker.emulator import BAD_INPUT_MARKER
from worker.errors import UpstreamError
from worker.holding import HeldBytes
from worker.messages import EmbedConfig, RequestLimits
from worker.metrics import Metrics
from worker.settings import DEFAULT_REPLY_TO
from worker.upstream import RetryPolicy, UpstreamCaller
from worker.vectors import expected_vector

LIMITS = RequestLimits("gemini-embedding-001", frozenset({"gemini-embedding-001"}), 1 << 20, 100, 2048)
CONFIG = DeferredConfig(
    batch_max_size=100,
    max_concurrent=2,
    max_messages=100,
    flush_interval_s=3600,
    wake_depth=0,
    poll_s=1,
    skip_unchanged=True,
    batch_api=False,
    batch_api_poll_s=60,
)


@dataclass
class Lane:
    broker: MemoryBroker
    channel: MemoryChannel
    store: MemoryStore
    embedder: FakeEmbedder
    lane: DeferredLane

    def defer(self, items: list[tuple[str, str]], **options: Any) -> None:
        body = {"items": [{"key": k, "text": t} for k, t in items], **options}
        self.broker.send(orjson.dumps(body), routing_key=topology.DEFERRED_KEY)

    def parked(self) -> list[tuple[list[tuple[str, str]], str]]:
        return [
            ([(i["key"], i["text"]) for i in orjson.loads(m.body)["items"]], m.properties.headers["x-embed-error"])
            for m in self.broker.queues[topology.DEFERRED_DLQ]
        ]

    def vector_of(self, key: str) -> np.ndarray:
        return np.frombuffer(self.store.data[key]["embedding"], dtype="<f4")


def right(vector: np.ndarray, text: str) -> bool:
    want = expected_vector(text, model="gemini-embedding-001", task_type=None, dims=None, full_dims=3072)
    return bool(np.allclose(vector, want, atol=1e-6))


@pytest.fixture
async def lane() -> AsyncIterator[Lane]:
    broker = MemoryBroker(delivery_limit=5)
    metrics = Metrics()
    publisher = MemoryPublisher(broker)
    held = HeldBytes(1 << 30, largest=4 << 20)
    queue = AmqpDeferredQueue(None, Settler(publisher, metrics), publisher, held)  # type: ignore[arg-type]
    channel = queue._channel = broker.channel()  # type: ignore[assignment]  # the seam: aiormq's channel
    store, embedder = MemoryStore(), FakeEmbedder()
    upstream = UpstreamCaller(embedder, RetryPolicy(2, Backoff(0.001, 0.002)), metrics=metrics)
    rounds = SyncRounds(
        store, upstream, batch_max_size=100, max_concurrent=2, skip_unchanged=True, reserved_prefix="embed-worker:"
    )
    deferred = DeferredLane(
        queue,
        store,
        rounds,
        None,  # type: ignore[arg-type]  # no flush requests in these tests
        limits=LIMITS,
        config=CONFIG,
        reply_to=re.compile(DEFAULT_REPLY_TO),
    )
    yield Lane(broker, channel, store, embedder, deferred)


async def drain(lane: Lane) -> int:
    written = await lane.lane.drain()
    await lane.lane._queue._settler.drain()  # type: ignore[attr-defined]
    return written


async def test_a_key_of_another_type_parks_only_its_own_item(lane: Lane) -> None:
    """Before: WRONGTYPE failed the whole round as "store unavailable", again and again, while Redis was fine."""
    lane.store.data["doc:string"] = "a caller's plain string"
    lane.store.data["doc:list"] = ["a", "list"]
    lane.defer([("doc:1", "one"), ("doc:string", "two"), ("doc:2", "three")])
    lane.defer([("doc:list", "four")])
    lane.defer([("doc:3", "five")])
    assert await drain(lane) == 3
    assert right(lane.vector_of("doc:1"), "one") and right(lane.vector_of("doc:3"), "five")
    assert lane.store.data["doc:string"] == "a caller's plain string"  # never overwritten with another type
    parked = lane.parked()
    # doc:string is split off its message (the rest of which is written and acked); doc:list was alone in its
    # message, which is parked whole
    assert [items for items, _ in parked] == [[("doc:string", "two")], [("doc:list", "four")]]
    assert all("WRONGTYPE" in reason for _, reason in parked)
    assert lane.channel.unacked == 0 and not lane.broker.queues[topology.DEFERRED_QUEUE]


async def test_an_unreadable_field_is_replaced_not_fatal(lane: Lane) -> None:
    lane.store.data["doc:odd"] = {"embedding_dimensions": "n/a", "title": "keep me"}
    lane.defer([("doc:odd", "text")])
    assert await drain(lane) == 1
    assert right(lane.vector_of("doc:odd"), "text") and lane.store.data["doc:odd"]["title"] == "keep me"
    assert lane.store.data["doc:odd"]["embedding_dimensions"] == "3072"


async def test_a_good_text_superseded_by_a_rejected_one_is_still_written(lane: Lane) -> None:
    lane.defer([("doc:k", "the good text")])
    lane.defer([("doc:k", f"a bad text {BAD_INPUT_MARKER}")])
    assert await drain(lane) == 1
    assert right(lane.vector_of("doc:k"), "the good text")  # before: acked, superseded, and never written
    assert lane.parked() == [
        (
            [("doc:k", f"a bad text {BAD_INPUT_MARKER}")],
            "invalid_request: rejected by the embedding API: input rejected",
        )
    ]


async def test_keys_in_the_workers_namespace_are_refused(lane: Lane) -> None:
    lane.defer([("embed-worker:batch-jobs", "mine now"), ("doc:fine", "fine")])
    assert await drain(lane) == 1
    assert "embed-worker:batch-jobs" not in lane.store.data
    [(items, reason)] = lane.parked()
    assert items == [("embed-worker:batch-jobs", "mine now")] and "reserved namespace" in reason


async def test_a_transient_upstream_failure_requeues_and_nothing_is_parked(lane: Lane) -> None:
    lane.embedder.faults = [UpstreamError("503", status=503, retry_now=True)] * 2
    lane.defer([("doc:t", "later")])
    assert await drain(lane) == 0
    assert not lane.parked() and len(lane.broker.queues[topology.DEFERRED_QUEUE]) == 1
    assert lane.channel.frames == [("reject", 1, True)]
    assert await drain(lane) == 1 and right(lane.vector_of("doc:t"), "later")


async def test_redis_down_requeues_the_whole_round(lane: Lane) -> None:
    lane.store.down = True
    lane.defer([("doc:a", "a")])
    lane.defer([("doc:b", "b")])
    with pytest.raises(Exception, match="down"):
        await drain(lane)
    assert len(lane.broker.queues[topology.DEFERRED_QUEUE]) == 2 and lane.embedder.calls == []


async def test_unchanged_texts_cost_no_call(lane: Lane) -> None:
    lane.store.data["doc:same"] = {
        "embedding_text_hash": text_hash("same"),
        "embedding_model": "gemini-embedding-001",
        "embedding_dimensions": str(EmbedConfig("gemini-embedding-001").dimensions),
    }
    lane.defer([("doc:same", "same")])
    assert await drain(lane) == 0 and lane.embedder.calls == [] and lane.channel.unacked == 0
