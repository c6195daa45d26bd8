"""The deferred lane's rounds on the in-memory broker and store: the real scheduler, rounds, queue adapter and
settler. Each test is one row of the settle tables in ``worker/deferred/rounds.py`` and ``jobs.py``."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import aio_pika
import numpy as np
import orjson
import pytest
from aio_pika.connection import make_url

from tests.fakes import FakeEmbedder, MemoryStore
from tests.memory import MemoryBroker, MemoryChannel, MemoryPublisher
from worker import limits, topology
from worker.amqp.deferred import AmqpDeferredQueue
from worker.amqp.settle import Settler
from worker.backoff import Backoff
from worker.deferred import DeferredConfig
from worker.deferred.jobs import JobRounds
from worker.deferred.rounds import SyncRounds, text_hash
from worker.deferred.scheduler import DeferredLane
from worker.emulator import BAD_INPUT_MARKER
from worker.errors import EmbedError, UpstreamError
from worker.holding import HeldBytes
from worker.messages import EmbedConfig, Reply, RequestLimits
from worker.metrics import Metrics
from worker.ports import FlushRequest, JobResult, StoreUnavailable
from worker.settings import DEFAULT_REPLY_TO
from worker.upstream import RetryPolicy, UpstreamCaller
from worker.vectors import FloatArray, expected_vector

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
    replies: FakeReplies
    settler: Settler
    metrics: Metrics

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


def right(vector: np.ndarray, text: str, *, dims: int | None = None, task_type: str | None = None) -> bool:
    want = expected_vector(text, model="gemini-embedding-001", task_type=task_type, dims=dims, full_dims=3072)
    return bool(vector.shape == want.shape and np.allclose(vector, want, atol=1e-6))


class FakeReplies:
    """``ports.ReplyPublisher`` for flush answers: each reply lands in ``answers``, to be awaited."""

    def __init__(self) -> None:
        self.answers: asyncio.Queue[tuple[str | None, dict[str, Any]]] = asyncio.Queue()

    async def publish_reply(self, reply_to: str, correlation_id: str | None, reply: Reply) -> None:
        await self.answers.put((correlation_id, orjson.loads(reply.body)))

    async def caller_alive(self, reply_to: str) -> bool:
        return True

    async def answer(self, timeout: float = 5) -> tuple[str | None, dict[str, Any]]:
        return await asyncio.wait_for(self.answers.get(), timeout)


class FakeJobs:
    """``ports.BatchJobs`` whose jobs finish at once, each text embedded as the emulator would (a bad one rejected)."""

    def __init__(self) -> None:
        self.submitted: list[list[str]] = []
        self.reads = 0

    async def submit(self, texts: Sequence[str], config: EmbedConfig, display_name: str) -> str:
        self.submitted.append(list(texts))
        return f"batches/{len(self.submitted)}"

    async def result(self, name: str, config: EmbedConfig, count: int) -> JobResult | None:
        self.reads += 1
        texts = self.submitted[int(name.rsplit("/", 1)[1]) - 1]
        outcomes: list[FloatArray | EmbedError] = [
            EmbedError("rejected") if BAD_INPUT_MARKER in text else (await FakeEmbedder().call([text], config))[0]
            for text in texts
        ]
        return JobResult(True, "JOB_STATE_SUCCEEDED", outcomes)


def unconnected() -> aio_pika.RobustConnection:
    """The queue's connection, never opened: the memory lane's channel is the memory broker's (set in ``make_lane``)
    and it listens for no flush requests; opening a channel on this raises "Connection was not opened"."""
    return aio_pika.RobustConnection(make_url("amqp://never-connected.invalid/"))


def make_lane(*, paid_bytes: int = 1 << 20, jobs: FakeJobs | None = None, config: DeferredConfig = CONFIG) -> Lane:
    broker = MemoryBroker(delivery_limit=5)
    metrics = Metrics()
    publisher = MemoryPublisher(broker)
    held = HeldBytes(1 << 30, largest=4 << 20).share()
    settler = Settler(publisher, metrics)
    queue = AmqpDeferredQueue(unconnected(), settler, publisher, held)
    channel = queue._channel = broker.channel()  # type: ignore[assignment]  # the seam: aiormq's channel
    store, embedder, replies = MemoryStore(), FakeEmbedder(), FakeReplies()
    upstream = UpstreamCaller(embedder, RetryPolicy(2, Backoff(0.001, 0.002)), metrics=metrics)
    rounds = SyncRounds(
        store,
        upstream,
        batch_max_size=100,
        max_concurrent=2,
        skip_unchanged=True,
        reserved_prefix="embed-worker:",
        paid_bytes=paid_bytes,
    )
    job_rounds = None
    if jobs is not None:
        job_rounds = JobRounds(
            jobs,
            store,
            queue,
            skip_unchanged=True,
            reserved_prefix="embed-worker:",
            admission=upstream.admission,
            metrics=metrics,
        )
    deferred = DeferredLane(
        queue,
        store,
        rounds,
        replies,
        limits=LIMITS,
        config=config,
        reply_to=re.compile(DEFAULT_REPLY_TO),
        jobs=job_rounds,
    )
    return Lane(broker, channel, store, embedder, deferred, replies, settler, metrics)


@pytest.fixture
async def lane() -> AsyncIterator[Lane]:
    yield make_lane()


async def drain(lane: Lane) -> int:
    written = await lane.lane.drain()
    await lane.settler.drain()
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


# ---------------------------------------------------------------------- issue 17: Redis as people run it
async def test_the_last_item_of_a_key_wins_across_settings(lane: Lane) -> None:
    """Before: writes were grouped by the first sight of each (settings, key) pair, so B@256 won over C@128."""
    lane.defer([("doc:x", "A")], output_dimensionality=128)
    lane.defer([("doc:x", "B")], output_dimensionality=256)
    lane.defer([("doc:x", "C")], output_dimensionality=128)
    assert await drain(lane) == 1
    assert right(lane.vector_of("doc:x"), "C", dims=128)
    assert lane.channel.unacked == 0 and not lane.parked()


async def test_a_rejected_last_item_falls_back_to_the_one_before_it_in_other_settings(lane: Lane) -> None:
    lane.defer([("doc:y", "A")], output_dimensionality=128)
    lane.defer([("doc:y", "B")], output_dimensionality=256)
    lane.defer([("doc:y", f"C {BAD_INPUT_MARKER}")], output_dimensionality=128)
    assert await drain(lane) == 1
    assert right(lane.vector_of("doc:y"), "B", dims=256)  # before: A@128, written after B
    assert [items for items, _ in lane.parked()] == [[("doc:y", f"C {BAD_INPUT_MARKER}")]]


async def test_a_text_under_another_task_type_is_not_skipped_as_unchanged(lane: Lane) -> None:
    lane.defer([("doc:t", "same words")], task_type="RETRIEVAL_DOCUMENT")
    assert await drain(lane) == 1
    lane.defer([("doc:t", "same words")], task_type="CLASSIFICATION")
    assert await drain(lane) == 1  # before: 0, skipped as unchanged
    assert right(lane.vector_of("doc:t"), "same words", task_type="CLASSIFICATION")
    lane.defer([("doc:t", "same words")], task_type="CLASSIFICATION")
    assert await drain(lane) == 0 and len(lane.embedder.calls) == 2  # now it is unchanged


async def test_vectors_already_paid_for_are_written_when_the_store_takes_writes_again(lane: Lane) -> None:
    """Redis fills up during the round: the round goes back to the queue, nothing is parked, and its vectors wait in
    memory for the retry instead of being paid for again."""
    lane.store.refuse_writes = 1
    lane.defer([("doc:1", "one"), ("doc:2", "two")])
    with pytest.raises(StoreUnavailable):
        await drain(lane)
    assert not lane.parked() and len(lane.broker.queues[topology.DEFERRED_QUEUE]) == 1
    assert len(lane.embedder.calls) == 1
    assert await drain(lane) == 2
    assert right(lane.vector_of("doc:1"), "one") and right(lane.vector_of("doc:2"), "two")
    assert len(lane.embedder.calls) == 1  # before: 2, the same texts embedded again


async def test_vectors_kept_for_a_retry_stay_within_their_budget() -> None:
    one_vector = 3072 * 4
    lane = make_lane(paid_bytes=one_vector)
    lane.store.refuse_writes = 1
    lane.defer([("doc:1", "one"), ("doc:2", "two"), ("doc:3", "three")])
    with pytest.raises(StoreUnavailable):
        await drain(lane)
    assert await drain(lane) == 3
    assert [len(texts) for texts, _ in lane.embedder.calls] == [3, 2]  # one vector kept, two paid for again


async def test_a_store_that_takes_no_writes_is_not_drained(lane: Lane) -> None:
    """A read-only replica (or a full Redis) answers reads and PING: nothing is taken, embedded or counted."""
    lane.store.refusing = "READONLY You can't write against a read only replica."
    lane.defer([("doc:r", "read only")])
    with pytest.raises(StoreUnavailable, match="READONLY"):
        await drain(lane)
    assert lane.embedder.calls == [] and lane.channel.frames == []  # before: embedded, then refused
    assert len(lane.broker.queues[topology.DEFERRED_QUEUE]) == 1


async def test_no_batch_api_job_is_submitted_while_the_store_takes_no_writes() -> None:
    """Before: PING passed on a read-only replica, so the lane kept submitting jobs it could never record."""
    jobs = FakeJobs()
    lane = make_lane(jobs=jobs)
    lane.store.refusing = "READONLY You can't write against a read only replica."
    lane.defer([("doc:j", "via a job")])
    with pytest.raises(StoreUnavailable):
        await drain(lane)
    assert jobs.submitted == []
    lane.store.refusing = None
    assert await drain(lane) == 0 and jobs.submitted == [["via a job"]] and len(lane.store.jobs_hash) == 1


async def test_a_batch_api_job_counts_half_the_sync_price_in_the_spend_cap() -> None:
    """UPSTREAM_USD_LIMIT and embed_spend_usd_total see Batch API jobs too, at the Batch API's half price."""
    jobs = FakeJobs()
    lane = make_lane(jobs=jobs)
    lane.defer([("doc:p1", "x" * 400), ("doc:p2", "y" * 400)])  # 100 estimated tokens each
    await drain(lane)
    assert jobs.submitted == [["x" * 400, "y" * 400]]
    spent = {
        sample.labels["model"]: sample.value
        for family in lane.metrics.registry.collect()
        for sample in family.samples
        if sample.name == "embed_spend_usd_total" and sample.labels["lane"] == "deferred"
    }
    model = next(iter(spent))
    assert spent[model] == pytest.approx(200 * limits.price(model) / 1e6 * limits.BATCH_API_DISCOUNT)


@contextlib.asynccontextmanager
async def running(lane: Lane) -> AsyncIterator[asyncio.Event]:
    stop = asyncio.Event()
    task = asyncio.create_task(lane.lane.run(stop))
    try:
        yield stop
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)


REPLY_TO = "amq.rabbitmq.reply-to.test"


async def test_every_flush_is_answered_at_once_while_the_lane_is_paused(lane: Lane) -> None:
    """Before: the first flush got store_unavailable, the next none at all while Redis stayed down."""
    lane.store.down = True
    lane.defer([("doc:p", "paused")])
    async with running(lane):
        for cid in ("first", "second", "third"):
            lane.lane.request_flush(FlushRequest(REPLY_TO, cid))
            answered, reply = await lane.replies.answer(timeout=2)
            assert answered == cid and reply["error"]["code"] == "store_unavailable", reply
            assert reply["error"]["retryable"] is True
        lane.store.down = False
        lane.lane.request_flush(FlushRequest(REPLY_TO, "back"))  # probes at once, and drains
        assert await lane.replies.answer() == ("back", {"flushed": 1})
    assert right(lane.vector_of("doc:p"), "paused")


async def test_the_pause_ends_on_its_own_once_the_store_takes_writes(lane: Lane) -> None:
    lane.store.refusing = "OOM command not allowed when used memory > 'maxmemory'."
    lane.defer([("doc:o", "out of memory")])
    async with running(lane):
        lane.lane.request_flush(FlushRequest(REPLY_TO, "full"))
        _, reply = await lane.replies.answer()
        assert reply["error"]["code"] == "store_unavailable" and "maxmemory" in reply["error"]["message"]
        lane.store.refusing = None
        await lane.store.until(lambda: "doc:o" in lane.store.data)
    assert right(lane.vector_of("doc:o"), "out of memory")


async def test_finished_jobs_wait_while_the_store_takes_no_writes() -> None:
    """Before: each poll read the finished job, failed to write it and, in the meantime, parked its bad items again."""
    jobs = FakeJobs()
    lane = make_lane(jobs=jobs, config=dataclasses.replace(CONFIG, batch_api_poll_s=0.01))
    lane.defer([("doc:a", "fine"), ("doc:b", f"bad {BAD_INPUT_MARKER}")])
    assert await drain(lane) == 0 and len(lane.store.jobs_hash) == 1
    lane.store.refusing = "READONLY You can't write against a read only replica."
    async with running(lane):
        await lane.store.until(lambda: lane.store.probes >= 5)
        assert jobs.reads == 0 and not lane.parked()
        lane.store.refusing = None
        await lane.store.until(lambda: not lane.store.jobs_hash)
    assert right(lane.vector_of("doc:a"), "fine")
