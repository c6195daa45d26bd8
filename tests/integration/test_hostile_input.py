"""Messages a hostile or careless publisher can send: properties that are not valid UTF-8.

pika lets a publisher put any bytes in a short-string property; pamqp would refuse to decode them and aiormq
would drop the worker's connection (and on reconnect get the same message again). These tests publish such
messages with pika among good requests and check that the worker stays connected, answers every good
request with the right vector, and answers or parks the bad one with a reason.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from typing import Any

import aio_pika
import orjson
import pika
import pytest

from tests.conftest import Broker
from tests.integration.helpers import RawCaller, assert_right_vectors, get_one
from worker.client import EmbedClient

pytestmark = pytest.mark.integration

BAD = b"\xff\xfe"


class PikaCaller:
    """A blocking pika connection on a thread: publishes raw properties, collects replies as bytes."""

    def __init__(self, url: str):
        self.url = url
        self.replies: list[tuple[Any, bytes]] = []
        self._lock = threading.Lock()

    def __enter__(self) -> PikaCaller:
        self.connection = pika.BlockingConnection(pika.URLParameters(self.url))
        self.channel = self.connection.channel()
        self.queue = self.channel.queue_declare(queue="", exclusive=True).method.queue
        return self

    def __exit__(self, *exc: object) -> None:
        self.connection.close()

    def publish(self, body: bytes, routing_key: str = "embed.requests", **props: Any) -> None:
        props.setdefault("content_type", "application/json")
        self.channel.basic_publish("", routing_key, body, pika.BasicProperties(**props))

    def collect(self, count: int, timeout: float = 20) -> list[tuple[Any, bytes]]:
        """Wait for ``count`` replies on our queue; pika keeps undecodable short strings as bytes."""
        deadline = timeout
        while len(self.replies) < count and deadline > 0:
            method, props, body = self.channel.basic_get(self.queue, auto_ack=True)
            if method is None:
                self.connection.process_data_events(time_limit=0.05)
                deadline -= 0.05
                continue
            self.replies.append((props, body))
        return self.replies


def publish_once(url: str, body: bytes, routing_key: str = "embed.requests", **props: Any) -> None:
    with PikaCaller(url) as caller:
        caller.publish(body, routing_key, **props)


def _worker_connections(broker: Broker, vhost: str) -> list[str]:
    """The worker's connections on this test's vhost only (the broker may be shared)."""
    return sorted(c.pid for c in broker.connections(vhost) if c.name.startswith("embed-worker"))


BAD_PROPERTIES: list[tuple[str, dict[str, Any]]] = [
    ("correlation_id", {"correlation_id": BAD}),
    ("message_id", {"message_id": BAD}),
    ("type", {"type": BAD}),
    ("app_id", {"app_id": BAD}),
    ("a header name", {"headers": {BAD: "value"}}),
]


@pytest.mark.parametrize(("what", "props"), BAD_PROPERTIES, ids=[p for p, _ in BAD_PROPERTIES])
async def test_invalid_utf8_property_is_answered_and_the_window_survives(
    broker: Broker, start_worker: Any, vhost: str, what: str, props: dict[str, Any]
) -> None:
    """Quorum queue, delivery limit 2: before the fix every request in the prefetch window was dead-lettered."""
    await start_worker(delivery_limit=2, batch_max_size=20, batch_max_wait_ms=50)
    connections = _worker_connections(broker, vhost)
    texts = [f"window {i}" for i in range(10)]

    def run() -> list[tuple[Any, bytes]]:
        with PikaCaller(vhost) as caller:
            caller.publish(b'{"text": "poison"}', reply_to=caller.queue, **{"correlation_id": "bad-one", **props})
            for i, text in enumerate(texts):
                caller.publish(orjson.dumps({"text": text}), reply_to=caller.queue, correlation_id=f"good-{i}")
            return caller.collect(len(texts) + 1)

    replies = await asyncio.to_thread(run)
    by_cid = {props.correlation_id: orjson.loads(body) for props, body in replies}
    bad_cid = props.get("correlation_id", "bad-one")
    assert by_cid[bad_cid]["error"]["code"] == "invalid_request"  # the caller's own bytes came back
    assert what in by_cid[bad_cid]["error"]["message"]
    for i, text in enumerate(texts):
        assert_right_vectors(by_cid[f"good-{i}"], [text])
    assert _worker_connections(broker, vhost) == connections  # never dropped, never reconnected


@pytest.mark.parametrize("queue_type", ["quorum", "classic"])
async def test_invalid_reply_to_is_parked_with_a_readable_reason(
    broker: Broker, start_worker: Any, vhost: str, queue_type: str
) -> None:
    await start_worker(queue_type=queue_type)
    connections = _worker_connections(broker, vhost)
    await asyncio.to_thread(publish_once, vhost, b'{"text": "x"}', reply_to=b"amq.gen-\xff", correlation_id="z")
    parked = await get_one(vhost, "embed.requests.dlq")  # an aio-pika reader of the DLQ can read it
    assert parked.headers["x-embed-error"] == "property reply_to is not valid UTF-8"
    assert parked.headers["x-original-reply-to"] == b"amq.gen-\xff"
    assert parked.correlation_id == "z" and parked.body == b'{"text": "x"}'
    async with RawCaller(vhost) as caller:
        assert_right_vectors(await caller.call({"text": "after"}), ["after"])
    assert _worker_connections(broker, vhost) == connections


async def test_the_deferred_lane_reads_past_an_invalid_property(start_worker: Any, vhost: str, redis_url: str) -> None:
    prefix = f"test:{uuid.uuid4().hex[:8]}:"
    await start_worker(redis_url=redis_url, deferred_flush_interval_s=3600, deferred_wake_messages=0)

    def publish() -> None:
        with PikaCaller(vhost) as caller:
            for i, props in enumerate([{"message_id": BAD}, {"headers": {BAD: 1}}, {}]):
                body = orjson.dumps({"items": [{"key": f"{prefix}{i}", "text": f"deferred {i}"}]})
                caller.publish(body, routing_key="embed.deferred", delivery_mode=2, **props)

    await asyncio.to_thread(publish)
    async with EmbedClient(vhost, timeout=30) as client:
        assert await client.flush() == 3  # the items are fine; only their properties were odd


async def test_the_client_survives_a_reply_with_an_invalid_property(start_worker: Any, vhost: str) -> None:
    """Anyone who learns a caller's Direct Reply-to name can publish to it; the caller must stay up."""
    await start_worker()
    async with EmbedClient(vhost, timeout=20) as client:
        # Learn our own Direct Reply-to name the way a peer would: from a request we send.
        seen: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        spy = await aio_pika.connect(vhost)
        channel = await spy.channel()
        queue = await channel.declare_queue("spy", auto_delete=True)
        await queue.bind("embed.requests", routing_key="spy")

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            if not seen.done():
                seen.set_result(message.reply_to or "")

        await queue.consume(on_message, no_ack=True)
        request = client.request(b"{}", routing_key="spy", exchange="embed.requests", timeout=0.5)
        with pytest.raises(TimeoutError):
            await request
        reply_to = await asyncio.wait_for(seen, 5)
        await spy.close()
        await asyncio.to_thread(publish_once, vhost, b"{}", reply_to, correlation_id=BAD)
        vectors = await client.embed(["still here"])
    assert_right_vectors(
        {"embeddings": vectors.tolist(), "model": "gemini-embedding-001", "dimensions": 3072}, ["still here"]
    )
