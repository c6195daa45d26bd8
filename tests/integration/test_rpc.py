"""The wire contract end to end: real RabbitMQ, the worker as `embed-worker run` builds it, the real
google-genai SDK talking to the emulator. Every reply is checked vector by vector."""

from __future__ import annotations

import asyncio
import gzip
import threading
import uuid
from typing import Any

import numpy as np
import orjson
import pika
import pytest

from tests.integration.helpers import RawCaller, assert_right_vectors
from worker.client import EmbedClient, EmbedClientError
from worker.emulator import EmulatorState

pytestmark = pytest.mark.integration


async def test_direct_reply_to_caller_gets_the_right_vectors(start_worker: Any, vhost: str) -> None:
    await start_worker()
    texts = ["the cat sat", "on the mat", "the cat sat"]
    async with EmbedClient(vhost, timeout=20) as client:
        vectors = await client.embed(texts, task_type="RETRIEVAL_DOCUMENT", output_dimensionality=256)
    assert_right_vectors(
        {"embeddings": vectors.tolist(), "model": "gemini-embedding-001", "dimensions": 256},
        texts,
        task_type="RETRIEVAL_DOCUMENT",
        dims=256,
    )


def _pika_tutorial_call(url: str, body: bytes, result: dict[str, Any]) -> None:
    """The RabbitMQ RPC tutorial's client: exclusive callback queue, publish to the named exchange."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    callback_queue = channel.queue_declare(queue="", exclusive=True).method.queue
    corr_id = str(uuid.uuid4())

    def on_response(ch: Any, method: Any, props: Any, reply: bytes) -> None:
        if props.correlation_id == corr_id:
            result["body"] = reply
            result["correlation_id"] = props.correlation_id

    channel.basic_consume(queue=callback_queue, on_message_callback=on_response, auto_ack=True)
    channel.basic_publish(
        exchange="embed.requests",
        routing_key="embed.requests",
        properties=pika.BasicProperties(
            reply_to=callback_queue, correlation_id=corr_id, content_type="application/json"
        ),
        body=body,
    )
    for _ in range(200):  # up to 20 s
        if "body" in result:
            break
        connection.process_data_events(time_limit=0.1)
    connection.close()


async def test_classic_callback_queue_caller_via_the_named_exchange(start_worker: Any, vhost: str) -> None:
    await start_worker()
    result: dict[str, Any] = {}
    texts = ["hello", "world"]
    body = orjson.dumps({"texts": texts, "task_type": "SEMANTIC_SIMILARITY"})
    thread = threading.Thread(target=_pika_tutorial_call, args=(vhost, body, result))
    thread.start()
    await asyncio.to_thread(thread.join, 30)
    assert "body" in result, "no reply within 20 s"
    assert_right_vectors(orjson.loads(result["body"]), texts, task_type="SEMANTIC_SIMILARITY")


async def test_burst_is_batched_into_full_upstream_calls(
    start_worker: Any, vhost: str, emulator_state: EmulatorState
) -> None:
    # A long max wait means only size flushes: 300 single-text requests must make exactly 6 calls of 50.
    await start_worker(batch_max_size=50, batch_max_wait_ms=60_000, max_concurrent_batches=2)
    texts = [f"burst text {i}" for i in range(300)]
    async with RawCaller(vhost) as caller:
        cids = [await caller.send({"text": t, "output_dimensionality": 128}) for t in texts]
        replies = await asyncio.gather(*(caller.reply(cid) for cid in cids))
    for text, reply in zip(texts, replies, strict=True):
        assert_right_vectors(reply, [text], dims=128)
    assert emulator_state.batch_sizes == [50] * 6


async def test_lone_request_is_flushed_by_the_timeout(
    start_worker: Any, vhost: str, emulator_state: EmulatorState
) -> None:
    await start_worker(batch_max_size=100, batch_max_wait_ms=30)
    async with RawCaller(vhost) as caller:
        reply = await caller.call({"text": "all alone"})
    assert_right_vectors(reply, ["all alone"])
    assert emulator_state.batch_sizes == [1]


async def test_mixed_configurations_never_share_an_upstream_call(
    start_worker: Any, vhost: str, emulator_state: EmulatorState
) -> None:
    await start_worker(batch_max_size=20, batch_max_wait_ms=50)
    configs: list[dict[str, Any]] = [
        {},
        {"task_type": "RETRIEVAL_QUERY"},
        {"task_type": "RETRIEVAL_DOCUMENT", "output_dimensionality": 768},
        {"output_dimensionality": 768},
        {"model": "text-embedding-004"},
    ]
    async with RawCaller(vhost) as caller:
        sent = []
        for i in range(40):
            cfg = configs[i % len(configs)]
            texts = [f"mixed {i}", f"mixed {i} again"]
            sent.append((await caller.send({"texts": texts, **cfg}), texts, cfg))
        for cid, texts, cfg in sent:
            reply = await caller.reply(cid)
            assert_right_vectors(
                reply,
                texts,
                model=cfg.get("model", "gemini-embedding-001"),
                task_type=cfg.get("task_type"),
                dims=cfg.get("output_dimensionality"),
            )
    assert all(len(c) == 1 for c in emulator_state.call_configs), emulator_state.call_configs
    assert len(emulator_state.call_configs) >= len(configs)


async def test_request_of_250_texts_is_split_over_calls_and_answered_once_in_order(
    start_worker: Any, vhost: str, emulator_state: EmulatorState
) -> None:
    worker = await start_worker(batch_max_size=100)
    texts = [f"document number {i}" for i in range(250)]
    async with RawCaller(vhost) as caller:
        cid = await caller.send({"texts": texts, "output_dimensionality": 128})
        reply = await caller.reply(cid)
        await worker.shutdown()
        await caller.sync()
        assert caller.counts[cid] == 1  # answered once, not once per upstream call
    assert_right_vectors(reply, texts, dims=128)
    assert sorted(emulator_state.batch_sizes) == [50, 100, 100]


async def test_invalid_requests_get_error_replies_and_the_worker_keeps_serving(start_worker: Any, vhost: str) -> None:
    await start_worker()
    bad: list[tuple[bytes | dict[str, Any], str]] = [
        (b"\xff not json", "not valid JSON"),
        (b'"a string"', "JSON object"),
        ({"texts": []}, "empty"),
        ({"texts": ["ok", 7]}, "texts.1"),
        ({"text": "a", "model": "no-such-model"}, "unknown model"),
        ({"text": "a", "task_type": "NOPE"}, "unknown task_type"),
        ({"text": "a", "output_dimensionality": 5000}, "between 128"),
        ({"text": "x" * 9000}, "tokens"),
    ]
    async with RawCaller(vhost) as caller:
        for body, fragment in bad:
            reply = await caller.call(body)
            assert reply["error"]["code"] == "invalid_request", reply
            assert fragment in reply["error"]["message"]
            assert reply["error"]["retryable"] is False
        assert_right_vectors(await caller.call({"text": "still alive"}), ["still alive"])


async def test_client_raises_typed_errors(start_worker: Any, vhost: str) -> None:
    await start_worker()
    async with EmbedClient(vhost, timeout=20) as client:
        with pytest.raises(EmbedClientError) as info:
            await client.embed(["a"], task_type="NOT_A_TASK")
    assert info.value.code == "invalid_request" and not info.value.retryable


async def test_float32_reply_encoding_carries_the_same_vectors(start_worker: Any, vhost: str) -> None:
    await start_worker()
    texts = ["binary one", "binary two", "binary three"]
    async with EmbedClient(vhost, timeout=20) as client:
        vectors = await client.embed(texts, output_dimensionality=768, binary=True)
        as_json = await client.embed(texts, output_dimensionality=768)
    assert vectors.dtype == np.float32 and vectors.shape == (3, 768)
    assert np.array_equal(vectors, as_json)  # bit for bit: JSON float32 text round-trips exactly
    assert_right_vectors(
        {"embeddings": vectors.tolist(), "model": "gemini-embedding-001", "dimensions": 768}, texts, dims=768
    )


async def test_a_gzip_body_is_decompressed_and_another_encoding_is_named(start_worker: Any, vhost: str) -> None:
    await start_worker()
    texts = ["squeezed", "twice squeezed"]
    async with RawCaller(vhost) as caller:
        body = gzip.compress(orjson.dumps({"texts": texts}))
        assert_right_vectors(await caller.call(body, content_encoding="gzip"), texts)
        reply = await caller.call(orjson.dumps({"texts": texts}), content_encoding="br")
        assert reply["error"]["code"] == "invalid_request"
        assert "'br'" in reply["error"]["message"]
