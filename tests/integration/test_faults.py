"""Upstream faults, dead-lettering, deadlines and reply_to checks, against real RabbitMQ + emulator."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import orjson
import pytest

from tests.conftest import Broker
from tests.integration.helpers import RawCaller, assert_right_vectors, consumers, get_one, queue_depth, wait_until
from tests.integration.proxy import Proxy
from worker.client import EmbedClient
from worker.emulator import BAD_INPUT_MARKER, EmulatorState, Fault

pytestmark = pytest.mark.integration


async def test_transient_upstream_errors_are_retried_and_answered(
    start_worker: Any, vhost: str, emulator_state: EmulatorState
) -> None:
    await start_worker()
    emulator_state.faults = [Fault(503, times=2), Fault(429, times=1, retry_delay_s=0.05)]
    async with RawCaller(vhost) as caller:
        reply = await caller.call({"texts": ["retry me", "and me"]})
    assert_right_vectors(reply, ["retry me", "and me"])
    assert emulator_state.rejected == 3 and emulator_state.calls == 1


async def test_retry_budget_exhausted_gives_retryable_error_and_dead_letters(
    start_worker: Any, vhost: str, emulator_state: EmulatorState
) -> None:
    await start_worker(retry_max_attempts=3)
    emulator_state.faults = [Fault(500, times=-1)]
    async with RawCaller(vhost) as caller:
        cid = await caller.send({"text": "doomed"})
        reply = await caller.reply(cid)
    assert reply["error"]["code"] == "upstream_error" and reply["error"]["retryable"] is True
    assert emulator_state.rejected == 3
    parked = await get_one(vhost, "embed.requests.dlq")
    assert parked.correlation_id == cid
    assert orjson.loads(parked.body) == {"text": "doomed"}
    assert parked.headers["x-embed-error"] == "upstream_error: Gemini API 500 INTERNAL: injected fault"


async def test_daily_quota_answers_rate_limited_at_once(
    start_worker: Any, vhost: str, emulator_state: EmulatorState
) -> None:
    await start_worker(retry_max_attempts=5)
    emulator_state.faults = [Fault(429, times=-1, daily=True)]
    async with RawCaller(vhost) as caller:
        reply = await caller.call({"text": "over quota"})
    assert reply["error"]["code"] == "rate_limited" and reply["error"]["retryable"] is True
    assert emulator_state.rejected == 1  # no retry budget burnt


async def test_one_bad_input_fails_only_its_own_request(
    start_worker: Any, vhost: str, emulator_state: EmulatorState
) -> None:
    await start_worker(batch_max_size=20, batch_max_wait_ms=60_000)
    async with RawCaller(vhost) as caller:
        good = [await caller.send({"texts": [f"good {i}", f"fine {i}"]}) for i in range(8)]
        bad = await caller.send({"texts": ["innocent", f"poison {BAD_INPUT_MARKER}"]})
        more = [await caller.send({"texts": [f"good {i}", f"fine {i}"]}) for i in range(8, 9)]
        assert (await caller.reply(bad))["error"]["code"] == "invalid_request"
        for i, cid in enumerate(good + more):
            assert_right_vectors(await caller.reply(cid), [f"good {i}", f"fine {i}"])
    # The full batch of 20 was rejected once, then bisected: every good text embedded exactly once more.
    assert emulator_state.rejected >= 2 and sum(emulator_state.batch_sizes) == 19


async def test_expired_deadline_costs_no_upstream_call(
    start_worker: Any, vhost: str, emulator_state: EmulatorState
) -> None:
    await start_worker()
    async with RawCaller(vhost) as caller:
        past = int((time.time() - 1) * 1000)
        reply = await caller.call({"text": "too late"}, headers={"x-deadline": past})
        future = int((time.time() + 60) * 1000)
        on_time = await caller.call({"text": "on time"}, headers={"x-deadline": future})
    assert reply["error"]["code"] == "deadline_exceeded"
    assert_right_vectors(on_time, ["on time"])
    assert emulator_state.texts == 1


async def test_missing_reply_to_is_dead_lettered_and_the_worker_keeps_going(start_worker: Any, vhost: str) -> None:
    await start_worker()
    async with RawCaller(vhost) as caller:
        await caller.send({"text": "nowhere to answer"}, reply_to=None, correlation_id="lost-1")
        parked = await get_one(vhost, "embed.requests.dlq")
        assert parked.correlation_id == "lost-1"
        assert_right_vectors(await caller.call({"text": "next"}), ["next"])


async def test_reply_to_another_applications_queue_is_refused(start_worker: Any, vhost: str) -> None:
    await start_worker()
    connection = await aio_pika.connect(vhost)
    channel = await connection.channel()
    victim = await channel.declare_queue("billing.commands", durable=True)
    async with RawCaller(vhost) as caller:
        await caller.send({"text": "inject"}, reply_to="billing.commands", correlation_id="evil")
        parked = await get_one(vhost, "embed.requests.dlq")
        assert parked.correlation_id == "evil"
        assert_right_vectors(await caller.call({"text": "legit"}), ["legit"])
    assert await queue_depth(vhost, victim.name) == 0
    await connection.close()


async def test_reply_to_pattern_allows_named_reply_queues(start_worker: Any, vhost: str) -> None:
    await start_worker(reply_to_pattern=r"replies\.[a-z]+")
    async with RawCaller(vhost) as caller:
        await caller.channel.declare_queue("replies.search", exclusive=True)
        reply_queue = await caller.channel.get_queue("replies.search")
        got: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            if not got.done():
                got.set_result(message.body)

        await reply_queue.consume(on_message, no_ack=True)
        await caller.send({"text": "named"}, reply_to="replies.search")
        assert_right_vectors(orjson.loads(await asyncio.wait_for(got, 20)), ["named"])


async def test_message_redelivered_past_the_limit_lands_in_the_dlq_with_its_reason(
    start_worker: Any, vhost: str
) -> None:
    """A message that every consumer gives back (crash loop) is parked by the quorum queue's limit."""
    worker = await start_worker(delivery_limit=2)
    await worker.shutdown()  # topology declared; now play a consumer that always fails
    connection = await aio_pika.connect(vhost)
    channel = await connection.channel()
    queue = await channel.get_queue("embed.requests")
    await channel.default_exchange.publish(
        aio_pika.Message(b'{"text": "crashy"}', correlation_id="crashy", reply_to="amq.gen-x"),
        routing_key="embed.requests",
    )
    rejected = 0
    async with queue.iterator() as it:
        async for message in it:
            await message.reject(requeue=True)
            rejected += 1
            if rejected == 3:
                break
    parked = await get_one(vhost, "embed.requests.dlq")
    assert parked.correlation_id == "crashy"
    assert parked.headers["x-death"][0]["reason"] == "delivery_limit"  # type: ignore[index]
    await connection.close()


async def test_broker_connection_loss_reconnects_and_answers_everything(
    broker: Broker, start_worker: Any, vhost: str, emulator_state: EmulatorState, caplog: pytest.LogCaptureFixture
) -> None:
    emulator_state.latency_ms = 300  # 12 batches one at a time: ~4 s of work, so the drop lands mid-stream
    await start_worker(batch_max_size=5, max_concurrent_batches=1, amqp_reconnect_interval_s=0.3)
    texts = [f"through the storm {i}" for i in range(60)]
    async with RawCaller(vhost) as caller:
        cids = [await caller.send({"text": t}) for t in texts]
        await caller.reply(cids[0])
        # Close only the worker's connections on this test's vhost (the caller's must survive to collect replies).
        connections = broker.connections(vhost)
        worker_pids = [c.pid for c in connections if c.name.startswith("embed-worker")]
        assert worker_pids, connections
        for pid in worker_pids:
            broker.ctl(["close_connection", pid, "test: connection drop"])
        replies = [await caller.reply(cid, timeout=60) for cid in cids]
    for text, reply in zip(texts, replies, strict=True):
        assert_right_vectors(reply, [text])
    assert "reconnected to the broker" in caplog.text
    assert sum(emulator_state.batch_sizes) >= len(texts)


async def test_sustained_upstream_failure_pauses_consuming_and_resumes_on_recovery(
    start_worker: Any, vhost: str, emulator_state: EmulatorState
) -> None:
    emulator_state.faults = [Fault(503, times=-1)]
    await start_worker(
        batch_max_size=5,
        max_concurrent_batches=1,
        prefetch_count=5,
        retry_max_attempts=2,
        breaker_failures=3,
        breaker_cooldown_s=0.5,
    )
    texts = [f"patience {i}" for i in range(40)]
    async with RawCaller(vhost) as caller:
        cids = [await caller.send({"text": t}) for t in texts]
        await wait_until(lambda: consumers(vhost, "embed.requests"), 0)  # paused
        held_back = await queue_depth(vhost, "embed.requests")
        assert held_back >= 25, "the queue was drained into errors instead of pausing"
        emulator_state.faults = []  # upstream recovers
        replies = [await caller.reply(cid, timeout=30) for cid in cids]
    failed = [r for r in replies if "error" in r]
    assert all(r["error"]["retryable"] for r in failed)
    assert len(failed) <= len(texts) - held_back
    for text, reply in zip(texts, replies, strict=True):
        if "error" not in reply:
            assert_right_vectors(reply, [text])


async def test_worker_runs_as_a_least_privilege_user(
    broker: Any, start_worker: Any, vhost: str, redis_url: str
) -> None:
    """The permissions the README's hardening section gives are enough for both lanes."""
    vhost_name = vhost.rsplit("/", 1)[1]
    user, password = f"least-{uuid.uuid4().hex[:6]}", uuid.uuid4().hex
    broker.ctl(["add_user", user, password])
    try:
        broker.ctl(
            [
                "set_permissions",
                "-p",
                vhost_name,
                user,
                r"^(embed\..*|amq\.gen-.*)$",
                r"^(embed\..*|amq\.gen-.*|amq\.default)$",
                r"^(embed\..*|amq\.gen-.*)$",
            ]
        )
        url = vhost.replace("guest:guest@", f"{user}:{password}@")
        await start_worker(amqp_url=url, redis_url=redis_url, deferred_flush_interval_s=3600, deferred_wake_messages=0)
        async with RawCaller(vhost) as caller:
            assert_right_vectors(await caller.call({"text": "least privilege"}), ["least privilege"])
        async with EmbedClient(vhost, timeout=20) as client:
            await client.defer([(f"least:{uuid.uuid4().hex}", "deferred too")])
            assert await client.flush() == 1
    finally:
        broker.ctl(["delete_user", user])


async def test_abandoned_direct_reply_to_request_costs_no_upstream_call(
    start_worker: Any, vhost: str, emulator_state: EmulatorState
) -> None:
    worker = await start_worker()
    await worker.shutdown()  # topology in place, nobody consuming
    gone = await aio_pika.connect(vhost)
    channel = await gone.channel()
    queue = await channel.get_queue("amq.rabbitmq.reply-to", ensure=False)

    async def ignore(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        return None

    await queue.consume(ignore, no_ack=True)
    await channel.default_exchange.publish(
        aio_pika.Message(b'{"text": "nobody waits for me"}', reply_to="amq.rabbitmq.reply-to", correlation_id="gone"),
        routing_key="embed.requests",
    )
    await gone.close()  # the caller leaves before any worker takes its request

    await start_worker()
    async with EmbedClient(vhost, timeout=20) as client:  # a live Direct Reply-to caller is still served
        vectors = await client.embed(["somebody waits"])
    assert_right_vectors(
        {"embeddings": vectors.tolist(), "model": "gemini-embedding-001", "dimensions": 3072}, ["somebody waits"]
    )
    assert emulator_state.texts == 1  # the abandoned request was dropped before batching
    assert await queue_depth(vhost, "embed.requests") == 0


async def test_sigterm_with_the_broker_unreachable_still_exits_within_the_grace(start_worker: Any, vhost: str) -> None:
    target = urlsplit(vhost)
    proxy = await Proxy(target.hostname or "127.0.0.1", target.port or 5672).start()
    url = urlunsplit(target._replace(netloc=f"guest:guest@127.0.0.1:{proxy.port}"))
    worker = await start_worker(amqp_url=url, shutdown_grace_s=2, amqp_reconnect_interval_s=0.2)
    await proxy.cut()
    loop = asyncio.get_running_loop()
    started = loop.time()
    await worker.shutdown(timeout=15)  # raises TimeoutError if the drain waits on the dead connection
    assert loop.time() - started < 10


async def test_a_wrong_api_key_parks_what_it_touched_pauses_and_loses_nothing(
    start_worker: Any, vhost: str, emulator_state: EmulatorState
) -> None:
    """Gemini answers a wrong key with a 400, like bad input. Before: every batch was bisected (100 requests,
    198 calls) and every request answered invalid_request, retryable false, and acked: the work was gone."""
    emulator_state.api_key = "the-operators-new-key"  # the worker still has the old one
    await start_worker(batch_max_size=10, max_concurrent_batches=1, prefetch_count=30, breaker_cooldown_s=0.3)
    texts = [f"key trouble {i}" for i in range(100)]
    async with RawCaller(vhost) as caller:
        cids = [await caller.send({"text": t}) for t in texts]
        await wait_until(lambda: consumers(vhost, "embed.requests"), 0)  # paused after the first refusal
        first = await caller.reply(cids[0])
        assert first["error"] == {
            "code": "upstream_error",
            "message": "Gemini API 400 INVALID_ARGUMENT: API key not valid. Please pass a valid API key.",
            "retryable": True,
        }
        calls_while_wrong = emulator_state.rejected
        assert calls_while_wrong <= 3, "a credential error was bisected or retried"
        emulator_state.api_key = None  # the operator fixes the key: the breaker's probe goes through
        replies = {cid: await caller.reply(cid, timeout=30) for cid in cids}
    refused = {cid for cid, r in replies.items() if "error" in r}
    for cid, text in zip(cids, texts, strict=True):
        if cid in refused:
            assert replies[cid]["error"]["retryable"] is True
        else:
            assert_right_vectors(replies[cid], [text])
    assert len(refused) <= 30  # at most the prefetch window; the queue kept the rest
    parked = set()
    while len(parked) < len(refused):
        message = await get_one(vhost, "embed.requests.dlq")
        assert message.headers["x-embed-error"].startswith("upstream_error: Gemini API 400")
        parked.add(message.correlation_id)
    assert parked == refused  # every refused request is parked for replay


async def test_direct_reply_to_only_refuses_server_named_reply_queues(start_worker: Any, vhost: str) -> None:
    """The default guard keeps replies out of named queues but cannot tell one app's amq.gen-* queue from
    another's; REPLY_TO_DIRECT_ONLY narrows replies to the caller's own Direct Reply-to channel."""
    await start_worker(reply_to_direct_only=True)
    async with RawCaller(vhost) as caller:  # an exclusive server-named (amq.gen-*) reply queue
        await caller.send({"text": "to amq.gen"}, correlation_id="gen")
        parked = await get_one(vhost, "embed.requests.dlq")
        assert (
            parked.correlation_id == "gen"
            and parked.headers["x-embed-error"] == "reply_to is not an allowed reply queue"
        )
    async with EmbedClient(vhost, timeout=20) as client:  # Direct Reply-to is still served
        vectors = await client.embed(["direct"])
    assert vectors.shape == (1, 3072)
