"""The RPC lane on the in-memory broker: the real service, batcher, upstream caller, settler and reply publisher,
with the honest fake embedder at the API seam. Fast, so the settle table is covered row by row."""

from __future__ import annotations

import functools
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
import pytest

from tests.fakes import FakeEmbedder
from tests.memory import MemoryBroker, MemoryChannel, MemoryPublisher
from worker import topology
from worker.amqp.replies import RpcReplies, reply_node
from worker.amqp.rpc import handle_delivery
from worker.amqp.settle import Settler
from worker.backoff import Backoff
from worker.budgets import BatchingConfig
from worker.emulator import BAD_INPUT_MARKER
from worker.errors import UpstreamError
from worker.messages import RequestLimits
from worker.metrics import Metrics
from worker.service import EmbedService
from worker.settings import DEFAULT_REPLY_TO
from worker.upstream import RetryPolicy, UpstreamCaller
from worker.vectors import expected_vector

CALLER = "amq.gen-caller"
DELIVERY_LIMIT = 3
LIMITS = RequestLimits("gemini-embedding-001", frozenset({"gemini-embedding-001"}), 1 << 20, 100, 2048)


@dataclass
class Lane:
    broker: MemoryBroker
    channel: MemoryChannel
    embedder: FakeEmbedder
    publisher: MemoryPublisher
    settler: Settler
    service: EmbedService

    def send(self, body: Any, **props: Any) -> None:
        props.setdefault("reply_to", CALLER)
        self.broker.send(body if isinstance(body, bytes) else orjson.dumps(body), **props)

    async def settled(self) -> None:
        """Until every delivery handed out has been handled and its ack frames sent."""
        await self.channel.idle()
        await self.settler.drain()

    def replies(self) -> dict[str, dict[str, Any]]:
        return {m.properties.correlation_id: orjson.loads(m.body) for m in self.broker.reply_queue(CALLER)}


@pytest.fixture
async def lane() -> AsyncIterator[Lane]:
    broker = MemoryBroker(delivery_limit=DELIVERY_LIMIT)
    broker.reply_queue(CALLER)
    metrics = Metrics()
    embedder = FakeEmbedder()
    publisher = MemoryPublisher(broker)
    settler = Settler(publisher, metrics)
    upstream = UpstreamCaller(embedder, RetryPolicy(3, Backoff(0.001, 0.002)), metrics=metrics)
    service = EmbedService(
        upstream,
        RpcReplies(publisher, None),
        limits=LIMITS,
        batching=BatchingConfig(max_size=10, max_wait_s=0.01, max_concurrent=2),
        reply_to=re.compile(DEFAULT_REPLY_TO),
        metrics=metrics,
        check_callers=False,
    )
    channel = broker.channel(prefetch=30)
    await channel.basic_consume(
        topology.QUEUE, functools.partial(handle_delivery, handle=service.handle, settler=settler)
    )
    yield Lane(broker, channel, embedder, publisher, settler, service)
    await service.close(timeout=1)


def right_vectors(reply: dict[str, Any], texts: list[str]) -> bool:
    got = np.asarray(reply["embeddings"], dtype=np.float32)
    want = [expected_vector(t, model="gemini-embedding-001", task_type=None, dims=None, full_dims=3072) for t in texts]
    return got.shape == (len(texts), 3072) and all(np.allclose(g, w, atol=1e-6) for g, w in zip(got, want, strict=True))


async def test_requests_are_batched_answered_and_acked_many_at_a_time(lane: Lane) -> None:
    texts = [f"memory text {i}" for i in range(25)]
    for i, text in enumerate(texts):
        lane.send({"text": text}, correlation_id=f"c{i}")
    await lane.settled()
    replies = lane.replies()
    assert all(right_vectors(replies[f"c{i}"], [t]) for i, t in enumerate(texts))
    assert [len(texts) for texts, _ in lane.embedder.calls] == [10, 10, 5]
    acks = [frame for frame in lane.channel.frames if frame[0] == "ack"]
    assert all(multiple for _, _, multiple in acks) and len(acks) <= 3  # about one ack frame per batch
    assert lane.channel.unacked == 0 and not lane.channel.frames.count(("reject", 1, True))


async def test_bad_requests_are_answered_and_acked(lane: Lane) -> None:
    lane.send(b"not json", correlation_id="json")
    lane.send({"texts": ["fine", f"bad {BAD_INPUT_MARKER}"]}, correlation_id="api-rejects")
    lane.send({"text": "good"}, correlation_id="good")
    await lane.settled()
    replies = lane.replies()
    assert replies["json"]["error"]["code"] == "invalid_request"
    assert replies["api-rejects"]["error"] == {
        "code": "invalid_request",
        "message": "rejected by the embedding API: input rejected",
        "retryable": False,
    }
    assert right_vectors(replies["good"], ["good"])
    assert not lane.broker.queues[topology.DLQ] and lane.channel.unacked == 0


@pytest.mark.parametrize(
    ("props", "reason"),
    [
        ({"reply_to": None}, "no reply_to: nowhere to send the reply"),
        ({"reply_to": "billing.commands"}, "reply_to is not an allowed reply queue"),
        ({"reply_to": "amq.gen-\udcff"}, "property reply_to is not valid UTF-8"),
    ],
)
async def test_what_cannot_be_answered_is_parked_with_its_reason(
    lane: Lane, props: dict[str, Any], reason: str
) -> None:
    lane.send({"text": "x"}, correlation_id="parked", **props)
    await lane.settled()
    [parked] = lane.broker.queues[topology.DLQ]
    assert parked.properties.headers["x-embed-error"] == reason and parked.properties.correlation_id == "parked"
    assert not lane.replies() and lane.channel.unacked == 0


async def test_an_invalid_property_with_a_usable_reply_to_is_answered(lane: Lane) -> None:
    lane.send({"text": "x"}, correlation_id="ok", message_id="id-\udcfe")
    await lane.settled()
    assert lane.replies()["ok"]["error"]["message"] == "property message_id is not valid UTF-8"


async def test_an_upstream_that_keeps_failing_is_answered_retryable_and_parked(lane: Lane) -> None:
    lane.embedder.faults = [UpstreamError("503", status=503, retry_now=True)] * 3
    lane.send({"text": "unlucky"}, correlation_id="u")
    await lane.settled()
    assert lane.replies()["u"]["error"]["retryable"] is True
    [parked] = lane.broker.queues[topology.DLQ]
    assert parked.properties.headers["x-embed-error"] == "upstream_error: 503"


async def test_a_reply_that_cannot_be_published_is_requeued_until_the_delivery_limit_parks_it(lane: Lane) -> None:
    """Each failed publish is a basic.reject(requeue=true); a quorum queue counts those and parks the message once
    the count passes its limit: delivered DELIVERY_LIMIT + 1 times (the first time and one per allowed redelivery)."""
    lane.publisher.fail = ConnectionError("confirm channel lost")
    lane.send({"text": "never confirmed"}, correlation_id="n")
    await lane.settled()
    rejects = [f for f in lane.channel.frames if f[0] == "reject"]
    assert rejects == [("reject", tag, True) for tag in range(1, DELIVERY_LIMIT + 2)]
    [parked] = lane.broker.queues[topology.DLQ]
    assert parked.properties.headers["x-death"][0]["reason"] == "delivery_limit"


async def test_requests_held_at_shutdown_go_back_to_the_queue(lane: Lane) -> None:
    await lane.channel.basic_cancel("memory-0")  # shutting down: the consumer is cancelled first
    lane.send({"text": "in hand"}, correlation_id="late")
    channel = lane.broker.channel()
    message = await channel.basic_get(topology.QUEUE)
    await lane.service.close(timeout=1)  # the batcher closes before this request's batch ran
    await handle_delivery(message, lane.service.handle, lane.settler)
    assert channel.frames == [("reject", 1, True)]
    assert len(lane.broker.queues[topology.QUEUE]) == 1  # for another worker, not lost


def test_the_node_of_a_direct_reply_to_name() -> None:
    """RabbitMQ 3.10 writes a Direct Reply-to name as the base64 of its channel's pid, whose node comes first
    (a name captured from tests/e2e/test_cluster.py's cluster)."""
    assert reply_node("amq.rabbitmq.reply-to.g1h2AA5yZXBseUAzNDgyNTMzMgAAArAAAAAAaw") == "reply@34825332"
    assert reply_node("amq.rabbitmq.reply-to.g1h2AA5yZXBseUAzNDgyNTMzMgAAArAAAAAAaw.extra") == "reply@34825332"
    assert reply_node("amq.gen-abc") is None
    assert reply_node("amq.rabbitmq.reply-to.!!!") is None
    assert reply_node("amq.rabbitmq.reply-to.aGVsbG8=") is None  # base64, but not a pid
